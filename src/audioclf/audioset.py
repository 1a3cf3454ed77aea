"""AudioSet tags without training: an AudioSet-pretrained backbone with its own 527-class head kept.

``audioclf.load("mn04_as")``, ``audioclf tag``, ``audioclf serve mn04_as`` and ``audioclf detect mn04_as``
all come through :func:`pretrained_model`: the official weights (``--weights PATH``, the torch hub
cache or the official URL, as training fetches them), the backbone's front end, 10-s windows (AudioSet's
clip length) and one sigmoid per class. The class names ship with the package
(``labels/audioset_class_labels_indices.csv``, CC BY 4.0; see ``labels/README.md``).
"""

from __future__ import annotations

import csv
import importlib.resources
import io
from pathlib import Path
from typing import Optional

from .backbones import BACKBONES
from .config import resolve
from .errors import AudioclfError

LABELS_FILE = "labels/audioset_class_labels_indices.csv"
N_CLASSES = 527
CLIP_S = 10.0  # AudioSet's clips: the length the heads were trained on


def audioset_labels() -> list[str]:
    """The 527 AudioSet display names, in the order of the pretrained heads' outputs."""
    text = importlib.resources.files("audioclf").joinpath(LABELS_FILE).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if [int(r["index"]) for r in rows] != list(range(N_CLASSES)):
        raise AudioclfError(f"audioclf/{LABELS_FILE}: expected indices 0..{N_CLASSES - 1}; reinstall audioclf")
    return [r["display_name"] for r in rows]


def tagging_backbones() -> list[str]:
    """Backbones whose published weights carry AudioSet's head."""
    return [name for name, b in BACKBONES.items() if b.pretrained_on == "audioset"]


def is_backbone_name(model) -> bool:
    """True for the name of an AudioSet backbone (``mn04_as``) that is not also a file or folder here."""
    return isinstance(model, str) and model in tagging_backbones() and not Path(model).exists()


def pretrained_model(name: str, weights_path: Optional[str] = None):
    """``(network, config, labels)`` of AudioSet backbone ``name`` with its 527-class head, untrained by us,
    as :func:`audioclf.checkpoint.load_model` gives a saved one (:func:`audioclf.predict.load` makes the
    Classifier).

    Args:
        name (str): an AudioSet backbone (``mn04_as`` ... ``mn40_as``).
        weights_path (str, optional): a local copy of its official weights file. (Default: the torch hub
            cache, downloaded there on first use)

    Raises:
        AudioclfError: ``name`` is not an AudioSet backbone, or its weights cannot be had (offline: the
            message names the file, its URL and where to put it).
    """
    from .model import AudioMobileNet
    from .weights import load_state_dict

    if name not in tagging_backbones():
        raise AudioclfError(f"backbone={name!r} has no AudioSet head; choose one of {', '.join(tagging_backbones())}")
    config = resolve("default", overrides={"model": {"backbone": name, "pretrained": "audioset",
                                                     "weights_path": weights_path},
                                           "features": {"duration_s": CLIP_S}, "train": {"task": "multilabel"}})
    net = AudioMobileNet(N_CLASSES, BACKBONES[name].width, config.model.dropout, "mean")  # AudioSet's own head averages
    net.load_pretrained(load_state_dict(name, weights_path), name, keep_head=True)
    return net.eval(), config, audioset_labels()
