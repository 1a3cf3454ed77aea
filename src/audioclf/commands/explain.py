"""``audioclf explain MODEL FILE --out x.png``: check ``--out`` before the model loads, explain the model's
answer for the file (:func:`audioclf.explain.explain`) and draw it (:func:`audioclf.explain.plot_explanation`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import AudioclfError
from ..options import PredictOptions


def check_png_out(out: Path) -> None:
    """Refuse an ``--out`` that is not a ``.png`` file in a folder this user can write."""
    if out.suffix.lower() != ".png":
        raise AudioclfError(f"--out {out}: the explanation is drawn as a PNG; name a .png file")
    if out.is_dir():
        raise AudioclfError(f"--out {out} is a folder; name a .png file")
    if not out.parent.is_dir():
        raise AudioclfError(f"--out {out}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise AudioclfError(f"--out {out}: the folder {out.parent} is not writable")


def run_explain(model, path, *, out, label: Optional[str] = None, device: str = PredictOptions.device,
                batch_size: int = PredictOptions.batch_size) -> dict:
    """``audioclf explain``: the PNG in ``out``; returns :func:`audioclf.explain.explain`'s dict with ``out``."""
    from ..explain import explain, plot_explanation

    out = Path(out)
    check_png_out(out)
    result = explain(model, path, label=label, device=device, batch_size=batch_size)
    result["out"] = plot_explanation(result, out)
    return result
