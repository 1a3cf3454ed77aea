"""Export a trained model as safetensors (weights without pickle) or ONNX (for onnxruntime).

Both formats write ``config.json`` beside the model file: the run config (feature settings included),
the class names, the audioclf version and the format, so an exported folder carries everything
inference needs. ``audioclf.load(FOLDER)`` reads a safetensors export like a run directory. This module
only writes: every saved model, an export included, is read by :mod:`audioclf.checkpoint`, which owns
the file names and the format version written here.

A safetensors export binds its two files: ``config.json`` holds the sha256 of ``model.safetensors``, and
the weights' own metadata hold the config and labels they were exported with. Weights replaced after
export, or a config edited by hand (another sample rate, other labels), are refused on load.

``quantize="int8"`` (ONNX only) stores the weights of the convolutions and matrix products as 8-bit
integers (onnxruntime's dynamic quantization: activations are quantized on the fly, so no calibration
data is needed): a file about 4x smaller. ``config.json`` records ``quantize`` and the largest
probability difference from the fp32 graph on the check batch; docs/outputs.md has accuracy and latency.

ONNX: the whole graph, waveform -> probabilities, through torch's dynamo exporter, which turns
``torch.stft`` into the ONNX ``STFT`` operator (opset >= 17). The older TorchScript exporter cannot:
it refuses an STFT with complex output, which :class:`~audioclf.features.Spectrogram` uses. Where the
waveform graph fails to export or to match PyTorch, the export falls back to log-mel -> probabilities
and says so in ``config.json`` (``"input": "logmel"``); the caller then computes
:class:`~audioclf.features.LogMel` with the saved feature config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .checkpoint import (BOUND_KEY, CONFIG_FILE, EXPORT_FORMAT, ONNX_EXPORT_FILE, RUN_CHECKPOINT, SAFETENSORS_FILE,
                         load_model, saved_extras)
from .config import FeatureConfig, _check_choice
from .errors import AudioclfError
from .fileio import atomic_path, check_output, sha256
from .features import LogMel
from .model import WaveformClassifier, activation
from .trust import TRUST_KEYS

log = logging.getLogger(__name__)

FORMATS = ("onnx", "safetensors")
QUANTIZE = ("int8",)  # export(quantize=...), ONNX only
ONNX_FILE = ONNX_EXPORT_FILE
ONNX_OPSET = 18  # STFT needs >= 17; 18 is what the dynamo exporter emits natively
ONNX_ATOL = 1e-4  # largest probability difference from PyTorch an export may show


def _require(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise AudioclfError(f"exporting needs the {name} package: pip install audioclf[export]") from None


def export(model_path, format: str = "safetensors", out_dir="export", *, quantize: Optional[str] = None) -> Path:
    """Export the model at ``model_path`` (run directory, ``.pt`` or a safetensors export) to ``out_dir``.

    Args:
        model_path: what :func:`audioclf.checkpoint.load_model` accepts.
        format (str): ``"safetensors"`` or ``"onnx"``. (Default: ``"safetensors"``)
        out_dir: folder for the model file and ``config.json``; created if missing, files replaced.
        quantize (str, optional): ``"int8"``: 8-bit weights (ONNX only). (Default: ``None``, fp32)

    Returns:
        The written model file (``model.safetensors`` or ``model.onnx``).
    """
    _check_choice("format", format, FORMATS)
    if quantize is not None:
        _check_choice("quantize", quantize, QUANTIZE)
        if format != "onnx":
            raise AudioclfError(f"quantize={quantize} is for ONNX exports; {format} keeps the fp32 weights of the "
                                f"checkpoint")
    if (Path(out_dir) / RUN_CHECKPOINT).is_file():
        raise AudioclfError(f"{out_dir} holds {RUN_CHECKPOINT}, a training run: export into a folder of its own "
                            f"(a model path must mean one model)")
    source = Path(model_path)  # an export exported into its own folder would be written over as it is read
    out = check_output(out_dir, folder=True, inputs=[source if source.is_dir() else source.parent])
    saved = load_model(model_path)
    model, config, labels = saved
    # the temperature and unknown rule: audioclf.load applies them from config.json; the ONNX graph holds the temperature
    trust = saved_extras(model_path, TRUST_KEYS)
    out.mkdir(parents=True, exist_ok=True)
    bound = {"labels": list(labels), "config": config.to_dict()}
    if format == "safetensors":
        path = _export_safetensors(model, out, bound)
        extra = {"weights_sha256": sha256(path)}
    else:
        path, extra = _export_onnx(model, config.features, out, config.train.task, quantize,
                                   trust.get("temperature", 1.0))
    if saved.thresholds is not None:  # a multilabel model's: a tag is on where its probability reaches them
        extra["thresholds"] = saved.thresholds
    meta = {"format": format, "format_version": EXPORT_FORMAT, "audioclf_version": __version__, **extra, **bound,
            **trust}
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


# --- ONNX --------------------------------------------------------------------------------------------

class LogMelClassifier(nn.Module):
    """Log-mel in, class probabilities out: the network, then softmax or sigmoids (the ONNX fallback graph).

    Args:
        model (nn.Module): a trained network (:func:`audioclf.model.build_network`).
        task (str, optional): ``multiclass`` (softmax) or ``multilabel`` (sigmoids). (Default: ``"multiclass"``)
        temperature (float, optional): divides the logits first (the model's calibration). (Default: ``1.0``)
    """

    def __init__(self, model: nn.Module, task: str = "multiclass", temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.task = task
        self.temperature = float(temperature)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> (batch, n_classes) probabilities."""
        return activation(self.task)(self.model(logmel) / self.temperature)


def _onnx_probs(path: Path, input_name: str, example: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: example.numpy()})[0]


