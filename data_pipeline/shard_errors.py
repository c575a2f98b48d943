"""The shard errors, apart from shards.py so that remote.py (which shards.py reads remote splits
through) can raise them without importing shards.py back."""


class ShardFormatError(ValueError):
    """A split directory or shard file that this version cannot read."""


class CorruptShardError(ShardFormatError):
    """A shard whose bytes do not match its index entry."""
