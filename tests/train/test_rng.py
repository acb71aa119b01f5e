"""The trainer's random streams: seeded per rank, unmoved by anything else that draws
from torch's global RNG, saved and restored exactly."""

import pytest
import torch

from train.rng import StepStreams


def _draws(streams: StepStreams) -> tuple[torch.Tensor, torch.Tensor]:
    noise = streams.mask_noise(4, 16)
    with streams.model_stream():
        dropout = torch.nn.functional.dropout(torch.ones(32, device=streams.device), p=0.5)
    return noise, dropout


def test_streams_ignore_draws_from_the_global_rng():
    a, b = StepStreams(0, 0, torch.device("cpu")), StepStreams(0, 0, torch.device("cpu"))
    first = _draws(a)
    torch.rand(1000)  # e.g. a DataLoader iterator seeding its workers
    assert all(torch.equal(x, y) for x, y in zip(first, _draws(b)))


def test_the_model_stream_leaves_the_global_rng_alone():
    streams = StepStreams(0, 0, torch.device("cpu"))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _draws(streams)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_saved_streams_continue_exactly(device):
    streams = StepStreams(7, 1, torch.device(device))
    _draws(streams)
    state = streams.state_dict()
    expected = _draws(streams)
    torch.rand(100, device=device)  # other draws in between change nothing
    restored = StepStreams(0, 0, torch.device(device))
    restored.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, _draws(restored)))


def test_ranks_seeds_and_resumed_steps_get_different_streams():
    cpu = torch.device("cpu")
    base = StepStreams(0, 0, cpu).mask_noise(2, 8)
    for other in (StepStreams(0, 1, cpu), StepStreams(1, 0, cpu), StepStreams(0, 0, cpu, step=100)):
        assert not torch.equal(base, other.mask_noise(2, 8))
