"""Scores a user can trust: temperature scaling (calibration) and the rule that answers "unknown".

A leaf module (torch, numpy; matplotlib inside the plot, scikit-learn inside the Mahalanobis fit): ``calibrate.py`` fits both on a trained
model's validation outputs and stores them with the model; ``predict.Classifier`` applies them; ``evaluate``
measures calibration with :func:`expected_calibration_error` and :func:`plot_reliability`.

- Temperature scaling (Guo et al., 2017): one scalar ``T`` divides the logits before the softmax. It keeps
  every prediction (the argmax does not change) and makes "0.9" mean right about 9 times in 10.
- Unknown rejection: a score, higher for clips that look like a trained class, and a threshold set so that
  ``keep_known`` of the known validation clips pass it. Scores (:data:`SCORES`): ``msp``, the calibrated
  maximum softmax probability; ``energy``, ``T * logsumexp(logits / T)`` (the negative free energy, Liu et
  al., 2020); ``embedding``, the cosine similarity of the clip's embedding to the nearest class mean of the
  training clips; ``knn``, its cosine similarity to its ``k``-th nearest training clip (deep k-nearest
  neighbours, Sun et al., 2022), which needs every training clip's embedding saved with the model;
  ``mahalanobis``, minus the smallest squared Mahalanobis distance of the unit-length embedding to a class
  mean, under one covariance of the training clips around their class means (Lee et al., 2018), shrunk by
  Ledoit-Wolf. A sum such as ``energy+mahalanobis`` adds its parts, each standardised by its mean and
  standard deviation on the known validation clips (saved with the rule), so that neither dominates by scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AudioclfError

BASE_SCORES = ("msp", "energy", "embedding", "knn", "mahalanobis")
EMBEDDING_SCORES = ("embedding", "knn", "mahalanobis")  # the scores of the clip's embedding
# the choices of train.reject_score: a sum is chosen the way a single score is (docs/trust.md)
SCORES = BASE_SCORES + ("energy+mahalanobis",)
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


def _confidence_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Each confidence's bin: bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 falls in
    the first."""
    return np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability(probs, labels, n_bins: int = N_BINS) -> dict:
    """Confidence (top probability) against accuracy in ``n_bins`` equal-width bins over [0, 1].

    Returns:
        dict: ``ece`` (the bins' |accuracy - confidence| weighted by their share of clips), and per bin
        ``confidence``, ``accuracy`` (NaN for an empty bin) and ``count``.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(np.float64)
    bins = _confidence_bins(conf, n_bins)
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
    bins = _confidence_bins(conf, n_bins)
    right = np.random.default_rng(seed).random((draws, len(conf))) < conf  # (draws, clips)
    hits = np.stack([np.bincount(bins, r, n_bins) for r in right])  # (draws, bins)
    gap = np.abs(hits - np.bincount(bins, conf, n_bins))  # |correct - summed confidence| per bin, x count
    ece = gap.sum(1) / max(len(conf), 1)
    return {"ece_floor": float(ece.mean()), "ece_floor_p95": float(np.percentile(ece, 95))}


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


def score_parts(kind) -> tuple[str, ...]:
    """The scores of :data:`BASE_SCORES` that ``kind`` adds: itself, or the parts of a sum such as
    ``energy+mahalanobis`` (distinct, at most one of the embedding: they would share the rule's references)."""
    parts = tuple(kind.split("+")) if isinstance(kind, str) else ()
    if not (parts and set(parts) <= set(BASE_SCORES) and len(set(parts)) == len(parts)
            and sum(p in EMBEDDING_SCORES for p in parts) <= 1):
        raise AudioclfError(f"Unsupported score={kind!r}; choose one of {', '.join(SCORES)}, or a sum of distinct "
                            f"ones of {', '.join(BASE_SCORES)} joined by '+' (at most one of {', '.join(EMBEDDING_SCORES)})")
    return parts


def needs_embedding(kind: str) -> bool:
    """Whether the score ``kind`` (or a part of it) compares the clip's embedding with the training clips'."""
    return any(p in EMBEDDING_SCORES for p in score_parts(kind))


def reference_embeddings(kind: str, emb, labels, n_classes: int) -> dict:
    """What a rule of ``kind`` compares a clip's embedding with, from the training clips' ``emb`` ``(clips, d)``
    and ``labels``, as :class:`Rejector` fields: ``refs``, the class means (``embedding``) or every clip's
    unit-length embedding (``knn``); for ``mahalanobis``, :func:`mahalanobis_references`; ``{}`` for the
    scores of the logits alone."""
    part = next((p for p in score_parts(kind) if p in EMBEDDING_SCORES), None)
    if part == "embedding":
        return {"refs": class_means(emb, labels, n_classes)}
    if part == "knn":
        return {"refs": F.normalize(torch.as_tensor(np.asarray(emb), dtype=torch.float32), dim=1)}
    if part == "mahalanobis":
        return mahalanobis_references(emb, labels)
    return {}


def mahalanobis_references(emb, labels) -> dict:
    """``refs`` ``(classes, d)``: the mean of the unit-length embeddings of each class that has training clips;
    ``precision`` ``(d, d)``: the inverse of one covariance of the clips around their own class's mean, shrunk
    towards a multiple of the identity (Ledoit-Wolf), which keeps it invertible with fewer clips than
    dimensions. Both float64: the score subtracts quadratic forms of a few thousand."""
    from sklearn.covariance import LedoitWolf

    e = F.normalize(torch.as_tensor(np.asarray(emb), dtype=torch.float64), dim=1).numpy()
    y = np.asarray(labels)
    if len(e) < 2:
        raise AudioclfError(f"the mahalanobis score needs at least 2 training clips to fit a covariance; got {len(e)}")
    present = np.unique(y)
    means = np.stack([e[y == c].mean(0) for c in present])
    precision = LedoitWolf().fit(e - means[np.searchsorted(present, y)]).precision_
    return {"refs": torch.from_numpy(means), "precision": torch.from_numpy(precision)}


def known_score(kind: str, logits: torch.Tensor, emb: Optional[torch.Tensor] = None,
                refs: Optional[torch.Tensor] = None, temperature: float = 1.0, k: int = KNN_K,
                precision: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(batch,)`` score of each clip, higher the more it looks like a trained class.

    Args:
        kind (str): one of :data:`BASE_SCORES` (a sum is a :class:`Rejector`'s: it standardises the parts).
        logits (torch.Tensor): ``(batch, classes)``.
        emb (torch.Tensor, optional): ``(batch, d)`` embeddings; needed by :data:`EMBEDDING_SCORES`.
        refs (torch.Tensor, optional): ``(n, d)`` :func:`reference_embeddings`; needed by
            :data:`EMBEDDING_SCORES`.
        temperature (float, optional): divides the logits of ``msp`` and ``energy``. (Default: ``1.0``)
        k (int, optional): ``knn`` scores the cosine similarity to the ``k``-th nearest reference.
            (Default: :data:`KNN_K`)
        precision (torch.Tensor, optional): ``(d, d)`` inverse covariance of ``mahalanobis``.
    """
    if kind == "msp":
        return torch.softmax(logits.float() / temperature, -1).amax(-1)
    if kind == "energy":
        return temperature * torch.logsumexp(logits.float() / temperature, -1)
    if kind in EMBEDDING_SCORES:
        if emb is None or refs is None or (kind == "mahalanobis" and precision is None):
            raise AudioclfError(f"the {kind} score needs the clips' embeddings and the training clips' references")
        if kind == "mahalanobis":
            return -_mahalanobis_sq(emb, refs, precision).amin(-1).float()
        sim = F.normalize(emb.float(), dim=-1) @ refs.to(emb.device, torch.float32).T  # (batch, n)
        return sim.topk(min(k if kind == "knn" else 1, sim.shape[-1]), dim=-1).values[..., -1]
    score_parts(kind)  # names the allowed scores if kind is none of them
    raise AudioclfError(f"score={kind!r} is a sum: fit_rejector standardises its parts on the validation clips")


def _mahalanobis_sq(emb: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(batch, classes)`` squared Mahalanobis distances of the unit-length ``emb`` to ``means``, in float64."""
    e = F.normalize(emb.double(), dim=-1)
    mu, p = means.to(e.device, torch.float64), precision.to(e.device, torch.float64)
    ep = e @ p  # (batch, d)
    return (ep * e).sum(-1, keepdim=True) - 2 * ep @ mu.T + ((mu @ p) * mu).sum(-1)


def _tensor(a) -> Optional[torch.Tensor]:
    return None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.float32)


@dataclass
class Rejector:
    """The unknown rule of a model: ``kind`` of score, and the ``threshold`` below which an input is unknown.

    ``keep_known`` is the share of known validation clips the threshold keeps; ``refs`` and ``precision`` are
    the :func:`reference_embeddings` of its embedding score (``None`` for the others), ``k`` the neighbour
    ``knn`` scores; ``standardize`` holds a sum's ``(mean, std)`` of each part on the known validation clips.
    """

    kind: str
    threshold: float
    keep_known: float
    temperature: float = 1.0
    refs: Optional[torch.Tensor] = None
    k: int = KNN_K
    precision: Optional[torch.Tensor] = None
    standardize: Optional[list] = None

    @property
    def parts(self) -> tuple[str, ...]:
        return score_parts(self.kind)

    @property
    def needs_embedding(self) -> bool:
        return needs_embedding(self.kind)

    def part_scores(self, logits: torch.Tensor, emb: Optional[torch.Tensor] = None) -> list:
        """:func:`known_score` ``(batch,)`` of each part of the rule's score."""
        return [known_score(p, logits, emb, self.refs, self.temperature, self.k, self.precision) for p in self.parts]

    def torch_score(self, logits: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(batch,)`` the rule's score: its one score, or the sum of its standardised parts."""
        scores = self.part_scores(logits, emb)
        if len(scores) == 1:
            return scores[0]
        if self.standardize is None or len(self.standardize) != len(scores):
            raise AudioclfError(f"the {self.kind} score needs each part's mean and std on the validation clips "
                                f"(fit_rejector fits them)")
        return sum((s - m) / sd for s, (m, sd) in zip(scores, self.standardize))

    def score(self, logits, emb=None) -> np.ndarray:
        """:meth:`torch_score` of numpy or torch outputs, as numpy."""
        return self.torch_score(_tensor(logits), _tensor(emb)).cpu().numpy()

    def keep(self, logits, emb=None) -> np.ndarray:
        """``(clips,)`` True where the rule keeps a clip (its score reaches the threshold)."""
        return self.score(logits, emb) >= self.threshold

    def to_dict(self) -> dict:
        """What a checkpoint and an export's config.json store under ``"reject"`` (builtins only)."""
        d = {"score": self.kind, "threshold": float(self.threshold), "keep_known": float(self.keep_known)}
        if "knn" in self.parts:
            d.update(k=int(self.k), train_embeddings=_rounded(self.refs))
        elif "mahalanobis" in self.parts:
            d.update(class_means=_significant(self.refs), precision=_significant(self.precision))
        elif self.refs is not None:
            d["class_means"] = self.refs.tolist()
        if self.standardize is not None:
            d["standardize"] = [[float(m), float(s)] for m, s in self.standardize]
        return d

    @classmethod
    def from_dict(cls, d: dict, temperature: float = 1.0) -> "Rejector":
        parts = score_parts(d["score"])
        dtype = torch.float64 if "mahalanobis" in parts else torch.float32
        tensor = (lambda key: None if d.get(key) is None else torch.tensor(d[key], dtype=dtype))
        standardize = d.get("standardize")
        return cls(d["score"], float(d["threshold"]), float(d["keep_known"]), temperature,
                   tensor("train_embeddings" if "knn" in parts else "class_means"), int(d.get("k", KNN_K)),
                   tensor("precision"), None if standardize is None else [(float(m), float(s)) for m, s in standardize])


def _rounded(refs: torch.Tensor) -> list:
    """Unit vectors as lists of floats with 5 decimals: cosine similarities move by < 1e-4, and a thousand
    training clips' embeddings stay a few MB in an export's config.json."""
    return np.round(refs.numpy().astype(np.float64), 5).tolist()


def _significant(matrix: torch.Tensor) -> list:
    """A matrix as lists of floats with 7 significant digits (float32's): a precision matrix spans orders of
    magnitude that fixed decimals would cut, and 17 digits would double the size of config.json."""
    return [[float(f"{v:.7g}") for v in row] for row in matrix.tolist()]


def fit_rejector(kind: str, keep_known: float, logits, emb=None, refs: Optional[dict] = None,
                 temperature: float = 1.0, k: int = KNN_K) -> Rejector:
    """The rule whose threshold keeps ``keep_known`` (a share in (0, 1]) of the validation clips given by
    their ``logits`` (and ``emb``, for the embedding scores, with the training clips'
    :func:`reference_embeddings` ``refs``). A sum's parts are standardised on the same validation clips."""
    if not 0 < keep_known <= 1:
        raise AudioclfError(f"keep_known={keep_known!r} is out of range: it must be in (0, 1]")
    r = Rejector(kind, 0.0, keep_known, temperature, k=k, **(refs or {}))
    if len(r.parts) > 1:
        # a part constant on the validation clips tells none apart; a std of 1 keeps it from dividing by zero
        r.standardize = [(float(s.double().mean()), float(s.double().std(unbiased=False)) or 1.0)
                         for s in r.part_scores(_tensor(logits), _tensor(emb))]
    r.threshold = keep_threshold(r.score(logits, emb), keep_known)
    return r


def keep_threshold(scores, keep: float) -> float:
    """The highest threshold that ``keep`` (a share) of ``scores`` reach."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    return float(s[len(s) - math.ceil(keep * len(s) - 1e-9)])


# the matrices each embedding score saves
_SAVED_REFS = {"embedding": ("class_means",), "knn": ("train_embeddings",), "mahalanobis": ("class_means", "precision")}


def read_trust(saved: dict, source="the model") -> tuple[float, Optional[Rejector]]:
    """(temperature, rule) stored in a checkpoint dict or an export's config.json: ``(1.0, None)`` for a model
    saved before audioclf fitted them, or a multilabel one. Damaged values are an AudioclfError naming ``source``
    and the key."""
    t, reject = saved.get("temperature", 1.0), saved.get("reject")
    if not (_finite(t) and t > 0):
        raise AudioclfError(f"{source}: temperature={t!r} must be a positive finite number")
    if reject is None:
        return float(t), None
    problem = _rule_problem(reject)
    if problem:
        raise AudioclfError(f"{source}: its unknown rule {str(reject)[:80]!r} is damaged: {problem}; load it with "
                            f"reject=False (--no-reject), or fit it again")
    return float(t), Rejector.from_dict(reject, float(t))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rule_problem(reject) -> Optional[str]:
    """What is wrong with a saved rule (``reject``), naming the key; None when nothing is."""
    if not isinstance(reject, dict):
        return "it must be a dict"
    try:
        parts = score_parts(reject.get("score"))
    except AudioclfError:
        return f"score must be one of {', '.join(SCORES)} (or a sum of them joined by '+')"
    for key in ("threshold", "keep_known"):
        if not _finite(reject.get(key)):
            return f"{key} must be a finite number"
    if not 0 < reject["keep_known"] <= 1:
        return "keep_known must be in (0, 1]"
    k = reject.get("k", KNN_K)
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        return "k must be an integer >= 1"
    shapes = []
    for key in next((_SAVED_REFS[p] for p in parts if p in _SAVED_REFS), ()):
        shapes.append(_matrix_shape(reject.get(key)))
        if shapes[-1] is None:
            return f"{key} must be a non-empty list of equal-length lists of finite numbers"
    if len(shapes) == 2 and shapes[1] != (shapes[0][1], shapes[0][1]):
        return f"precision must be {shapes[0][1]} x {shapes[0][1]}, as wide as class_means; it is {shapes[1]}"
    pairs = reject.get("standardize")
    if len(parts) > 1 and not (isinstance(pairs, list) and len(pairs) == len(parts) and all(
            isinstance(p, list) and len(p) == 2 and _finite(p[0]) and _finite(p[1]) and p[1] > 0 for p in pairs)):
        return f"standardize must hold one [mean, std > 0] per part of {reject['score']}"
    return None


def _matrix_shape(value) -> Optional[tuple]:
    """``(rows, columns)`` of a non-empty list of equal-length lists of finite numbers, else None."""
    if not (isinstance(value, list) and value and all(isinstance(row, list) for row in value)):
        return None
    width = len(value[0])
    if not width or any(len(row) != width or not all(_finite(v) for v in row) for row in value):
        return None
    return len(value), width


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
