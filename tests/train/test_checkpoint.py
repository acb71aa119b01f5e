from train.checkpoint import COMPLETE, complete_tags, latest_complete, tag_for


def _tag(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / COMPLETE).write_text("")
    return d.name


def test_latest_ignores_a_half_written_checkpoint(tmp_path):
    assert latest_complete(tmp_path) is None
    _tag(tmp_path, 100)
    _tag(tmp_path, 200)
    _tag(tmp_path, 300, complete=False)  # a crash mid-save
    (tmp_path / "latest").write_text(tag_for(200))
    assert latest_complete(tmp_path) == "step000000200"
    assert complete_tags(tmp_path) == ["step000000100", "step000000200"]


def test_latest_pointing_at_an_incomplete_tag_falls_back(tmp_path):
    _tag(tmp_path, 100)
    _tag(tmp_path, 200, complete=False)
    (tmp_path / "latest").write_text(tag_for(200))
    assert latest_complete(tmp_path) == "step000000100"


def test_no_latest_file_uses_the_newest_complete(tmp_path):
    _tag(tmp_path, 5)
    _tag(tmp_path, 50)
    assert latest_complete(tmp_path) == "step000000050"
