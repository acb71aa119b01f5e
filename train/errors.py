"""The errors training, export and evaluation raise: typed, one clear message each.
Only the CLI (and the launcher entry ``python -m train.pretrain``) turns them into
exit codes (``exit_code``: 2 for input the user can fix, 1 for a failure at run time)."""

from __future__ import annotations

from infra.options import OptionError
from model.errors import ModelError
from pipeline.errors import PipelineError


class TrainError(Exception):
    """Base of every error ``train`` raises on purpose."""

    exit_code = 1


class ConfigError(TrainError):
    """A config file or override is wrong; the message names the key."""

    exit_code = 2


class ResumeError(TrainError):
    """A checkpoint cannot be resumed by this run; the message says why."""

    exit_code = 2


class CheckpointLockError(TrainError):
    """Another live run holds the checkpoint directory's lock, or this run lost it."""

    exit_code = 2


class CheckpointStorageError(TrainError):
    """Checkpoint storage is full, read-only or gone; the message names the path and
    what the run needs. The previous checkpoint is left intact."""


class LogFileError(TrainError):
    """A log file of the run (log.metrics_file, log.sample_ids_dir) cannot be
    written any more: the disk is full, or the storage went away."""


class CheckpointIntegrityError(TrainError):
    """A checkpoint fails verification: no integrity record, or a file missing,
    truncated or altered; the message names the file."""

    exit_code = 2


class UnsafeCheckpointError(TrainError):
    """A checkpoint file needs arbitrary unpickling (it could run code): refused."""

    exit_code = 2


class NonFiniteLossError(TrainError):
    """Too many consecutive non-finite losses; the last good checkpoint is intact."""


class WeightsError(TrainError):
    """A weights file or checkpoint is missing, unreadable, or not plain tensors."""

    exit_code = 2


class LaunchError(TrainError):
    """A cluster job cannot be written or submitted (bad options, sbatch refused it)."""

    exit_code = 2


class EvalInputError(TrainError):
    """Evaluation input that cannot be used (no labels, no images, encoder-only weights)."""

    exit_code = 2


def check_classes(train: list[str], train_url: str, val: list[str] | None = None, val_url: str = "") -> None:
    """A training set names at least two classes, and a validation set the same ones
    in the same order: labels are indices into those lists, so a validation set of
    other classes (or a subset) would be scored against the wrong names, silently."""
    if len(train) < 2:
        raise EvalInputError(f"{train_url} has {len(train)} class(es): a classifier needs at least two")
    if val is not None and list(val) != list(train):
        missing, extra = [c for c in train if c not in val], [c for c in val if c not in train]
        diff = "; ".join(part for part in (f"not in {val_url}: {', '.join(missing[:5])}" if missing else "",
                                           f"only in {val_url}: {', '.join(extra[:5])}" if extra else "") if part)
        raise EvalInputError(f"{val_url} lists other classes than {train_url} ({diff or 'in another order'}): labels "
                             "are class indices, so both must name the same classes in the same order (shard both "
                             "from folders with the same class subfolders)")


def reported_errors() -> tuple[type[BaseException], ...]:
    """What an entry point reports as one line and an exit code, never a traceback:
    the typed errors, a config value out of range, a missing optional library, the
    OS refusing a path, weights that do not fit a model. Anything else is a bug and
    keeps its traceback."""
    return (TrainError, PipelineError, OptionError, ImportError, OSError, ModelError)


def exit_code_of(error: BaseException) -> int:
    """The typed error's own code; 2 (input the user can fix) for the others."""
    return getattr(error, "exit_code", 2)
