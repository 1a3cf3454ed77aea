"""Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one in place."""

from __future__ import annotations

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
