"""Writing weight files: mode, temporaries, several files together."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from train.weights.files import read_state_dict, write_together


def test_weights_are_written_with_the_umask_mode_like_every_other_file(tmp_path):
    # safetensors makes its files 0600: teammates on shared storage could not read an export
    old = os.umask(0o022)
    try:
        write_together(tmp_path, {"a.safetensors": ({"w": torch.ones(3)}, {"model": "x"})})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
    assert torch.equal(read_state_dict(tmp_path / "a.safetensors")["w"], torch.ones(3))


def test_a_killed_exports_temporaries_are_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".mae.safetensors.tmp-{int(dead.stdout)}"  # a full-size file a kill -9 left behind
    left.write_bytes(b"x" * 1000)
    write_together(tmp_path, {"mae.safetensors": ({"w": torch.zeros(2)}, None),
                              "encoder.safetensors": ({"w": torch.zeros(1)}, None)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.safetensors", "mae.safetensors"]


def test_a_failed_write_leaves_the_earlier_files_as_they_were(tmp_path):
    write_together(tmp_path, {"a.safetensors": ({"w": torch.ones(2)}, None),
                              "b.safetensors": ({"w": torch.ones(2)}, None)})
    with pytest.raises(Exception):
        write_together(tmp_path, {"a.safetensors": ({"w": torch.zeros(2)}, None),
                                  "b.safetensors": ({"w": "not a tensor"}, None)})
    for name in ("a.safetensors", "b.safetensors"):
        assert torch.equal(read_state_dict(tmp_path / name)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_a_classifier_given_where_an_mae_is_wanted_is_named_as_such(tmp_path):
    # probe and reconstruct said "no complete checkpoint" or listed 22 missing decoder tensors
    from model.classifier import ClassifierConfig, ViTClassifier
    from train.errors import WeightsError
    from train.weights.files import export_classifier
    from train.weights.pretrained import load_pretrained

    model = ViTClassifier(ClassifierConfig(num_classes=3, img_size=32, patch_size=4, embed_dim=64, depth=2,
                                           num_heads=4))
    export_classifier(model.state_dict(), model.cfg, tmp_path / "best" / "classifier.safetensors")
    for given in (tmp_path / "best", tmp_path / "best" / "classifier.safetensors"):
        with pytest.raises(WeightsError, match="is a classifier from `mae finetune`; this takes an MAE"):
            load_pretrained(given)


def test_an_export_onto_a_file_says_so(tmp_path):
    from train.errors import WeightsError
    from train.weights.consolidate import export

    (tmp_path / "afile").write_text("x")
    with pytest.raises(WeightsError, match="afile is a file: mae export writes a folder"):
        export(tmp_path / "no-run", tmp_path / "afile")


def test_a_checkpoint_asked_for_by_name_says_what_it_lacks(tmp_path):
    """`mae export run/ckpt/step000000099`: a missing tag and an unfinished save are
    named as such, with the complete ones beside them (it said "no complete
    checkpoint in .../step000000099 (looked for step*/COMPLETE)")."""
    from train.errors import WeightsError
    from train.weights.consolidate import resolve_tag

    for tag in ("step000000004", "step000000008"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "COMPLETE").write_text("{}")
    (tmp_path / "step000000012").mkdir()  # a save killed before its record
    assert resolve_tag(tmp_path / "step000000008") == (tmp_path, "step000000008")
    with pytest.raises(WeightsError, match=r"step000000099 does not exist; complete ones beside it: step000000004, "
                                           r"step000000008$"):
        resolve_tag(tmp_path / "step000000099")
    with pytest.raises(WeightsError, match=r"step000000012 is an unfinished save \(no COMPLETE\); complete ones"):
        resolve_tag(tmp_path / "step000000012")
