"""``audioclf embed``: penultimate-layer embeddings of many files, written as ``.npy`` (plus the paths, one
a line) or ``.parquet``. The embeddings themselves are :meth:`audioclf.predict.Classifier.embed_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AudioclfError
from ..fileio import atomic_path, check_output, require_pyarrow, write_parquet
from ..options import PredictOptions
from ..predict import load
from .predict import collect_paths


def _outputs(out: Path) -> list[Path]:
    """The files ``write_embeddings`` writes for ``out``."""
    return [out, out.with_suffix(".paths.txt")] if out.suffix == ".npy" else [out]


def _check_out(out: Path, inputs: Sequence = ()) -> None:
    """Refuse an ``--out`` that cannot hold embeddings, or that would overwrite an input (the paths file
    beside a ``.npy`` included), before any model work."""
    if out.suffix not in (".npy", ".parquet"):
        raise AudioclfError(f"--out {out}: write embeddings to a .npy or .parquet file")
    for path in _outputs(out):
        check_output(path, inputs=inputs)
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
    with atomic_path(_outputs(out)[1]) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in paths))
    return out


def run_embed(model, paths: Sequence[str], *, out, batch_size: int = PredictOptions.batch_size,
              device: str = PredictOptions.device, quiet: bool = False) -> dict:
    """``audioclf embed``: the embedding of every path, written to ``out``.

    Args:
        model (str or Path): run directory, ``.pt`` checkpoint or exported safetensors folder.
        paths (list of str): audio files, folders (recursive) or ``.txt`` files listing paths.
        out (str or Path): ``NAME.npy`` (plus ``NAME.paths.txt``) or ``NAME.parquet``.
        batch_size (int, optional): windows per forward pass. (Default: ``32``)
        device (str, optional): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. (Default: ``"auto"``)
        quiet (bool, optional): no progress bar. (Default: ``False``)

    Returns:
        dict: ``out`` (Path), ``n_files`` (embeddings written), ``failed`` (files that could not be read,
        each named in a warning and left out of ``out``) and ``dim``.

    Raises:
        AudioclfError: before any model work, for an ``out`` that cannot be written or is an input, or for
            inputs that are not files; when no file could be read.
    """
    _check_out(Path(out))
    files = collect_paths(paths)
    _check_out(Path(out), [*paths, *files])
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise AudioclfError(f"{len(missing)} of {len(files)} input(s) are not files, e.g. {missing[0]}: give "
                            f"existing audio files (a row for a missing file would be a made-up embedding)")
    emb = load(model, device=device, batch_size=batch_size).embed_files(files, quiet=quiet)
    ok = np.isfinite(emb).all(axis=1)  # embed_files gives a file that failed a row of NaN: not an embedding
    if not ok.any():
        raise AudioclfError(f"none of the {len(files)} file(s) could be embedded, e.g. {files[0]}; see the warnings")
    written = write_embeddings(out, [str(p) for p, good in zip(files, ok) if good], emb[ok])
    return {"out": written, "n_files": int(ok.sum()), "failed": int((~ok).sum()), "dim": emb.shape[1]}