def _onnx_export(module: nn.Module, example: torch.Tensor, input_name: str, path: Path, quantize: Optional[str]) -> dict:
    """Export ``module`` with a dynamic batch axis, then check onnxruntime agrees with PyTorch on ``example``;
    with ``quantize``, quantize the checked graph. Returns what ``config.json`` says of the quantization."""
    batch = torch.export.Dim("batch")
    with atomic_path(path) as tmp:
        torch.onnx.export(module, (example,), str(tmp), dynamo=True, opset_version=ONNX_OPSET,
                          input_names=[input_name], output_names=["probs"], dynamic_shapes=({0: batch},),
                          external_data=False, verbose=False)
        fp32 = _onnx_probs(tmp, input_name, example)
        with torch.no_grad():
            want = module(example).numpy()
        err = float(np.abs(fp32 - want).max())
        if not err <= ONNX_ATOL:
            raise AudioclfError(f"onnxruntime's probabilities differ from PyTorch's by {err:.3g} (> {ONNX_ATOL})")
        if quantize is None:
            return {}
        _quantize_int8(tmp)
        err = float(np.abs(_onnx_probs(tmp, input_name, example) - fp32).max())
    log.info("int8 graph: largest probability difference from fp32 %.3g on the check batch", err)
    return {"quantize": quantize, "quantize_max_abs_diff": err}


def _quantize_int8(path: Path) -> None:
    """Replace the fp32 ONNX graph at ``path`` with its int8 dynamic quantization (weights int8 per output
    channel, activations quantized per batch at run time). The network only: the front end's mel filterbank
    stays fp32, because its input, a power spectrum, spans more decades than 8 bits hold."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path), load_external_data=False).graph
    front_end = [n.name for n in graph.node
                 if any(i.startswith("logmel.") for i in n.input)]  # WaveformClassifier's front end, by its name
    fp32 = path.with_name(path.name + ".fp32")
    quiet = logging.Filter()
    quiet.filter = lambda record: f"{os.sep}onnxruntime{os.sep}" not in record.pathname  # type: ignore[method-assign]
    logging.root.addFilter(quiet)  # the quantizer logs a line per tensor to the root logger
    try:
        path.replace(fp32)
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=front_end)
    finally:
        logging.root.removeFilter(quiet)
        fp32.unlink(missing_ok=True)


def _export_onnx(model: nn.Module, features: FeatureConfig, out: Path, task: str,
                 quantize: Optional[str] = None, temperature: float = 1.0) -> tuple[Path, dict]:
    _require("onnx", "onnxscript", "onnxruntime")
    path = out / ONNX_FILE
    # A batch of 2: an example batch of 1 would let the exporter treat the batch size as a constant.
    wave = 0.1 * torch.randn(2, features.n_samples, generator=torch.Generator().manual_seed(0))
    try:
        extra = _onnx_export(WaveformClassifier(features, model, task, temperature).eval(), wave, "waveform", path,
                             quantize)
        return path, {"input": "waveform", "input_shape": ["batch", features.n_samples], "opset": ONNX_OPSET, **extra}
    except Exception as e:  # the exporter fails in many ways (unsupported op, guard, version); all mean "fall back"
        log.warning("ONNX export of the whole graph (waveform -> probabilities) failed: %s: %s. Exporting "
                    "log-mel -> probabilities instead; compute LogMel with the feature config in %s.",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "", CONFIG_FILE)
    with torch.no_grad():
        logmel = LogMel(features)(wave)
    extra = _onnx_export(LogMelClassifier(model, task, temperature).eval(), logmel, "logmel", path, quantize)
    return path, {"input": "logmel", "input_shape": ["batch", features.n_mels, features.n_frames], "opset": ONNX_OPSET,
                  **extra}
