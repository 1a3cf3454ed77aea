"""Saved models: the checkpoint format, and the one reader of every kind of saved model.

A model path is one of:

- a run directory: its ``best.pt``;
- a ``.pt`` checkpoint (``best.pt``, ``last.pt``): :func:`load_checkpoint`;
- a safetensors export (its folder: ``config.json`` + ``model.safetensors``, or the ``.safetensors`` file):
  :func:`load_safetensors`.

:func:`load_model` takes any of them. Every kind passes the same two checks: :func:`check_format` (written
by a newer audioclf? then "Upgrade audioclf") and :func:`model_from_checkpoint` (the config through
``RunConfig.from_saved``, the labels, and the weights against the network those two describe).
``export.py`` writes exports and takes their file names and format version from here; nothing here imports
it.

Checkpoint keys: ``format`` (int), ``audioclf_version``, ``config`` (RunConfig as a dict), ``labels`` (class
names) and ``model`` (state dict, normalisation statistics included): what :func:`inference_state` holds.
A multilabel model's ``best.pt`` adds ``thresholds``: each class's decision threshold (floats, labels order).
Training adds ``epoch`` and ``best_val_loss``, and in ``last.pt`` also ``optimizer``, ``scheduler``,
``best_epoch`` and ``bad_epochs`` for ``--resume``; every random draw of an epoch comes from generators
seeded by (seed, epoch, rank), so no RNG state is saved. The network (``config.model.backbone``) and its
front end come from the file, never from flags.

An export's ``config.json`` holds ``format`` (``"safetensors"`` or ``"onnx"``), ``format_version``,
``audioclf_version``, ``config``, ``labels`` and, for a multilabel model, ``thresholds`` (left out of the
binding below, so that they may be tuned by hand); a safetensors export adds ``weights_sha256``, and its
weights' metadata hold the config and labels under ``audioclf_config``, so that weights replaced after
export, or a config edited by hand, are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ._version import __version__
from .config import RunConfig
from .errors import AudioclfError
from .fileio import atomic_path, read_parsed, sha256, torch_load
from .model import build_network

log = logging.getLogger(__name__)

FORMAT = 1  # of a checkpoint; bump when a checkpoint written by this version can no longer be read by older code
EXPORT_FORMAT = 2  # config.json's format_version; bump likewise for exports (2: weights and config bound)
RUN_CHECKPOINT = "best.pt"  # what a run directory means as a model
CONFIG_FILE = "config.json"  # an export's config, beside its model file
SAFETENSORS_FILE = "model.safetensors"
ONNX_EXPORT_FILE = "model.onnx"
BOUND_KEY = "audioclf_config"  # safetensors metadata: the config and labels the weights were exported with
CHECKPOINT_BOUND_KEY = "config_sha256"  # a checkpoint's: the digest of its config and labels


# --- writing checkpoints -----------------------------------------------------------------------------

def _config_digest(state: dict) -> str:
    """sha256 of the config and labels in ``state``: stored with the weights, so that an edit to either is seen."""
    text = json.dumps({"config": state.get("config"), "labels": state.get("labels")}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def save_checkpoint(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically, stamped with the format, the audioclf version and the digest
    of its config and labels (:data:`CHECKPOINT_BOUND_KEY`), which :func:`load_checkpoint` checks."""
    state = {k: v for k, v in state.items() if k != CHECKPOINT_BOUND_KEY}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "audioclf_version": __version__, **state,
                    CHECKPOINT_BOUND_KEY: _config_digest(state)}, tmp)


