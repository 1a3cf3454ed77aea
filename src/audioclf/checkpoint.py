"""Checkpoints: plain dicts of tensors and builtins, written atomically, read with ``weights_only=True``.

Keys: ``format`` (int), ``audioclf_version``, ``config`` (RunConfig as a dict), ``labels`` (class names),
``model`` (state dict, normalisation statistics included), and for training state ``optimizer``,
``scheduler``, ``epoch``, ``best_val_loss``, ``best_epoch``, ``bad_epochs`` (every random draw of an
epoch comes from generators seeded by (seed, epoch, rank), so no RNG state is saved). Everything
inference needs is in one file; the network (``config.model.backbone``) and its front end come from the
checkpoint, never from flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ._version import __version__
from .config import AudioclfError, RunConfig
from .fileio import atomic_path
from .model import build_network

FORMAT = 1  # bump when a checkpoint written by this version can no longer be read by older code
RUN_CHECKPOINT = "best.pt"  # what a run directory means as a model


def save_checkpoint(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "audioclf_version": __version__, **state}, tmp)


def resolve_checkpoint(model_path) -> Path:
    """A run directory means its ``best.pt``; a file is taken as it is."""
    p = Path(model_path)
    if p.is_dir():
        if (p / RUN_CHECKPOINT).is_file():
            return p / RUN_CHECKPOINT
        raise AudioclfError(f"{p}: no best.pt in this folder; pass a run directory made by 'audioclf train' or a .pt file")
    if not p.is_file():
        raise AudioclfError(f"{p}: no such model file or run directory")
    return p


def load_checkpoint(model_path, map_location="cpu") -> dict:
    """Read a checkpoint (run dir or ``.pt``) safely and check it is one this version understands."""
    path = resolve_checkpoint(model_path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load fails on a damaged or foreign file with many error types (KeyError for text)
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file raises a bare EOFError
        raise AudioclfError(f"{path}: not a readable audioclf checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or "config" not in ckpt:
        raise AudioclfError(f"{path}: not an audioclf checkpoint (a bare state dict? it must hold config and labels)")
    if ckpt["format"] > FORMAT:
        raise AudioclfError(f"{path}: checkpoint format {ckpt['format']} was written by audioclf "
                            f"{ckpt.get('audioclf_version')}; this is audioclf {__version__} (format {FORMAT}). "
                            f"Upgrade audioclf to read it.")
    return ckpt


def model_from_checkpoint(ckpt: dict, source="the checkpoint") -> tuple[torch.nn.Module, RunConfig, list[str]]:
    """Rebuild the trained model (eval mode, CPU), its config and class names from a checkpoint dict,
    refusing (AudioclfError naming ``source``, the file) a config, labels or weights that do not agree."""
    missing = [k for k in ("config", "labels", "model") if k not in ckpt]
    if missing:
        raise AudioclfError(f"{source}: not an audioclf model: no {', '.join(missing)}")
    try:
        config = RunConfig.from_saved(ckpt["config"])
    except AudioclfError as e:
        raise AudioclfError(f"{source}: its config is not valid: {e}") from None
    except (TypeError, AttributeError):  # not a mapping of sections
        raise AudioclfError(f"{source}: its config must be a mapping of sections (features, model, ...), "
                            f"not a {type(ckpt['config']).__name__}") from None
    labels = ckpt["labels"]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels) or len(set(labels)) < 2:
        raise AudioclfError(f"{source}: labels must be a list of at least 2 distinct class names, got {labels!r:.80}")
    model = build_network(config.model, len(labels), config.features.n_mels)
    _check_weights(model, ckpt["model"], source, f"{config.model.backbone}, {len(labels)} labels, "
                                                 f"n_mels={config.features.n_mels}")
    model.load_state_dict(ckpt["model"])
    return model.eval(), config, list(labels)


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


def load_model(model_path, map_location="cpu") -> tuple[torch.nn.Module, RunConfig, list[str]]:
    """Model (eval mode, CPU), config and class names from a run directory, a ``.pt`` checkpoint or a
    folder written by ``audioclf export --format safetensors``."""
    from .export import is_safetensors_export, load_safetensors  # export imports this module

    if is_safetensors_export(model_path):
        return load_safetensors(model_path)
    return model_from_checkpoint(load_checkpoint(model_path, map_location), resolve_checkpoint(model_path))


def inference_state(model: torch.nn.Module, config: RunConfig, labels: list[str], extra: Optional[dict] = None) -> dict:
    """The minimum a checkpoint needs for inference (what ``best.pt`` holds, with training extras)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"config": config.to_dict(), "labels": list(labels), "model": sd, **(extra or {})}
