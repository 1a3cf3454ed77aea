"""What ``train.task`` changes in training, in one place: targets, loss, class balance and the scores of a split.

``multiclass``: one class per clip; integer labels; softmax cross-entropy; accuracy and macro-F1 of the
argmax. ``multilabel``: any number of classes per clip, none included; ``(clips, classes)`` multi-hot
targets; one binary cross-entropy per class; mAP, and F1 at per-class thresholds. Both report mAP, so
their runs compare.

Label smoothing for ``multilabel`` pulls each target towards 1/2: a positive becomes ``1 - eps/2`` and a
negative ``eps/2``, as the cross-entropy's smoothing spreads ``eps`` over two outcomes (present, absent)
of every class. A softmax target gives each of K classes ``eps/K`` instead.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import MIX_DEFAULT, AugmentConfig, RunConfig, TrainConfig
from .metrics import macro_f1, mean_average_precision, multilabel_metrics


def multilabel(t: TrainConfig) -> bool:
    """The batches of this task carry multi-hot targets (``FeatureBank.batch(multi_hot=True)``)."""
    return t.task == "multilabel"


def mix_fraction(config: RunConfig) -> float:
    """The share of training examples the mix augmentation sums: ``augment.mix``, or the task's default."""
    return MIX_DEFAULT[config.train.task] if config.augment.mix is None else config.augment.mix


def training_augment(config: RunConfig) -> AugmentConfig:
    """What SpecAugment applies: with frame targets (``train.frame_loss``) no time shift or stretch, since
    the mix places each clip at a random time itself and moves its targets with it."""
    if config.train.frame_loss > 0:
        return replace(config.augment, time_shift=0.0, time_stretch=0.0)
    return config.augment


def with_frames(y: torch.Tensor, frames: Optional[torch.Tensor]) -> torch.Tensor:
    """``(batch, classes)`` targets and ``(batch, frames, classes)`` frame targets as one ``(batch, classes
    x (1 + frames))`` tensor, which mixup mixes with each example's weight (``y`` alone without frames)."""
    return y if frames is None else torch.cat([y.to(frames.dtype), frames.flatten(1)], 1)


def frame_objective(loss_fn: Callable, weight: float) -> Callable:
    """``loss((clip logits, step logits (batch, steps, classes)), with_frames(targets, frame targets))``:
    ``loss_fn`` on the clips plus ``weight`` times ``loss_fn`` on every time step, against the frame
    targets max-pooled to the steps (a step holds a class if any of its frames does)."""
    def loss(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        clip, steps = out
        n = clip.shape[1]
        frames = target[:, n:].reshape(len(target), -1, n).transpose(1, 2)  # (batch, classes, frames)
        at_steps = F.adaptive_max_pool1d(frames, steps.shape[1]).transpose(1, 2)
        return loss_fn(clip, target[:, :n]) + weight * loss_fn(steps.flatten(0, 1), at_steps.flatten(0, 1))
    return loss


def forward_loss(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Callable, *,
                 steps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clip logits, loss)`` of a training batch; with ``steps``, the loss also takes each time step's
    logits (``model(x, steps=True)``, :func:`frame_objective`). The loss is computed in float32."""
    if not steps:
        logits = model(x)
        return logits, loss_fn(logits.float(), target)
    logits, at_steps = model(x, steps=True)
    return logits, loss_fn((logits.float(), at_steps.float()), target)


def smoothed_bce(logits: torch.Tensor, target: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy of each class's sigmoid, summed over the classes and averaged over the clips.

    Summed, not averaged, over the classes: a mean would divide every gradient by the number of classes
    (50 for ESC-50), so the cross-entropy's learning rates would train a tagger 50 times slower.

    Args:
        logits (torch.Tensor): ``(batch, classes)``.
        target (torch.Tensor): ``(batch, classes)`` in [0, 1] (mixup makes fractions).
        weight (torch.Tensor, optional): ``(classes,)`` weight of each class's loss. (Default: equal)
        label_smoothing (float, optional): ``eps`` in [0, 1): targets become ``target * (1 - eps) + eps / 2``.
            (Default: ``0.0``)
    """
    target = target * (1 - label_smoothing) + label_smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none").sum(1).mean()


def start_at_priors(model: torch.nn.Module, targets: torch.Tensor) -> None:
    """Set the bias of ``model``'s output layer (its last ``Linear`` with one output per class) to the
    log-odds of each class's share of the training clips' ``(clips, classes)`` multi-hot ``targets``.

    A new output layer starts every sigmoid near 1/2, so the first epochs go to pushing the absent classes'
    outputs down (49 of 50 on ESC-50: validation mAP 0.07 after the first epoch) before any class is told
    apart. Started at the priors, the sigmoids learn the classes from the first batch (RetinaNet's prior
    initialisation)."""
    from .mobilenet import AttentionPool

    n_classes = targets.shape[1]
    attention = {id(m.attention) for m in model.modules() if isinstance(m, AttentionPool)}  # weighs, not scores
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n_classes
            and id(m) not in attention][-1]
    prior = targets.float().mean(0).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        head.bias.copy_(torch.log(prior / (1 - prior)))


