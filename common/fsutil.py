"""Crash-safe file writes: a reader sees the old file or the complete new one, never a torn one."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"  # temp files are `.NAME.tmp-HOST-PID-RANDOM`: unique across nodes of a Slurm array


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then `os.replace` over `path`."""
    path = Path(path)
    # host + pid + random: parts of one build on different nodes share the directory (pids collide)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Persist a directory entry (a rename) itself; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | Path) -> int:
    """Delete temp files a killed writer left behind; call only when no writer can be active."""
    n = 0
    for p in Path(directory).glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
