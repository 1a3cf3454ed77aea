"""``audioclf audit DATA --out DIR``: check the output folder and ``--probs`` before any work, audit the
dataset (:func:`audioclf.audit.audit_dataset`), write the report (:mod:`audioclf.audit_report`) and return
the printed summary.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..audit_report import summary_lines, write_report
from ..config import DataConfig
from ..errors import AudioclfError


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that cannot hold the report: a file, or a folder this user cannot write; made when
    missing, and tried with a temporary file, so a long audit never ends on an unwritable folder."""
    if out.exists() and not out.is_dir():
        raise AudioclfError(f"--out {out} is a file; name a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise AudioclfError(f"--out {out}: cannot write there ({e.strerror})") from None


def run_audit(data: DataConfig, *, out, probs=None, quiet: bool = False, **options) -> dict:
    """``audioclf audit``: the report in ``out`` and the summary.

    Args:
        data (DataConfig): the dataset.
        out (str or Path): the report's folder, made when missing.
        probs (str or Path, optional): out-of-fold probabilities: a CSV or an ``audioclf cv`` folder.
        quiet (bool, optional): no progress bars. (Default: ``False``)
        options: the other keywords of :func:`audioclf.audit.audit_dataset` (backbone, weights_path,
            near_threshold, device, batch_size, seed).

    Returns:
        dict: ``report`` (the ``audit.json`` dict), ``summary`` (lines to print) and ``out``.
    """
    from ..audit import audit_dataset

    out = Path(out)
    check_out_folder(out)
    if probs is not None and not os.path.exists(probs):
        raise AudioclfError(f"--probs {probs}: no such file or folder; give a CSV of out-of-fold probabilities or "
                            f"an audioclf cv folder")
    result = audit_dataset(data, probs=probs, quiet=quiet, **options)
    report = write_report(result, data, out)
    return {"report": report, "summary": summary_lines(report), "out": out}
