"""Files: the one atomic write (a crash, a full disk or Ctrl-C never leaves a half-written file in place)
and the one file hash."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary name next to ``path``; move it into place only when the block succeeds.

    A crash mid-write leaves the previous file intact, and a full disk or Ctrl-C leaves no half-written
    temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks so a large weights file never sits in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
