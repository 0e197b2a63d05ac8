"""The errors of shard sets, below both the format (:mod:`matting_pipeline.shards`) and the store
(:mod:`matting_pipeline.shard_store`), so that each raises them without importing the other.
``matting_pipeline.shards`` re-exports them: import them from there."""

from __future__ import annotations

__all__ = ["ShardError", "ShardIntegrityError", "UnsafeMemberError"]


class ShardError(ValueError):
    """A shard set is missing, malformed or inconsistent with its index."""


class ShardIntegrityError(ShardError):
    """A shard's bytes do not match the sha256 (or sample count) recorded in the index."""


class UnsafeMemberError(ShardError):
    """A tar member has an absolute path, ``..``, a non-file type or an unexpected name."""
