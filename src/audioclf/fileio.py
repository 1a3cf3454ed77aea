"""Files: the one atomic write (a crash, a full disk or Ctrl-C never leaves a half-written file in place),
the one file hash and the one Parquet writer."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import AudioclfError

PARQUET_INSTALL = 'pip install "audioclf[parquet]"'


def _umask() -> int:
    """The process's umask. os.umask can only be read by setting it, so it is read once, at import, before
    any thread of ours could create a file in between."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# the mode open() gives a new file; some writers (safetensors) create theirs 0600 whatever the umask
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_path(path):
    """Yield a temporary name next to ``path``; move it into place only when the block succeeds.

    A crash mid-write leaves the previous file intact, and a full disk or Ctrl-C leaves no half-written
    temp file behind. The file gets the mode of any new file (``0666`` less the umask), whatever the writer
    created it with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, FILE_MODE)
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


def require_pyarrow():
    """The ``pyarrow`` module, or an AudioclfError naming the extra that installs it: checked before any
    model work by a command that will write Parquet."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 (a submodule pyarrow does not import by itself)
    except ImportError:
        raise AudioclfError(f"writing .parquet needs pyarrow, an optional dependency: {PARQUET_INSTALL}") from None
    return pyarrow


def write_parquet(path, columns: dict[str, list], types: Optional[dict[str, type]] = None) -> Path:
    """Write ``columns`` (name -> one value per row; ``None`` is null) to the Parquet file ``path``, atomically.

    ``types`` maps a column to ``str`` or ``float`` where pyarrow could not infer it: a column of nulls only
    (every file failed, or none did) would otherwise get the null type. Other columns are inferred (a list of
    float32 arrays becomes ``list<float>``).
    """
    pa = require_pyarrow()
    arrow, types = {str: pa.string(), float: pa.float64()}, types or {}
    table = pa.table({name: pa.array(values, type=arrow.get(types.get(name))) for name, values in columns.items()})
    with atomic_path(path) as tmp:
        pa.parquet.write_table(table, tmp)
    return Path(path)



def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)

def read_parsed(path, parse: Callable[[str], Any], parse_error: type[Exception] | tuple, what: str, language: str) -> Any:
    """``parse`` of the text of ``path``; a file that cannot be read, or that ``parse`` refuses with
    ``parse_error``, is an AudioclfError naming ``what`` (e.g. "config file"), the path and the reason."""
    path = Path(path)
    try:
        return parse(path.read_text())
    except OSError as e:
        raise AudioclfError(f"cannot read {what} {path}: {e.strerror}") from None
    except parse_error as e:
        raise AudioclfError(f"{what} {path} is not valid {language}: {e}") from None
