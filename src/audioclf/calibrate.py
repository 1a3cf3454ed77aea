"""After training: fit the model's temperature and its "unknown" rule (:mod:`audioclf.trust`) on its
validation clips, and store both in ``best.pt``.

``train.fit`` calls :func:`fit_trust` once the epochs are done, on the best model and the feature store it
trained from; :func:`calibrate_run` does the same for a finished run directory (one trained before audioclf
fitted these), rebuilding the split from the run's saved config.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import RUN_CHECKPOINT, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import RunConfig
from .data import load_clips, split_clips
from .errors import AudioclfError
from .metrics import classification_metrics
from .runtime import resolve_device
from .store import FeatureBank
from .trust import (ece_floor, expected_calibration_error, fit_rejector, fit_temperature, needs_embedding,
                    read_trust, reference_embeddings, softmax, trust_keys)

log = logging.getLogger(__name__)


@torch.no_grad()
def bank_outputs(model: nn.Module, bank: FeatureBank, idx: torch.Tensor, device: torch.device,
                 batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits (clips, classes), embeddings (clips, d), labels (clips,))`` of clips ``idx``, centre-cropped,
    in eval mode, in full precision (calibration is fitted on the outputs inference gives), on the CPU."""
    model.eval()
    logits, emb, labels = [], [], []
    for i in range(0, len(idx), batch_size):
        x, y = bank.batch(idx[i:i + batch_size])
        z, e = model.logits_and_embedding(x.to(device))
        logits.append(z.float().cpu())
        emb.append(e.float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(emb), torch.cat(labels)


def fit_trust(model: nn.Module, bank: FeatureBank, train_idx: torch.Tensor, val_idx: torch.Tensor,
              config: RunConfig, n_classes: int, device: torch.device) -> dict:
    """The checkpoint keys of :func:`audioclf.trust.trust_keys` for ``model`` (the best weights loaded):
    the temperature fitted on the validation clips ``val_idx`` and the rule of ``config.train.reject_score``
    keeping ``config.train.keep_known`` of them; its reference embeddings come from the training clips ``train_idx``.
    A multilabel model gets neither: its "unknown" is a clip that no tag's threshold passes."""
    t = config.train
    if t.task == "multilabel":
        return {}
    if len(val_idx) == 0:
        log.warning("no validation clips: the model keeps temperature 1 and no unknown rule")
        return {}
    logits, emb, labels = bank_outputs(model, bank, val_idx, device)
    temperature = fit_temperature(logits, labels)
    refs = None
    if needs_embedding(t.reject_score):
        _, train_emb, train_labels = bank_outputs(model, bank, train_idx, device)
        refs = reference_embeddings(t.reject_score, train_emb, train_labels, n_classes)
    rule = fit_rejector(t.reject_score, t.keep_known, logits, emb, refs, temperature)
    log.info("calibration: temperature %.3f (validation NLL %.4f -> %.4f); unknown below %s %.4f (keeps %.0f %% "
             "of %d validation clips)", temperature, _nll(logits, labels, 1.0), _nll(logits, labels, temperature),
             rule.kind, rule.threshold, 100 * rule.keep(logits, emb).mean(), len(val_idx))
    return trust_keys(temperature, rule)


def calibrated_metrics(logits: torch.Tensor, labels: np.ndarray, classes: list, temperature: float) -> tuple:
    """(:func:`classification_metrics` of ``softmax(logits / temperature)``, the probabilities inference gives,
    with ``ece``, ``ece_uncalibrated`` (at T = 1) and ``temperature``; those probabilities ``(clips, classes)``)."""
    probs = softmax(logits, temperature)
    return {**classification_metrics(labels, probs, classes), "ece": expected_calibration_error(probs, labels),
            "ece_uncalibrated": expected_calibration_error(softmax(logits), labels), "temperature": temperature,
            **ece_floor(probs)}, probs


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return nn.functional.cross_entropy(logits / temperature, labels).item()


def store_trust(path, keys: dict) -> None:
    """Add ``keys`` to the checkpoint at ``path`` (rewritten atomically)."""
    if keys:
        ckpt = load_checkpoint(path)
        ckpt.update(keys)
        save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "audioclf_version")}, path)


def calibrate_run(run_dir, *, refit: bool = False, score: Optional[str] = None, keep_known: Optional[float] = None,
                  device: str = "auto") -> dict:
    """Fit and store the temperature and unknown rule of the finished run in ``run_dir`` where its
    ``best.pt`` lacks them (or always, with ``refit``); return its trust keys. ``score`` and ``keep_known``
    replace the run's ``train.reject_score`` and ``train.keep_known`` (and are saved in its config)."""
    path = Path(run_dir) / RUN_CHECKPOINT
    if not path.is_file():
        raise AudioclfError(f"{run_dir}: no {RUN_CHECKPOINT}; give a finished training run's folder")
    ckpt = load_checkpoint(path)
    if "temperature" in ckpt and not refit:
        return {k: ckpt[k] for k in ("temperature", "reject") if k in ckpt}
    model, config, labels = model_from_checkpoint(ckpt, path)
    t = config.train
    config = replace(config, train=replace(t, reject_score=score or t.reject_score,
                                           keep_known=keep_known or t.keep_known))
    bank, idx, dev = _run_bank(run_dir, config, labels, device)
    keys = fit_trust(model.to(dev), bank, idx["train"], idx["val"], config, len(labels), dev)
    store_trust(path, {**keys, "config": config.to_dict()})
    read_trust(keys)  # what inference will read back must parse
    return keys


def run_outputs(run_dir, device: str = "auto") -> dict:
    """``{"train"|"val"|"test": (logits, embeddings, labels)}`` of the finished run in ``run_dir`` (see
    :func:`bank_outputs`), its clips split as training split them; a split without clips is left out."""
    path = Path(run_dir) / RUN_CHECKPOINT
    if not path.is_file():
        raise AudioclfError(f"{run_dir}: no {RUN_CHECKPOINT}; give a finished training run's folder")
    model, config, labels = model_from_checkpoint(load_checkpoint(path), path)
    bank, idx, dev = _run_bank(run_dir, config, labels, device)
    return {k: bank_outputs(model.to(dev), bank, i, dev) for k, i in idx.items() if len(i)}


def _run_bank(run_dir, config: RunConfig, labels: list, device: str):
    """(feature bank, ``{"train"|"val"|"test": clip indices}``, device) of a run, rebuilt from its saved config."""
    dev = resolve_device(device)
    clipset = load_clips(config.data)
    if clipset.classes != labels:
        raise AudioclfError(f"{config.data.root} now has other classes than the run in {run_dir} was trained on")
    bank = FeatureBank.build(clipset, config.features, cache_dir=config.data.cache_dir, device=dev,
                             num_workers=config.data.num_workers, quiet=config.train.quiet)
    d = config.data
    splits = split_clips(bank.clips, val_fold=d.val_fold, test_fold=d.test_fold, val_split=d.val_split,
                         seed=config.train.seed, classes=clipset.classes)
    return bank, {k: bank.indices(v) for k, v in splits.items()}, dev