def inference_state(model: torch.nn.Module, config: RunConfig, labels: list[str], extra: Optional[dict] = None) -> dict:
    """The minimum a checkpoint needs for inference (config, labels, weights on the CPU), plus ``extra``."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"config": config.to_dict(), "labels": list(labels), "model": sd, **(extra or {})}


# --- the checks every saved model passes -------------------------------------------------------------

# kind of saved model: (the key holding its format number, the newest this version reads)
_FORMATS = {"checkpoint": ("format", FORMAT), "export": ("format_version", EXPORT_FORMAT)}


def check_format(source, kind: str, saved: dict) -> int:
    """The format number of ``saved`` (a checkpoint dict, or an export's ``config.json``), refused
    (AudioclfError naming ``source``) when it is not a whole number >= 1, or when it is newer than this
    version of audioclf reads: one check and one "Upgrade audioclf" message for every kind of saved model.

    Args:
        source: the file, for messages.
        kind (str): ``"checkpoint"`` or ``"export"``.
        saved (dict): what the file holds.
    """
    key, newest = _FORMATS[kind]
    found = saved.get(key, 1)  # exports written before format_version existed are version 1
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise AudioclfError(f"{source}: {key}={found!r} must be a whole number >= 1")
    if found > newest:
        raise AudioclfError(f"{source}: format {found} was written by audioclf {saved.get('audioclf_version')}; "
                            f"this is audioclf {__version__}, which reads formats up to {newest}. "
                            f"Upgrade audioclf to read it.")
    return found


def read_config(saved: dict, source) -> RunConfig:
    """The RunConfig of a saved model (settings added since it was saved take their earlier behaviour),
    refused with ``source`` named when it is not a valid one."""
    try:
        return RunConfig.from_saved(saved["config"])
    except AudioclfError as e:
        raise AudioclfError(f"{source}: its config is not valid: {e}") from None
    except (TypeError, AttributeError):  # not a mapping of sections
        raise AudioclfError(f"{source}: its config must be a mapping of sections (features, model, ...), "
                            f"not a {type(saved['config']).__name__}") from None


@dataclass
class SavedModel:
    """A saved model, rebuilt: it unpacks (and indexes) as ``(model, config, labels)``."""

    model: torch.nn.Module  # eval mode, on the CPU
    config: RunConfig
    labels: list[str]
    thresholds: Optional[list[float]] = None  # a multilabel model's per-class decision thresholds

    def __iter__(self):
        return iter((self.model, self.config, self.labels))

    def __getitem__(self, i):
        return (self.model, self.config, self.labels)[i]


def read_thresholds(saved: dict, labels: list[str], source) -> Optional[list[float]]:
    """``saved["thresholds"]`` (None when absent), refused unless it is one number in [0, 1] per label."""
    found = saved.get("thresholds")
    if found is None:
        return None
    ok = isinstance(found, (list, tuple)) and len(found) == len(labels) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= 1 for x in found)
    if not ok:
        raise AudioclfError(f"{source}: thresholds must be a list of {len(labels)} numbers in [0, 1], one per "
                            f"label, got {found!r:.80}")
    return [float(x) for x in found]


def model_from_checkpoint(ckpt: dict, source="the checkpoint") -> SavedModel:
    """Rebuild the trained model (eval mode, CPU), its config, class names and decision thresholds from a
    checkpoint dict, refusing (AudioclfError naming ``source``, the file) a config, labels, weights or
    thresholds that do not agree."""
    missing = [k for k in ("config", "labels", "model") if k not in ckpt]
    if missing:
        raise AudioclfError(f"{source}: not an audioclf model: no {', '.join(missing)}")
    config = read_config(ckpt, source)
    labels = ckpt["labels"]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels) or len(set(labels)) < 2:
        raise AudioclfError(f"{source}: labels must be a list of at least 2 distinct class names, got {labels!r:.80}")
    bad = [x for x in labels if any("\ud800" <= ch <= "\udfff" for ch in x)]  # bytes of a name that is not UTF-8
    if bad:
        raise AudioclfError(f"{source}: the class name {bad[0]!r} is not valid UTF-8 text; audioclf writes class "
                            f"names to CSV, JSON and HTTP answers: train again with the class renamed")
    model = build_network(config.model, len(labels), config.features.n_mels)
    _check_weights(model, ckpt["model"], source, f"{config.model.backbone}, {len(labels)} labels, "
                                                 f"n_mels={config.features.n_mels}")
    model.load_state_dict(ckpt["model"])
    thresholds = read_thresholds(ckpt, labels, source)
    if config.train.task == "multilabel" and thresholds is None:
        log.warning("%s holds no decision thresholds (its training did not finish): each tag is called at "
                    "probability 0.5", source)
    return SavedModel(model.eval(), config, list(labels), thresholds)


def _check_weights(model: torch.nn.Module, state, source, described: str) -> None:
    """Refuse weights that do not fit ``model`` (the network the config and labels describe): missing or
    unexpected tensors, or other shapes (a head for another label count, norm buffers for other n_mels)."""
    if not isinstance(state, dict):
        raise AudioclfError(f"{source}: the weights must be a state dict, not a {type(state).__name__}")
    expected = model.state_dict()
    problems = [f"{k} is missing" for k in expected if k not in state]
    problems += [f"{k} is not in the network" for k in state if k not in expected]
    for k, v in expected.items():
        got = getattr(state.get(k), "shape", None)
        if k in state and (got is None or tuple(got) != tuple(v.shape)):
            problems.append(f"{k} is {tuple(got) if got is not None else type(state[k]).__name__} in the weights, "
                            f"{tuple(v.shape)} for the config")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise AudioclfError(f"{source}: the weights do not match its config and labels ({described}): "
                            f"{'; '.join(problems[:3])}{more}")


# --- run directories and .pt checkpoints -------------------------------------------------------------

def resolve_checkpoint(model_path) -> Path:
    """A run directory means its ``best.pt``; a file is taken as it is."""
    p = Path(model_path)
    if p.is_dir():
        if (p / RUN_CHECKPOINT).is_file():
            return p / RUN_CHECKPOINT
        if (p / ONNX_EXPORT_FILE).is_file():
            raise AudioclfError(f"{p}: an ONNX export, which audioclf does not run; run {p / ONNX_EXPORT_FILE} with "
                                f"onnxruntime, or give audioclf the run directory, its .pt, or a safetensors export "
                                f"(audioclf export RUN_DIR --format safetensors --out DIR)")
        raise AudioclfError(f"{p}: no best.pt in this folder; pass a run directory made by 'audioclf train' or a .pt file")
    if not p.is_file():
        raise AudioclfError(f"{p}: no such model file or run directory")
    return p


def load_checkpoint(model_path, map_location="cpu") -> dict:
    """Read a checkpoint (run dir or ``.pt``) safely and check it is one this version understands."""
    path = resolve_checkpoint(model_path)
    ckpt = torch_load(path, "audioclf checkpoint", map_location)
    if not isinstance(ckpt, dict) or "format" not in ckpt or "config" not in ckpt:
        raise AudioclfError(f"{path}: not an audioclf checkpoint (a bare state dict? it must hold config and labels)")
    check_format(path, "checkpoint", ckpt)
    bound = ckpt.get(CHECKPOINT_BOUND_KEY)
    if bound is not None and bound != _config_digest(ckpt):  # checkpoints saved before the binding have none
        raise AudioclfError(f"{path}: its config or labels were changed after it was saved ({CHECKPOINT_BOUND_KEY} "
                            f"does not match them), but the weights were trained with the saved ones; restore the "
                            f"file, or train again with the settings you want")
    return ckpt


# --- safetensors exports -----------------------------------------------------------------------------

def read_export_config(folder) -> dict:
    """``config.json`` of an export folder, checked to be one this version of audioclf understands, with
    ``format_version`` always set."""
    path = Path(folder) / CONFIG_FILE
    meta = read_parsed(path, json.loads, json.JSONDecodeError, "the export's config", "JSON")
    if not isinstance(meta, dict) or not {"format", "config", "labels"} <= set(meta):
        raise AudioclfError(f"{path}: not an audioclf export config (it must hold format, config and labels)")
    meta["format_version"] = check_format(path, "export", meta)  # filled in for exports older than the key
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


def load_safetensors(path) -> SavedModel:
    """Rebuild the model (eval mode, CPU), its config and class names from a safetensors export (its folder
    or its weights file), refusing weights and a config that do not belong together."""
    weights = Path(path) if Path(path).is_file() else Path(path) / SAFETENSORS_FILE
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise AudioclfError(f"{weights}: reading a safetensors export needs the safetensors package: "
                            f"pip install 'audioclf[export]'") from None
    folder = weights.parent
    meta = read_export_config(folder)
    if meta["format"] != "safetensors":
        raise AudioclfError(f"{folder / CONFIG_FILE}: format={meta['format']!r}, expected 'safetensors'")
    try:
        with safe_open(weights, "pt") as f:  # one read for the tensors and the binding
            stored = (f.metadata() or {}).get(BOUND_KEY)
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise AudioclfError(f"{weights}: not a readable safetensors file ({e})") from None
    if meta["format_version"] >= 2:  # exports before version 2 carry no binding
        _check_bound(meta, weights, stored)
    return model_from_checkpoint({"config": meta["config"], "labels": meta["labels"], "model": state,
                                  "thresholds": meta.get("thresholds")}, weights)


def _check_bound(meta: dict, weights: Path, stored) -> None:
    """The weights are the ones ``config.json`` was written with, and the config the one they were trained with."""
    config_path = weights.parent / CONFIG_FILE
    expected = meta.get("weights_sha256")
    if not isinstance(expected, str):
        raise AudioclfError(f"{config_path}: weights_sha256 is missing or not a string; export the model again")
    if sha256(weights) != expected:
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


def _differences(a, b, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [f"{where[:-1]}={a!r} in {CONFIG_FILE}, {b!r} in the weights"]


# --- any saved model ---------------------------------------------------------------------------------

def weights_file(model_path) -> Path:
    """The file :func:`load_model` reads the weights of ``model_path`` from: a ``.pt`` or ``.safetensors``."""
    if is_safetensors_export(model_path):
        return Path(model_path) if Path(model_path).is_file() else Path(model_path) / SAFETENSORS_FILE
    return resolve_checkpoint(model_path)


def load_model(model_path, map_location="cpu") -> SavedModel:
    """Model (eval mode, CPU), config, class names (and thresholds) from a run directory, a ``.pt``
    checkpoint or a safetensors export (its folder or its ``.safetensors`` file)."""
    if is_safetensors_export(model_path):
        return load_safetensors(model_path)
    path = resolve_checkpoint(model_path)
    return model_from_checkpoint(load_checkpoint(path, map_location), path)


def saved_extras(model_path, keys: Sequence[str]) -> dict:
    """The ``keys`` a saved model holds beside its weights (what training fitted after its epochs, such as
    the temperature and the unknown rule), from a checkpoint or an export's ``config.json``; a key the
    model lacks (saved by an older audioclf) is left out."""
    if is_safetensors_export(model_path):
        p = Path(model_path)
        saved = read_export_config(p.parent if p.is_file() else p)
    else:
        saved = load_checkpoint(model_path)
    return {k: saved[k] for k in keys if k in saved}
