"""What both training loops (pretraining, fine-tuning) do around each update.

- Each micro-batch: the fault drill's poison (``faults.inject_nonfinite_at``), one
  all-reduce that agrees on the loss, a skip and a stop, then backward and step
  unless every rank skips it; the loss joins the step's accumulation window.
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
from collections.abc import Callable, Collection
from typing import Any

import torch

from infra.metrics import sink
from train.engine import agree_across_ranks, all_ranks
from train.errors import NonFiniteLossError
from train.signals import stall_watch

log = logging.getLogger(__name__)


class UpdateGuard:
    def __init__(self, result: Any, max_in_a_row: int, every_steps: int, total_steps: int, world: int = 1,
                 inject_at: Collection[int] = ()) -> None:
        self.result = result  # the loop's result: step, losses, images, data wait, skipped updates
        self.max_in_a_row, self.every_steps, self.total_steps = max_in_a_row, every_steps, total_steps
        self.world, self.inject_at = world, inject_at
        self.in_a_row = 0
        self.micro = 0  # micro-batches this process ran
        self.window: list[float] = []  # the agreed losses of the step's micro-batches so far
        self._save_waiting = False

    def say_if_nothing_left(self, rank: int) -> None:
        """A run resumed at or past its last step trains nothing: say so, rather
        than end at once without a word (a lowered ``schedule.max_steps``)."""
        step = self.result.step
        if rank == 0 and step >= self.total_steps:
            log.warning("nothing to train: the checkpoint resumed is at step %d, and this run ends at step %d%s",
                        step, self.total_steps, "" if step == self.total_steps else
                        " (schedule.max_steps or the epochs were lowered; its weights are those of the later step)")

    def update(self, engine: Any, loss: torch.Tensor, images: int, wait: float, stop: bool,
               grad_norm: Any = None) -> tuple[bool, bool] | None:
        """One micro-batch's update, alike on every rank (``stop``: this rank got a
        signal). None when every rank skips it; else whether it closed an
        accumulation window and whether any rank is stopping."""
        r = self.result
        if self.micro in self.inject_at:
            loss = loss * float("nan")  # fault drill: a poisoned batch
        self.micro += 1
        agreed = agree_across_ranks(loss, stop, self.world, images, r.step + 1, self.micro - 1)  # the step it is for
        if agreed.skip:  # every rank skips this micro-batch together: no update, no hang
            self.skipped(agreed.skip)
            return None
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        if grad_norm is not None:
            grad_norm.before_step(boundary)
        engine.step()
        if grad_norm is not None:
            grad_norm.after_step(boundary)
        self.stepped(engine, boundary, r.step + 1)
        r.images += images * self.world
        r.data_wait_s += wait
        self.window.append(agreed.mean_loss)
        return boundary, agreed.stopping

    def close_window(self) -> float:
        """The step's loss, the mean over its accumulation window; the step is counted."""
        loss = sum(self.window) / len(self.window)
        self.window = []
        self.result.step += 1
        self.result.losses.append(loss)
        return loss

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

    def after_step(self, stopping: bool, stop: Any, saving: bool, save: Callable[[], None], device: Any) -> bool:
        """``end_step`` for the step just counted, with the loop's ``StopSignal``:
        records why the run stops (every rank the same signal: the one the first
        rank that got one got; its exit code is 128 + it); True to stop now. The
        step re-arms the stall watch (``log.stall_dump_s``)."""
        stall_watch.beat()
        why = self.end_step(self.result.step, stopping, stop.received, saving, save,
                            lambda: stop.on_any_rank(self.world, device))
        if why is not None:  # every rank stops here; a collective once, at the stop
            why = next((s for s in all_ranks(stop.received) if s), why)
        self.result.stopped_by_signal = why
        return why is not None
