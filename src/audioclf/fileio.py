"""Files: the one atomic write (a crash, a full disk or Ctrl-C never leaves a half-written file in place),
the one check that an output can be written, the one file hash and the one Parquet writer."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

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


def check_output(path, *, folder: bool = False, inputs: Iterable = (), what: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written or that would overwrite an input.

    Every command that writes calls this first, so that hours of work never end in "cannot write".

    Args:
        path: the output: a file in an existing folder (written by :func:`atomic_path` beside itself) or,
            with ``folder``, a folder (made when missing).
        folder (bool, optional): whether ``path`` is a folder. (Default: ``False``)
        inputs (iterable of paths, optional): the command's inputs; none may be the output. (Default: none)
        what (str, optional): how messages name the output. (Default: ``"--out"``)

    Raises:
        AudioclfError: naming the output and the reason: a folder where a file is wanted or the other way
            round, a path under a file, a folder this process may not write in (read-only, ``/proc``, ...),
            or an output that is one of ``inputs``.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise AudioclfError(f"{what} {path} is a file; give a folder (new or existing)")
    if not folder and path.is_dir():
        raise AudioclfError(f"{what} {path} is a folder; name a file")
    if not folder and not path.parent.is_dir():  # a typo in a folder name is more likely than a wish for it
        raise AudioclfError(f"{what} {path}: the folder {path.parent} does not exist"
                            + (" (it is a file)" if path.parent.exists() else ""))
    # the nearest folder that exists: a new output folder, and any folder above it, are made in it
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AudioclfError(f"{what} {path}: {existing} is a file, so nothing can be written under it")
    try:  # a real write: os.access says yes to root in a read-only mount and in /proc
        fd, probe = tempfile.mkstemp(prefix=".audioclf-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AudioclfError(f"{what} {path}: cannot write in the folder {existing} ({e.strerror}); choose "
                            f"another place") from None
    target = path.resolve()
    for p in map(Path, inputs):
        if p.resolve() == target or (path.exists() and p.exists() and os.path.samefile(p, path)):
            raise AudioclfError(f"{what} {path} is also an input ({p}): writing it would destroy that input; "
                                f"choose another name")
    return path


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet takes a cell starting so for a formula


def csv_cell(value):
    """``value`` made safe for a spreadsheet: text that starts like a formula (``=``, ``+``, ``-``, ``@``) gets a
    leading ``'``, so that a class or file name such as ``=HYPERLINK(...)`` is shown, never run. Numbers, and
    text that reads as one (``-0.5``), and a lone sign (``-`` is stdin) are kept."""
    if not isinstance(value, str) or len(value) < 2 or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


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
        return parse(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AudioclfError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise AudioclfError(f"{what} {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
    except parse_error as e:
        raise AudioclfError(f"{what} {path} is not valid {language}: {e}") from None


# Bounds on a YAML document, checked as it is read, before anything is built from it
YAML_MAX_DEPTH = 64  # nested mappings and lists
YAML_MAX_NODES = 100_000  # values, counting each alias as the whole of what it names (an alias bomb is huge)


def _strict_loader():
    """yaml.SafeLoader that refuses a duplicate key (else the last one wins, silently), nesting deeper than
    YAML_MAX_DEPTH (PyYAML recurses: a RecursionError) and more than YAML_MAX_NODES values once aliases are
    expanded (a few hundred bytes of nested aliases name billions), with the line of each problem."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._depth, self._sizes, self._total = 0, {}, 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                node = super().compose_node(parent, index)
                self._count(self._sizes.get(id(node), 1), node)
                return node
            self._depth += 1
            if self._depth > YAML_MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise yaml.YAMLError(f"nested more than {YAML_MAX_DEPTH} deep (line {line})")
            before = self._total
            node = super().compose_node(parent, index)
            self._depth -= 1
            self._sizes[id(node)] = self._total - before + 1
            self._count(1, node)
            return node

        def _count(self, n: int, node) -> None:
            self._total += n
            if self._total > YAML_MAX_NODES:
                raise yaml.YAMLError(f"more than {YAML_MAX_NODES} values once its aliases are expanded (line "
                                     f"{node.start_mark.line + 1}): an alias bomb?")

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    continue  # an unhashable key: SafeLoader refuses it itself
                if key in seen:
                    raise yaml.YAMLError(f"the key {key!r} appears twice (line {key_node.start_mark.line + 1}); "
                                         f"keep one")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def read_yaml(path, what: str = "config file") -> Any:
    """The YAML document in ``path``, read with the bounds above; any problem is an AudioclfError naming
    ``what`` and the path."""
    import yaml

    loader = _strict_loader()
    return read_parsed(path, lambda text: yaml.load(text, Loader=loader), (yaml.YAMLError, RecursionError), what,
                       "YAML")


def torch_load(path, what: str, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` onto ``map_location``, with any failure an AudioclfError that names
    ``path``, says what is wrong (truncated, not a PyTorch file, objects a safe load refuses) and what to do.
    Never the loader's advice to load unsafely: a file the safe loader refuses may run code."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if path.is_dir():
        raise AudioclfError(f"{path}: a folder; give the {what} file itself")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise AudioclfError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) (\S+)", str(e))
        if found is None:  # random bytes fail unpickling too
            raise AudioclfError(f"{path}: not a readable {what} (not a PyTorch file)") from None
        raise AudioclfError(f"{path}: holds Python objects ({found[1]}) beyond tensors and plain values, which could "
                            f"run code when loaded, so it is refused; use a file written by audioclf, or the official "
                            f"one") from None
    except Exception as e:  # torch.load fails on a damaged or foreign file with many error types
        size = path.stat().st_size
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"
        if zipped and not zipfile.is_zipfile(path):
            raise AudioclfError(f"{path}: not a readable {what}: truncated or damaged ({size} bytes; its end is "
                                f"missing), as when the process writing it was stopped; use another copy") from None
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file raises a bare EOFError
        raise AudioclfError(f"{path}: not a readable {what} ({reason})") from None
