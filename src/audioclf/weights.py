"""Pretrained weights of every backbone (ResNet-18's ImageNet file and the AudioSet MobileNets'): from
``--weights PATH``, the torch hub cache, or the official URL (with a progress bar), checked against the
pinned sha256, or the published prefix of it, where one is known. The one place audioclf fetches weights
or knows where the cache is; torchvision is not needed.

Offline with nothing cached, the error names the file, the URL and where to put it; never a urllib
traceback.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
from pathlib import Path
from typing import Optional

import torch

from .backbones import BACKBONES, Backbone
from .errors import AudioclfError
from .fileio import sha256, torch_load

log = logging.getLogger(__name__)


def hub_path(backbone: Backbone) -> Path:
    """Where the official file is looked for and downloaded to: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone.weights_file


def status(name: str) -> str:
    """``cached`` (in the torch hub cache) or ``downloadable`` (from the official URL, when online)."""
    return "cached" if hub_path(BACKBONES[name]).is_file() else "downloadable"


def _pinned(backbone: Backbone) -> str:
    # a full pinned digest is its own prefix, so one comparison serves both
    return backbone.sha256 or backbone.sha256_prefix


def _check_hash(path: Path, backbone: Backbone, given: bool = False) -> None:
    """The file is the official one of ``backbone``, else an AudioclfError that says whose it is when it is
    another backbone's official file; ``given`` (a --weights file, not the cache's) is never to be deleted."""
    if not _pinned(backbone):
        return
    digest = sha256(path)
    if digest.startswith(_pinned(backbone)):
        return
    other = next((name for name, b in BACKBONES.items() if _pinned(b) and digest.startswith(_pinned(b))), None)
    if other is not None:
        raise AudioclfError(f"{path}: the official weights of {other}, not of {backbone.name}; give --backbone "
                            f"{other}, or the {backbone.name} file {backbone.weights_file} ({backbone.weights_url})")
    official = f"{_pinned(backbone)}{'' if backbone.sha256 else '...'}"
    todo = f"give that file ({backbone.weights_url})" if given else f"delete it, or download {backbone.weights_url} again"
    raise AudioclfError(f"{path}: sha256 {digest} is not that of the official {backbone.weights_file} ({official}): "
                        f"another model's weights, or a damaged copy; {todo}")


def _download(url: str, dest: Path, timeout_s: float = 60.0) -> None:
    # torch's downloader: a progress bar, a temp file moved into place only when complete. It takes no
    # timeout, and a network that drops packets would otherwise hang a training run forever.
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    finally:
        socket.setdefaulttimeout(old)


def weights_file(name: str, weights_path: Optional[str] = None, download: bool = True) -> Path:
    """The checked file of backbone ``name``'s pretrained weights.

    Args:
        name (str): a key of :data:`audioclf.backbones.BACKBONES`.
        weights_path (str, optional): a local copy of the official file; its hash is checked where one is
            pinned.
        download (bool, optional): fetch the official file into the torch hub cache when it is not there.
            (Default: ``True``)

    Raises:
        AudioclfError: the file is missing or damaged, or cannot be downloaded (the message says from where,
            and where to put it by hand).
    """
    b = BACKBONES[name]
    if weights_path:
        path = Path(weights_path)
        if path.is_dir():
            raise AudioclfError(f"--weights {path}: a folder; give the weights file itself ({b.weights_file})")
        if not path.is_file():
            raise AudioclfError(f"--weights {path}: no such file")
        _check_hash(path, b, given=True)
        return path
    path = hub_path(b)
    if not path.is_file():
        if not download:
            raise AudioclfError(f"{b.weights_file} is not in the torch hub cache ({path.parent})")
        log.info("downloading %s pretrained weights from %s", name, b.weights_url)
        try:
            _download(b.weights_url, path)
        except (urllib.error.URLError, OSError, ValueError) as e:  # offline, refused, cut short, disk full
            reason = getattr(e, "reason", None) or e
            raise AudioclfError(
                f"cannot download the {name} weights {b.weights_file} ({reason}). Download {b.weights_url} "
                f"by hand and put it at {path} (or set TORCH_HOME, or pass --weights PATH), or train from "
                f"scratch with --pretrained none") from None
    _check_hash(path, b)
    return path


def load_state_dict(name: str, weights_path: Optional[str] = None) -> dict:
    """Backbone ``name``'s pretrained state dict (see :func:`weights_file` for where it comes from)."""
    path = weights_file(name, weights_path)
    sd = torch_load(path, f"{name} weights file")
    sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AudioclfError(f"{path}: not a state dict of tensors")
    return sd