def loss_function(t: TrainConfig, class_weights: Optional[torch.Tensor]) -> Callable:
    """``loss(logits (batch, classes), soft targets (batch, classes))`` -> scalar, as ``t.task`` trains."""
    if multilabel(t):
        return partial(smoothed_bce, weight=class_weights, label_smoothing=t.label_smoothing)
    return partial(F.cross_entropy, weight=class_weights, label_smoothing=t.label_smoothing)


def objective(t: TrainConfig, targets: torch.Tensor, balance: str,
              device: torch.device) -> tuple[Callable, Optional[torch.Tensor]]:
    """``(loss function, per-clip sampling weights or None)`` for training clips of ``(clips, classes)``
    multi-hot ``targets``: :func:`loss_function` with :func:`class_balance`'s class weights."""
    class_weights, sample_weights = class_balance(targets, balance, device)
    loss = loss_function(t, class_weights)
    return (frame_objective(loss, t.frame_loss) if t.frame_loss > 0 else loss), sample_weights


def class_balance(targets: torch.Tensor, balance: str,
                  device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(class weights for the loss, on device; per-clip sampling weights)`` of the training clips'
    ``(clips, classes)`` multi-hot ``targets`` as ``balance`` (``data.balance``) says: ``weights`` weighs
    each class's loss by the inverse of its frequency, ``sampler`` draws each clip with the inverse of the
    count of its rarest class (a clip of no class: of the clips of no class); ``None`` where unused."""
    counts = targets.sum(0).float()
    if balance == "weights":
        return (counts.sum() / (targets.shape[1] * counts)).to(device), None
    if balance == "sampler":
        weights = (targets.float() * (1.0 / counts)).amax(1)
        empty = ~targets.any(1)
        return None, torch.where(empty, 1.0 / empty.sum().clamp_min(1), weights)
    return None, None


def n_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Clips called right: the argmax is the label (integer ``y``), or every class's sigmoid is on the right
    side of 1/2 (multi-hot ``y``: subset accuracy)."""
    if y.ndim == 1:
        return int((logits.argmax(1) == y).sum().item())
    return int(((logits > 0) == (y > 0.5)).all(1).sum().item())


def split_scores(logits: torch.Tensor, y: torch.Tensor, name: str) -> dict:
    """``{name}_loss``, ``{name}_acc`` (:func:`n_correct`), ``{name}_f1`` (macro-F1: of the argmax, or at
    thresholds of 1/2) and ``{name}_map`` of a split's logits against its labels or multi-hot targets."""
    if y.ndim == 1:
        pred, probs = logits.argmax(1), logits.softmax(1).numpy()
        loss, f1 = F.cross_entropy(logits, y).item(), macro_f1(y.numpy(), pred.numpy())
        onehot = F.one_hot(y, logits.shape[1]).numpy()
    else:
        probs, onehot = torch.sigmoid(logits).numpy(), y.numpy()
        loss = smoothed_bce(logits, y).item()
        f1 = multilabel_metrics(onehot, probs, [str(c) for c in range(logits.shape[1])])["macro_f1"]
    return {f"{name}_loss": loss, f"{name}_acc": n_correct(logits, y) / len(y), f"{name}_f1": f1,
            f"{name}_map": mean_average_precision(onehot, probs)}
