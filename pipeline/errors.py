"""The errors the data pipeline raises: typed, with messages that name the dataset,
shard or sample and never a credential. Only the CLI turns them into exit codes
(``exit_code``: 2 for bad input the user can fix, 1 for a failure at run time)."""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    exit_code = 1


class ManifestError(PipelineError):
    """A manifest is missing, malformed or of an unknown version."""

    exit_code = 2


class SourceError(PipelineError):
    """Images to shard cannot be listed: missing folder, mixed layouts, bad list file."""

    exit_code = 2


class MixError(PipelineError):
    """``data.sources`` ask for what their datasets cannot give (samples of an empty
    source, an epoch smaller than the fixed quotas)."""

    exit_code = 2


class ShardFormatError(PipelineError):
    """A shard is not a well-formed, safe webdataset tar."""


class ShardFetchError(PipelineError):
    """An object could not be read or written: permanent, or transient after all retries."""


class ObjectNotAccessible(ShardFetchError):
    """The object is not there or the credentials may not read it: retrying cannot help."""

    exit_code = 2


class ObjectMissing(ObjectNotAccessible):
    """The object is not there, or is not a regular file: a problem of that one object."""


class ShardCorrupt(ShardFetchError):
    """An object's bytes do not match the digest its manifest records, after every retry."""


class CorruptDataError(PipelineError):
    """More samples were corrupt than the configured tolerance allows."""


class ResumeStateError(PipelineError):
    """A saved loader position does not fit this dataset or loader."""

    exit_code = 2


class BetonWriteError(PipelineError):
    """FFCV's writer failed, hung, or produced no file."""


class DistributedError(PipelineError):
    """A task on the Ray cluster failed for good (its worker or node lost after
    Ray's retries): what finished is kept, a rerun resumes."""
