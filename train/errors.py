"""The errors training, export and evaluation raise: typed, one clear message each.
Only the CLI (and the launcher entry ``python -m train.pretrain``) turns them into
exit codes (``exit_code``: 2 for input the user can fix, 1 for a failure at run time)."""

from __future__ import annotations


class TrainError(Exception):
    """Base of every error ``train`` raises on purpose."""

    exit_code = 1


class ConfigError(TrainError):
    """A config file or override is wrong; the message names the key."""

    exit_code = 2


class ResumeError(TrainError):
    """A checkpoint cannot be resumed by this run; the message says why."""

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
