"""The rules both training loops share around an update (train/update_guard.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train.errors import NonFiniteLossError
from train.update_guard import UpdateGuard


class Engine:
    def __init__(self, applied: bool) -> None:
        self.applied = applied

    def was_step_applied(self) -> bool:
        return self.applied


def test_a_due_checkpoint_waits_through_a_streak_of_skipped_updates():
    result = SimpleNamespace(nonfinite_skipped=0)
    guard, saves = UpdateGuard(result, max_in_a_row=5, every_steps=2, total_steps=10), []
    for step, applied in [(1, True), (2, False), (3, False), (4, True), (5, True), (6, True)]:
        guard.stepped(Engine(applied), boundary=True, step=step)
        guard.end_step(step, False, None, True, lambda s=step: saves.append(s))
    assert saves == [4, 6] and result.nonfinite_skipped == 2  # step 2's save waited for step 4's update


def test_too_many_skipped_updates_in_a_row_stop_the_run():
    result = SimpleNamespace(nonfinite_skipped=0)
    guard = UpdateGuard(result, max_in_a_row=3, every_steps=100, total_steps=100)
    guard.skipped("non-finite loss")
    guard.stepped(Engine(True), boundary=True, step=1)  # an applied update ends the streak
    guard.skipped("non-finite loss")
    guard.stepped(Engine(False), boundary=False, step=1)  # not a boundary: nothing decided
    guard.skipped("non-finite loss")
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses or skipped updates in a row"):
        guard.stepped(Engine(False), boundary=True, step=2)
    assert result.nonfinite_skipped == 4


def test_a_stop_saves_the_step_once_and_names_the_signal():
    guard, saves = UpdateGuard(SimpleNamespace(nonfinite_skipped=0), 5, every_steps=3, total_steps=10), []
    assert guard.end_step(2, True, "SIGTERM", True, lambda: saves.append(2)) == "SIGTERM"
    assert guard.end_step(3, True, None, True, lambda: saves.append(3)) == "signal on another rank"
    assert guard.end_step(4, True, None, False, lambda: saves.append(4)) == "signal on another rank"
    assert saves == [2, 3]  # step 3 was due: saved once; checkpoints off: none
