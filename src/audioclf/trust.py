"""Scores a user can trust: temperature scaling (calibration) and the rule that answers "unknown".

A leaf module (torch, numpy; matplotlib inside the plot): ``calibrate.py`` fits both on a trained
model's validation outputs and stores them with the model; ``predict.Classifier`` applies them; ``evaluate``
measures calibration with :func:`expected_calibration_error` and :func:`plot_reliability`.

- Temperature scaling (Guo et al., 2017): one scalar ``T`` divides the logits before the softmax. It keeps
  every prediction (the argmax does not change) and makes "0.9" mean right about 9 times in 10.
- Unknown rejection: a score, higher for clips that look like a trained class, and a threshold set so that
  ``keep_known`` of the known validation clips pass it. Scores (:data:`SCORES`): ``msp``, the calibrated
  maximum softmax probability; ``energy``, ``T * logsumexp(logits / T)`` (the negative free energy, Liu et
  al., 2020); ``embedding``, the cosine similarity of the clip's embedding to the nearest class mean of the
  training clips; ``knn``, its cosine similarity to its ``k``-th nearest training clip (deep k-nearest
  neighbours, Sun et al., 2022), which needs every training clip's embedding saved with the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AudioclfError

SCORES = ("msp", "energy", "embedding", "knn")
KNN_K = 1  # the k of the knn score: chosen by the open-set benchmark on its training folds (docs/trust.md)
N_BINS = 15  # reliability bins of the ECE
T_RANGE = (0.05, 20.0)  # a fitted temperature outside this says the validation outputs are degenerate
UNKNOWN = "unknown"  # the label of a rejected input
TRUST_KEYS = ("temperature", "reject")  # what a checkpoint and an export's config.json hold of this module's


# ------------------------------------------------------------------------------------------- calibration

def fit_temperature(logits, labels) -> float:
    """The temperature ``T`` in ``T_RANGE`` that minimises the NLL of ``softmax(logits / T)`` on ``labels``.

    Args:
        logits (array or tensor): ``(clips, classes)`` validation logits.
        labels (array or tensor): ``(clips,)`` true class indices.

    The NLL is convex in ``1 / T``, so one bounded scalar search over ``log T`` (Brent's) finds it; no torch
    optimizer steps, which training's hooks and loggers would count.
    """
    from scipy.optimize import minimize_scalar

    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if z.ndim != 2 or len(z) != len(y) or len(z) == 0:
        raise AudioclfError(f"fit_temperature needs (clips, classes) logits and one label per clip; got "
                            f"{tuple(z.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(z).all():
        return 1.0
    nll = (lambda log_t: F.cross_entropy(z / math.exp(log_t), y).item())
    found = minimize_scalar(nll, bounds=tuple(math.log(t) for t in T_RANGE), method="bounded",
                            options={"xatol": 1e-6})
    return float(math.exp(found.x))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, as numpy, in the logits' precision (float32 logits
    then give the probabilities inference gives)."""
    z = torch.as_tensor(np.asarray(logits))
    return torch.softmax((z if z.is_floating_point() else z.double()) / temperature, -1).numpy()


def reliability(probs, labels, n_bins: int = N_BINS) -> dict:
    """Confidence (top probability) against accuracy in ``n_bins`` equal-width bins over [0, 1].

    Returns:
        dict: ``ece`` (the bins' |accuracy - confidence| weighted by their share of clips), and per bin
        ``confidence``, ``accuracy`` (NaN for an empty bin) and ``count``.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(np.float64)
    # bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 falls in the first
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, conf, n_bins) / count
        acc = np.bincount(bins, correct, n_bins) / count
    gap = np.where(count > 0, np.abs(acc - mean_conf), 0.0)
    return {"ece": float((gap * count).sum() / max(len(labels), 1)), "confidence": mean_conf.tolist(),
            "accuracy": acc.tolist(), "count": count.tolist()}


def expected_calibration_error(probs, labels, n_bins: int = N_BINS) -> float:
    """ECE of ``probs`` ``(clips, classes)`` against ``labels``, over ``n_bins`` equal-width confidence bins."""
    return reliability(probs, labels, n_bins)["ece"]


def ece_floor(probs, n_bins: int = N_BINS, draws: int = 1000, seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model would measure with these confidences on this many clips: each
    clip right with probability its confidence, ``draws`` times. ECE is biased upwards on few clips (each
    bin's accuracy is a small sample), so a measured ECE means something only next to this floor.

    Returns:
        dict: ``ece_floor`` (the mean over draws) and ``ece_floor_p95`` (95 % of the draws measure less).
    """
    conf = np.asarray(probs, dtype=np.float64).max(1)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    right = np.random.default_rng(seed).random((draws, len(conf))) < conf  # (draws, clips)
    count = np.bincount(bins, minlength=n_bins)
    hits = np.stack([np.bincount(bins, r, n_bins) for r in right])  # (draws, bins)
    gap = np.abs(hits - np.bincount(bins, conf, n_bins))  # |correct - summed confidence| per bin, x count
    ece = gap.sum(1) / max(len(conf), 1)
    return {"ece_floor": float(ece.mean()), "ece_floor_p95": float(np.percentile(ece, 95)) if len(conf) else 0.0}


def plot_reliability(curves: dict, labels, path, n_bins: int = N_BINS) -> None:
    """Save a reliability diagram (accuracy against confidence per bin, the diagonal being perfect) as a PNG.

    ``curves`` maps a name (``"before"``, ``"after temperature scaling"``) to ``(clips, classes)`` probabilities.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot state

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, probs in curves.items():
        r = reliability(probs, labels, n_bins)
        has = np.array(r["count"]) > 0
        ax.plot(np.array(r["confidence"])[has], np.array(r["accuracy"])[has], marker="o",
                label=f"{name} (ECE {r['ece']:.3f})")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top probability)"), ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, {n_bins} bins, {len(labels)} clips")
    ax.legend(loc="upper left"), ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------- open set

def class_means(emb, labels, n_classes: int) -> torch.Tensor:
    """``(n_classes, d)`` unit-length mean of each class's unit-length embeddings (zeros for a class without clips)."""
    e = F.normalize(torch.as_tensor(np.asarray(emb), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    sums = torch.zeros(n_classes, e.shape[1]).index_add_(0, y, e)
    return F.normalize(sums, dim=1)


def reference_embeddings(kind: str, emb, labels, n_classes: int) -> Optional[torch.Tensor]:
    """What a rule of ``kind`` compares a clip's embedding with, from the training clips' ``emb`` ``(clips, d)``
    and ``labels``: the class means (``embedding``), every clip's unit-length embedding (``knn``), or None."""
    if kind == "embedding":
        return class_means(emb, labels, n_classes)
    if kind == "knn":
        return F.normalize(torch.as_tensor(np.asarray(emb), dtype=torch.float32), dim=1)
    return None


def known_score(kind: str, logits: torch.Tensor, emb: Optional[torch.Tensor] = None,
                refs: Optional[torch.Tensor] = None, temperature: float = 1.0, k: int = KNN_K) -> torch.Tensor:
    """``(batch,)`` score of each clip, higher the more it looks like a trained class.

    Args:
        kind (str): one of :data:`SCORES`.
        logits (torch.Tensor): ``(batch, classes)``.
        emb (torch.Tensor, optional): ``(batch, d)`` embeddings; needed by ``embedding`` and ``knn``.
        refs (torch.Tensor, optional): ``(n, d)`` unit-length :func:`reference_embeddings`; needed by
            ``embedding`` and ``knn``.
        temperature (float, optional): divides the logits of ``msp`` and ``energy``. (Default: ``1.0``)
        k (int, optional): ``knn`` scores the cosine similarity to the ``k``-th nearest reference.
            (Default: :data:`KNN_K`)
    """
    if kind == "msp":
        return torch.softmax(logits.float() / temperature, -1).amax(-1)
    if kind == "energy":
        return temperature * torch.logsumexp(logits.float() / temperature, -1)
    if kind in ("embedding", "knn"):
        if emb is None or refs is None:
            raise AudioclfError(f"the {kind} score needs the clips' embeddings and the training clips' references")
        sim = F.normalize(emb.float(), dim=-1) @ refs.to(emb.device).T  # (batch, n)
        return sim.topk(min(k if kind == "knn" else 1, sim.shape[-1]), dim=-1).values[..., -1]
    raise AudioclfError(f"Unsupported score={kind!r}; choose one of {', '.join(SCORES)}")


@dataclass
class Rejector:
    """The unknown rule of a model: ``kind`` of score, and the ``threshold`` below which an input is unknown.

    ``keep_known`` is the share of known validation clips the threshold keeps; ``refs`` are the
    :func:`reference_embeddings` of the ``embedding`` and ``knn`` scores (``None`` for the others), ``k``
    the neighbour ``knn`` scores.
    """

    kind: str
    threshold: float
    keep_known: float
    temperature: float = 1.0
    refs: Optional[torch.Tensor] = None
    k: int = KNN_K

    @property
    def needs_embedding(self) -> bool:
        return self.kind in ("embedding", "knn")

    def score(self, logits, emb=None) -> np.ndarray:
        """:func:`known_score` of numpy or torch outputs, as numpy."""
        as_t = (lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.float32))
        return known_score(self.kind, as_t(logits), as_t(emb), self.refs, self.temperature, self.k).numpy()

    def keep(self, logits, emb=None) -> np.ndarray:
        """``(clips,)`` True where the rule keeps a clip (its score reaches the threshold)."""
        return self.score(logits, emb) >= self.threshold

    def to_dict(self) -> dict:
        """What a checkpoint and an export's config.json store under ``"reject"`` (builtins only)."""
        d = {"score": self.kind, "threshold": float(self.threshold), "keep_known": float(self.keep_known)}
        if self.kind == "knn":
            d.update(k=int(self.k), train_embeddings=_rounded(self.refs))
        elif self.refs is not None:
            d["class_means"] = self.refs.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict, temperature: float = 1.0) -> "Rejector":
        refs = d.get("train_embeddings" if d["score"] == "knn" else "class_means")
        return cls(d["score"], float(d["threshold"]), float(d["keep_known"]), temperature,
                   None if refs is None else torch.tensor(refs, dtype=torch.float32), int(d.get("k", KNN_K)))


def _rounded(refs: torch.Tensor) -> list:
    """Unit vectors as lists of floats with 5 decimals: cosine similarities move by < 1e-4, and a thousand
    training clips' embeddings stay a few MB in an export's config.json."""
    return np.round(refs.numpy().astype(np.float64), 5).tolist()


def fit_rejector(kind: str, keep_known: float, logits, emb=None, refs=None, temperature: float = 1.0,
                 k: int = KNN_K) -> Rejector:
    """The rule whose threshold keeps ``keep_known`` (a share in (0, 1]) of the validation clips given by
    their ``logits`` (and ``emb``, for the ``embedding`` and ``knn`` scores, with the training clips'
    :func:`reference_embeddings` ``refs``)."""
    if not 0 < keep_known <= 1:
        raise AudioclfError(f"keep_known={keep_known!r} is out of range: it must be in (0, 1]")
    r = Rejector(kind, 0.0, keep_known, temperature, None if refs is None else torch.as_tensor(refs), k)
    r.threshold = keep_threshold(r.score(logits, emb), keep_known)
    return r


def keep_threshold(scores, keep: float) -> float:
    """The highest threshold that ``keep`` (a share) of ``scores`` reach."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    return float(s[len(s) - math.ceil(keep * len(s) - 1e-9)])


def read_trust(saved: dict, source="the model") -> tuple[float, Optional[Rejector]]:
    """(temperature, rule) stored in a checkpoint dict or an export's config.json: ``(1.0, None)`` for a model
    saved before audioclf fitted them, or a multilabel one. Damaged values are an AudioclfError naming ``source``."""
    t, reject = saved.get("temperature", 1.0), saved.get("reject")
    number = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    if not (number(t) and t > 0):
        raise AudioclfError(f"{source}: temperature={t!r} must be a positive finite number")
    if reject is None:
        return float(t), None
    kind = reject.get("score") if isinstance(reject, dict) else None
    refs = {"embedding": "class_means", "knn": "train_embeddings"}.get(kind)
    k = reject.get("k", KNN_K) if isinstance(reject, dict) else None
    if not (kind in SCORES and number(reject.get("threshold")) and number(reject.get("keep_known"))
            and 0 < reject["keep_known"] <= 1 and (refs is None or isinstance(reject.get(refs), list) and reject[refs])
            and isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise AudioclfError(f"{source}: its unknown rule {str(reject)[:80]!r} is damaged: it needs score (one of "
                            f"{', '.join(SCORES)}), a finite threshold, keep_known in (0, 1], class_means for the "
                            f"embedding score, train_embeddings and k >= 1 for knn; load it with reject=False "
                            f"(--no-reject), or fit it again")
    return float(t), Rejector.from_dict(reject, float(t))


def trust_keys(temperature: float, rejector: Optional[Rejector]) -> dict:
    """The keys a checkpoint or config.json holds for :func:`read_trust`."""
    return {"temperature": float(temperature), **({"reject": rejector.to_dict()} if rejector else {})}


# ------------------------------------------------------------------------------------------- measuring

def roc_auc(known, unknown) -> float:
    """AUROC of telling known (positive) from unknown clips by a score, higher = known: the chance that a
    random known clip scores above a random unknown one, ties counting half (Mann-Whitney)."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if not len(known) or not len(unknown):
        raise AudioclfError("AUROC needs known and unknown clips")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([known, unknown]))
    return float((ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2) / (len(known) * len(unknown)))


def fpr_at_tpr(known, unknown, tpr: float = 0.95) -> float:
    """Share of unknown clips kept by the threshold that keeps ``tpr`` of the known ones."""
    return float((np.asarray(unknown) >= keep_threshold(known, tpr)).mean())
