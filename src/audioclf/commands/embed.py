"""``audioclf embed``: penultimate-layer embeddings of many files, written as ``.npy`` (plus the paths, one
a line) or ``.parquet``. The embeddings themselves are :meth:`audioclf.predict.Classifier.embed_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AudioclfError
from ..fileio import atomic_path, require_pyarrow, write_parquet
from ..predict import load
from .predict import collect_paths


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot hold embeddings, before any model work."""
    if out.suffix not in (".npy", ".parquet"):
        raise AudioclfError(f"--out {out}: write embeddings to a .npy or .parquet file")
    if not out.parent.is_dir():
        raise AudioclfError(f"--out {out}: folder {out.parent} does not exist")
    if out.suffix == ".parquet":
        require_pyarrow()


def write_embeddings(out, paths: Sequence[str], emb: np.ndarray) -> Path:
    """``.npy``: the array, plus ``<stem>.paths.txt`` with one path per row; ``.parquet``: a ``path`` column
    and one ``embedding`` list column (needs pyarrow: the ``parquet`` extra)."""
    out = Path(out)
    if out.suffix == ".parquet":
        return write_parquet(out, {"path": list(paths), "embedding": list(emb.astype(np.float32))}, {"path": str})
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, emb.astype(np.float32))
    with atomic_path(out.with_suffix(".paths.txt")) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in paths))
    return out


def run_embed(model, paths: Sequence[str], *, out, batch_size: int = 32, device: str = "auto",
              quiet: bool = False) -> dict:
    """``audioclf embed``: the embedding of every path, written to ``out``.

    Args:
        model (str or Path): run directory, ``.pt`` checkpoint or exported safetensors folder.
        paths (list of str): audio files, folders (recursive) or ``.txt`` files listing paths.
        out (str or Path): ``NAME.npy`` (plus ``NAME.paths.txt``) or ``NAME.parquet``.
        batch_size (int, optional): windows per forward pass. (Default: ``32``)
        device (str, optional): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. (Default: ``"auto"``)
        quiet (bool, optional): no progress bar. (Default: ``False``)

    Returns:
        dict: ``out`` (Path), ``n_files`` and ``dim``; a file that cannot be read has a row of NaN.
    """
    _check_out(Path(out))
    files = collect_paths(paths)
    emb = load(model, device=device, batch_size=batch_size).embed_files(files, quiet=quiet)
    written = write_embeddings(out, [str(p) for p in files], emb)
    return {"out": written, "n_files": len(files), "dim": emb.shape[1]}
