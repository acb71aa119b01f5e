"""Object-store access: where a URL points (``urls``; credentials are kept out of
messages by ``infra.redact``), which errors heal by retrying (``retry``), verified ranged
shard fetches (``store``), the node-shared shard cache (``cache``) and atomic
writes and hashing of objects (``objects``). ``StorageConfig`` says how."""

from pipeline.storage.config import RetryPolicy, StorageConfig

__all__ = ["RetryPolicy", "StorageConfig"]
