"""What both training loops (pretraining, fine-tuning) do around each update.

- A skipped update — a non-finite loss on any rank, or gradients DeepSpeed found
  overflowed — is counted; ``faults.max_nonfinite_in_row`` of them in a row stop
  the run (a corrupt weight can keep the loss finite while every update is skipped).
- A checkpoint that falls due during such a streak waits for the next applied
  update, so a run whose weights went bad stops with the last good checkpoint
  instead of rotating it out.
- A stop signal on any rank: every rank saves this same step and leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from infra.metrics import sink
from train.errors import NonFiniteLossError

log = logging.getLogger(__name__)


class UpdateGuard:
    def __init__(self, result: Any, max_in_a_row: int, every_steps: int, total_steps: int) -> None:
        self.result = result  # its ``nonfinite_skipped`` counts the run's skipped updates
        self.max_in_a_row, self.every_steps, self.total_steps = max_in_a_row, every_steps, total_steps
        self.in_a_row = 0
        self._save_waiting = False

    def skipped(self, what: str) -> None:
        """An update that did not happen: counted; too many in a row stop the run."""
        self.result.nonfinite_skipped += 1
        sink().inc("mae_nonfinite_steps_skipped_total")
        self.in_a_row += 1
        log.warning("%s (%d in a row)", what, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(f"{self.in_a_row} non-finite losses or skipped updates in a row, the last: "
                                     f"{what}; stopping with the last good checkpoint intact")

    def stepped(self, engine: Any, boundary: bool, step: int) -> None:
        """After ``engine.step()``: at an accumulation boundary, did the update apply?"""
        if boundary and not engine.was_step_applied():  # DeepSpeed found inf/NaN gradients
            self.skipped(f"gradient overflow at step {step}: DeepSpeed skipped the update")
        elif boundary:
            self.in_a_row = 0

    def checkpoint_due(self, step: int) -> bool:
        """Every ``every_steps`` and at the end; never inside a run of skipped updates."""
        due = self._save_waiting or step % self.every_steps == 0 or step == self.total_steps
        self._save_waiting = due and self.in_a_row > 0 and step < self.total_steps
        return due and not self._save_waiting

    def end_step(self, step: int, stopping: bool, received: str | None, saving: bool, save: Callable[[], None],
                 stop_after_save: Callable[[], tuple[bool, str | None]] | None = None) -> str | None:
        """Save when due (``saving``: checkpoints are on); on a stop, save this step on
        every rank if not saved yet. A stop signal that came during a due save (the
        ranks agree on it with ``stop_after_save``: any rank stopping, this rank's
        signal) stops here, with nothing more to save, rather than one step and one
        save later. Returns why the run stops, or None."""
        saved = saving and self.checkpoint_due(step)
        if saved:
            save()
            if not stopping and stop_after_save is not None:
                stopping, received = stop_after_save()
        if not stopping:
            return None
        if saving and not saved:
            save()
        return received or "signal on another rank"
