"""Export a trained model as safetensors (weights without pickle) or ONNX (for onnxruntime).

Both formats write ``config.json`` beside the model file: the run config (feature settings included),
the class names, the audioclf version and the format, so an exported folder carries everything
inference needs. ``audioclf.load(FOLDER)`` reads a safetensors export like a run directory.

A safetensors export binds its two files: ``config.json`` holds the sha256 of ``model.safetensors``, and
the weights' own metadata hold the config and labels they were exported with. Weights replaced after
export, or a config edited by hand (another sample rate, other labels), are refused on load.

ONNX: the whole graph, waveform -> probabilities, through torch's dynamo exporter, which turns
``torch.stft`` into the ONNX ``STFT`` operator (opset >= 17). The older TorchScript exporter cannot:
it refuses an STFT with complex output, which :class:`~audioclf.features.Spectrogram` uses. Where the
waveform graph fails to export or to match PyTorch, the export falls back to log-mel -> probabilities
and says so in ``config.json`` (``"input": "logmel"``); the caller then computes
:class:`~audioclf.features.LogMel` with the saved feature config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .checkpoint import RUN_CHECKPOINT, load_model, model_from_checkpoint
from .fileio import atomic_path
from .config import AudioclfError, FeatureConfig, RunConfig, _check_choice
from .features import LogMel
from .model import WaveformClassifier

log = logging.getLogger(__name__)

FORMATS = ("onnx", "safetensors")
FORMAT_VERSION = 2  # of config.json; bump when older code can no longer read an export (2: weights bound)
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 18  # STFT needs >= 17; 18 is what the dynamo exporter emits natively
ONNX_ATOL = 1e-4  # largest probability difference from PyTorch an export may show


def _require(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise AudioclfError(f"exporting needs the {name} package: pip install audioclf[export]") from None


def export(model_path, format: str = "safetensors", out_dir="export") -> Path:
    """Export the model at ``model_path`` (run directory, ``.pt`` or a safetensors export) to ``out_dir``.

    Args:
        model_path: what :func:`audioclf.checkpoint.load_model` accepts.
        format (str): ``"safetensors"`` or ``"onnx"``. (Default: ``"safetensors"``)
        out_dir: folder for the model file and ``config.json``; created if missing, files replaced.

    Returns:
        The written model file (``model.safetensors`` or ``model.onnx``).
    """
    _check_choice("format", format, FORMATS)
    out = Path(out_dir)
    if (out / RUN_CHECKPOINT).is_file():
        raise AudioclfError(f"{out} holds {RUN_CHECKPOINT}, a training run: export into a folder of its own "
                            f"(a model path must mean one model)")
    model, config, labels = load_model(model_path)
    out.mkdir(parents=True, exist_ok=True)
    bound = {"labels": list(labels), "config": config.to_dict()}
    if format == "safetensors":
        path = _export_safetensors(model, out, bound)
        extra = {"weights_sha256": _sha256(path)}
    else:
        path, extra = _export_onnx(model, config.features, out)
    meta = {"format": format, "format_version": FORMAT_VERSION, "audioclf_version": __version__, **extra, **bound}
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("exported %s to %s", format, path)
    return path


# --- safetensors -------------------------------------------------------------------------------------

def _export_safetensors(model: nn.Module, out: Path, bound: dict) -> Path:
    _require("safetensors")
    from safetensors.torch import save_file

    # state_dict holds the normalisation statistics (norm.mean, norm.std) as buffers.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = out / SAFETENSORS_FILE
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "audioclf_version": __version__,
                                        BOUND_KEY: json.dumps(bound, sort_keys=True)})
    return path


BOUND_KEY = "audioclf_config"  # safetensors metadata: the config and labels the weights were exported with


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _differences(a, b, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [f"{where[:-1]}={a!r} in {CONFIG_FILE}, {b!r} in the weights"]


def read_export_config(folder) -> dict:
    """``config.json`` of an export folder, checked to be one this version of audioclf understands."""
    path = Path(folder) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except OSError as e:
        raise AudioclfError(f"{path}: cannot read the export's config ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise AudioclfError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not {"format", "config", "labels"} <= set(meta):
        raise AudioclfError(f"{path}: not an audioclf export config (it must hold format, config and labels)")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AudioclfError(f"{path}: format_version={version!r} must be a whole number >= 1")
    if version > FORMAT_VERSION:
        raise AudioclfError(f"{path}: export format {meta['format_version']} was written by audioclf "
                            f"{meta.get('audioclf_version')}; this is audioclf {__version__} (format "
                            f"{FORMAT_VERSION}). Upgrade audioclf to read it.")
    return meta


def is_safetensors_export(path) -> bool:
    """True for a folder written by ``export(..., format="safetensors")``, or the ``.safetensors`` file in one.

    Raises:
        AudioclfError: for a folder that holds both an export and a training run's ``best.pt``: which of
            the two it means is not for audioclf to guess.
    """
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors"
    if not (p / SAFETENSORS_FILE).is_file():
        return False
    if (p / RUN_CHECKPOINT).is_file():
        raise AudioclfError(f"{p} holds both {RUN_CHECKPOINT} (a training run) and {SAFETENSORS_FILE} (an export); "
                            f"name the one to use: {p / RUN_CHECKPOINT} or {p / SAFETENSORS_FILE}")
    return True


def load_safetensors(path) -> tuple[nn.Module, RunConfig, list[str]]:
    """Rebuild the model (eval mode, CPU), its config and class names from a safetensors export (its folder
    or its weights file), refusing weights and a config that do not belong together."""
    _require("safetensors")
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    weights = Path(path) if Path(path).is_file() else Path(path) / SAFETENSORS_FILE
    folder = weights.parent
    meta = read_export_config(folder)
    if meta["format"] != "safetensors":
        raise AudioclfError(f"{folder / CONFIG_FILE}: format={meta['format']!r}, expected 'safetensors'")
    try:
        state = load_file(weights)
        with safe_open(weights, "pt") as f:
            stored = (f.metadata() or {}).get(BOUND_KEY)
    except (OSError, SafetensorError) as e:
        raise AudioclfError(f"{weights}: not a readable safetensors file ({e})") from None
    if meta.get("format_version", 1) >= 2:  # exports before version 2 carry no binding
        _check_bound(meta, weights, stored)
    return model_from_checkpoint({"config": meta["config"], "labels": meta["labels"], "model": state}, weights)


def _check_bound(meta: dict, weights: Path, stored) -> None:
    """The weights are the ones ``config.json`` was written with, and the config the one they were trained with."""
    config_path = weights.parent / CONFIG_FILE
    expected = meta.get("weights_sha256")
    if not isinstance(expected, str):
        raise AudioclfError(f"{config_path}: weights_sha256 is missing or not a string; export the model again")
    if _sha256(weights) != expected:
        raise AudioclfError(f"{weights}: its sha256 is not the weights_sha256 in {config_path}: the weights were "
                            f"changed or replaced after export; export the model again")
    try:
        bound = json.loads(stored)
    except (TypeError, json.JSONDecodeError):
        raise AudioclfError(f"{weights}: no readable {BOUND_KEY} in its metadata; export the model again") from None
    diff = _differences({"labels": meta["labels"], "config": meta["config"]}, bound)
    if diff:
        raise AudioclfError(f"{config_path} does not match the config the weights were exported with: "
                            f"{'; '.join(diff[:3])}")


# --- ONNX --------------------------------------------------------------------------------------------

class LogMelClassifier(nn.Module):
    """Log-mel in, class probabilities out: nn.Module -> softmax (the ONNX fallback graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> (batch, n_classes) probabilities."""
        return torch.softmax(self.model(logmel), dim=-1)


def _onnx_export(module: nn.Module, example: torch.Tensor, input_name: str, path: Path) -> None:
    """Export ``module`` with a dynamic batch axis, then check onnxruntime agrees with PyTorch on ``example``."""
    import onnxruntime as ort

    batch = torch.export.Dim("batch")
    with atomic_path(path) as tmp:
        torch.onnx.export(module, (example,), str(tmp), dynamo=True, opset_version=ONNX_OPSET,
                          input_names=[input_name], output_names=["probs"], dynamic_shapes=({0: batch},),
                          external_data=False, verbose=False)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {input_name: example.numpy()})[0]
        with torch.no_grad():
            want = module(example).numpy()
        err = float(np.abs(got - want).max())
        if not err <= ONNX_ATOL:
            raise AudioclfError(f"onnxruntime's probabilities differ from PyTorch's by {err:.3g} (> {ONNX_ATOL})")


def _export_onnx(model: nn.Module, features: FeatureConfig, out: Path) -> tuple[Path, dict]:
    _require("onnx", "onnxscript", "onnxruntime")
    path = out / ONNX_FILE
    # A batch of 2: an example batch of 1 would let the exporter treat the batch size as a constant.
    wave = 0.1 * torch.randn(2, features.n_samples, generator=torch.Generator().manual_seed(0))
    try:
        _onnx_export(WaveformClassifier(features, model).eval(), wave, "waveform", path)
        return path, {"input": "waveform", "input_shape": ["batch", features.n_samples], "opset": ONNX_OPSET}
    except Exception as e:  # the exporter fails in many ways (unsupported op, guard, version); all mean "fall back"
        log.warning("ONNX export of the whole graph (waveform -> probabilities) failed: %s: %s. Exporting "
                    "log-mel -> probabilities instead; compute LogMel with the feature config in %s.",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "", CONFIG_FILE)
    with torch.no_grad():
        logmel = LogMel(features)(wave)
    _onnx_export(LogMelClassifier(model).eval(), logmel, "logmel", path)
    return path, {"input": "logmel", "input_shape": ["batch", features.n_mels, features.n_frames], "opset": ONNX_OPSET}
