"""The errors the model package raises on purpose, without torch: weights or a
layout that do not fit a model, each with a message that says why. Entry points
report them as one line."""


class ModelError(ValueError):
    """Weights, metadata or a layout that do not fit the model."""


class CheckpointMismatchError(ModelError):
    """A checkpoint's keys or shapes do not fit the model; the message lists them."""


class LayoutError(ModelError):
    """A state dict cannot be expressed in the requested layout; the message says why."""
