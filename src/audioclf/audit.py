"""Dataset audit: what a dataset holds, and what would make numbers measured on it wrong.

``audit_dataset(data)`` reads any layout :func:`audioclf.data.load_clips` reads and finds

- **counts**: clips per class and fold; durations, sample rates, channels and formats;
- **unreadable, silent and clipped clips**, from each clip decoded as stored;
- **exact duplicates**: the same decoded samples at the same sample rate (a hash of them), whatever the
  container (a WAV and its FLAC copy are one clip);
- **near-duplicates**: pairs whose embeddings (the pooled trunk of an AudioSet-pretrained MobileNet, centred on
  the dataset's mean) have a cosine similarity of at least ``near_threshold`` are candidates, confirmed when
  their aligned log-mel fingerprints (:mod:`audioclf.fingerprint`) correlate at least ``match_threshold``.
  A pair in two folds is leakage: a model is tested on what it trained on. Without folds, a pair in two
  groups is, since a split keeps only groups whole;
- **likely label errors**: cleanlab's ``find_label_issues`` on out-of-fold class probabilities, from a
  logistic regression on the same embeddings cross-validated over the folds (group-aware folds where the
  dataset has none), or from ``probs`` (:func:`load_probabilities`: a CSV, or an ``audioclf cv`` folder).

The report (``audit.md``, PNGs, ``audit.json``) is :mod:`audioclf.audit_report`'s.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import decode
from .clips import Clip, ClipSet
from .config import DataConfig
from .errors import AudioclfError
from .data import assign_folds, load_clips
from .options import AuditOptions, PredictOptions
from .runtime import auto_workers

log = logging.getLogger(__name__)

NEAR_THRESHOLD, MATCH_THRESHOLD = AuditOptions.near_threshold, AuditOptions.match_threshold  # measured there
SILENCE_DB = -60.0  # dBFS: a clip whose peak stays below this is silent
FULL_SCALE = 0.999  # |sample| at or above this is at digital full scale
CLIP_RUN = 3  # consecutive samples at full scale: a flat top, which a peak-normalised clip does not have
CLIPPED_SHARE = 0.001  # share of samples in flat tops above which a clip is clipped
LABEL_FOLDS = 5  # folds of the linear probe when the dataset has none
# the probe's inverse regularisation strength, by measurement on ESC-10 (benchmarks/audit.py): of 0.1, 0.3, 1 and
# 3, 3 found the most flipped labels
PROBE_C = 3.0
CLEANLAB_INSTALL = 'pip install "audioclf[audit]"'


def relative_path(path: str, data: DataConfig) -> str:
    """``path`` (a clip's absolute path) as the dataset's manifest names it: relative to the CSV's folder, the
    class folders' root, ESC-50's ``audio/`` or UrbanSound8K's ``audio/foldN/``; absolute when outside them."""
    root = Path(os.path.realpath(data.root))
    base = {"csv": root.parent, "esc50": root / "audio"}.get(data.format, root)
    if data.format == "urbansound8k":
        base = Path(path).parent
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel


# ---------------------------------------------------------------------------------------------- scan

def clip_facts(path: str) -> dict:
    """What one clip holds, decoded as stored: ``sample_rate`` (Hz), ``channels``, ``duration_s``, ``peak_db``
    (dBFS), ``clipped`` (share of samples in flat tops at full scale) and ``hash`` (of the samples and rate);
    or ``error``, why it cannot be read."""
    try:
        wave, sr = decode(path)
    except AudioclfError as e:
        return {"error": str(e)}
    except Exception as e:  # one corrupt file must not end the audit
        return {"error": f"{path}: {type(e).__name__}: {e}"}
    peak = float(np.abs(wave).max())
    at_full = np.abs(wave) >= FULL_SCALE  # (time, channels)
    in_runs = 0
    for column in at_full.T:
        # lengths of the runs of True: differences of the edges of the padded column
        edges = np.flatnonzero(np.diff(np.concatenate([[0], column.view(np.int8), [0]])))
        runs = edges[1::2] - edges[::2]
        in_runs += int(runs[runs >= CLIP_RUN].sum())
    digest = hashlib.sha256(np.int64(sr).tobytes() + np.ascontiguousarray(wave).tobytes()).hexdigest()
    return {"error": None, "sample_rate": int(sr), "channels": int(wave.shape[1]), "duration_s": wave.shape[0] / sr,
            "peak_db": float(20 * np.log10(max(peak, 1e-10))), "clipped": in_runs / wave.size, "hash": digest}


class _Facts(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return clip_facts(self.paths[i])


def scan_clips(clips: Sequence[Clip], quiet: bool = False) -> list[dict]:
    """:func:`clip_facts` of every clip, decoded in background workers, in order."""
    loader = torch.utils.data.DataLoader(_Facts([c.path for c in clips]), batch_size=None,
                                         num_workers=auto_workers(main_process_busy=False) if len(clips) > 8 else 0)
    return list(tqdm(loader, total=len(clips), desc="scan", unit="clip", disable=True if quiet else None))


# ---------------------------------------------------------------------------------------------- embeddings

class EmbedAndTag(torch.nn.Module):
    """An AudioSet MobileNet whose ``embed`` gives its pooled trunk (the first ``n_trunk`` columns: what
    near-duplicates are found with) followed by its 527 AudioSet logits (which the linear probe also reads:
    on ESC-10 the two together found more flipped labels than either, benchmarks/audit.py), in one pass."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.net  # the MobileNet inside AudioMobileNet
        self.n_trunk = self.net.n_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) features -> (batch, n_trunk + 527)."""
        trunk = self.net.features(x.unsqueeze(1))
        return torch.cat([trunk.mean((2, 3)), self.net.classifier(trunk)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1))


def pretrained_embedder(backbone: str = "mn04_as", weights_path: Optional[str] = None, *, duration_s: float = 5.0,
                        device: str = "auto", batch_size: int = 32):
    """A :class:`audioclf.predict.Classifier` whose ``embed_files`` gives ``backbone``'s AudioSet-pretrained
    embedding and AudioSet logits (:class:`EmbedAndTag`, :func:`audioclf.audioset.pretrained_model`), on
    windows of ``duration_s`` seconds.

    Raises:
        AudioclfError: for a backbone without AudioSet weights, or weights that cannot be had (the message
            says where to get them).
    """
    from .audioset import pretrained_model
    from .predict import Classifier

    net, config, labels = pretrained_model(backbone, weights_path)
    config = replace(config, features=replace(config.features, duration_s=duration_s))
    return Classifier(EmbedAndTag(net).eval(), config, labels, device=device, batch_size=batch_size)


def embedding_window_s(durations: Sequence[float]) -> float:
    """The embedding window: the median clip's length, within [0.5, 10] s, so short clips are not mostly
    padding and long ones are averaged over a few windows."""
    return float(np.clip(np.median(durations), 0.5, 10.0)) if len(durations) else 5.0


def centred_unit(emb: np.ndarray) -> np.ndarray:
    """Rows minus their mean, scaled to unit length: the trunk's features are all positive, so raw cosines
    of unrelated clips crowd near 1; centred, they spread around 0."""
    x = emb - emb.mean(axis=0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------- duplicates

def exact_pairs(hashes: Sequence[Optional[str]]) -> list[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, of equal hashes (``None`` matches nothing)."""
    by_hash = defaultdict(list)
    for i, h in enumerate(hashes):
        if h is not None:
            by_hash[h].append(i)
    return [(a, b) for same in by_hash.values() for k, a in enumerate(same) for b in same[k + 1:]]


def near_pairs(unit: np.ndarray, threshold: float, block: int = 1024) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, cosine)``, ``i < j``, of rows of ``unit`` (unit length) with a cosine of at least
    ``threshold``, most similar first; computed a block of rows at a time, so memory stays ``block x n``."""
    found = []
    for start in range(0, len(unit), block):
        sims = unit[start:start + block] @ unit.T  # (block, n)
        rows, cols = np.nonzero(sims >= threshold)
        keep = cols > rows + start
        found += [(int(i + start), int(j), float(sims[i, j])) for i, j in zip(rows[keep], cols[keep])]
    return sorted(found, key=lambda p: -p[2])


def crosses(a: Clip, b: Clip) -> bool:
    """Whether a split can put ``a`` and ``b`` on two sides: two folds, or without folds two groups."""
    if a.fold is not None and b.fold is not None:
        return a.fold != b.fold
    return a.group_key != b.group_key


def confirm(pairs: Sequence[tuple[int, int, float]], clips: Sequence[Clip],
            quiet: bool = False) -> list[tuple[int, int, float, float, float]]:
    """``(i, j, cosine, match, offset_s)`` of each candidate pair: :func:`audioclf.fingerprint.aligned_match` of
    the two clips' fingerprints (each computed once); a clip that cannot be read matches nothing."""
    from .fingerprint import aligned_match, fingerprint

    prints: dict[int, Optional[np.ndarray]] = {}

    def of(i: int) -> Optional[np.ndarray]:
        if i not in prints:
            try:
                prints[i] = fingerprint(clips[i].path)
            except AudioclfError:
                prints[i] = None
        return prints[i]

    out = []
    for a, b, cosine in tqdm(pairs, desc="confirm", unit="pair", disable=True if quiet or len(pairs) < 100 else None):
        fa, fb = of(a), of(b)
        match, offset = aligned_match(fa, fb) if fa is not None and fb is not None else (0.0, 0.0)
        out.append((a, b, cosine, match, offset))
    return out


# ---------------------------------------------------------------------------------------------- label errors

def probe_folds(clips: Sequence[Clip], seed: int = 0) -> np.ndarray:
    """Each clip's fold for out-of-fold probabilities: the dataset's, or :data:`LABEL_FOLDS` stratified group
    folds where it has none (fewer when there are fewer groups)."""
    if all(c.fold is not None for c in clips) and len({c.fold for c in clips}) >= 2:
        return np.array([c.fold for c in clips])
    n_groups = len({c.group_key for c in clips})
    if n_groups < 2:
        raise AudioclfError(f"{len(clips)} clips in {n_groups} group: out-of-fold probabilities need at least 2")
    smallest = min(Counter(c.label for c in clips).values())  # a class in every fold, where it can be
    return np.array(assign_folds(clips, max(2, min(LABEL_FOLDS, n_groups, smallest)), seed))


def probe_probabilities(emb: np.ndarray, labels: np.ndarray, folds: np.ndarray, n_classes: int, *,
                        c: float = PROBE_C) -> np.ndarray:
    """Out-of-fold class probabilities ``(clips, n_classes)``: a logistic regression (inverse regularisation
    strength ``c``) on the standardised embeddings, trained on all folds but one and applied to that one, for
    each fold. A class missing from a fold's training clips gets probability 0 there."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(labels), n_classes))
    for k in tqdm(np.unique(folds), desc="probe", unit="fold", disable=True if len(folds) < 1000 else None):
        test = folds == k
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        probe.fit(emb[~test], labels[~test])
        probs[np.ix_(test, probe.classes_)] = probe.predict_proba(emb[test])
    return probs


def label_issues(labels: np.ndarray, probs: np.ndarray) -> list[tuple[int, int, float]]:
    """cleanlab's ``find_label_issues``: ``(row, suggested label, score)`` of each clip whose given label is
    likely wrong, most likely first; the score is cleanlab's label quality (the out-of-fold probability of
    the given label: lower is more likely wrong)."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise AudioclfError(f"finding label errors needs cleanlab, an optional dependency: {CLEANLAB_INSTALL}") from None
    probs = probs / probs.sum(axis=1, keepdims=True)
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return [(int(i), int(probs[i].argmax()), float(quality[i])) for i in ranked]


def load_probabilities(source, clips: Sequence[Clip], classes: Sequence[str], data: DataConfig, *,
                       device: str = "auto", batch_size: int = 32, quiet: bool = False) -> np.ndarray:
    """Out-of-fold probabilities ``(clips, classes)`` from ``source``; a clip it has none for gets a row of NaN.

    ``source`` is a CSV with a ``path`` column (as :func:`relative_path` or the manifest gives it, or absolute)
    and a column per class name (``oof_probs.csv``, which every audit writes, is one), or an ``audioclf cv``
    folder: each ``fold<k>/`` model classifies the clips of its test fold ``k`` (the folds of ``folds.csv``
    there when the dataset has none).
    """
    source = Path(source)
    if source.is_dir():
        return _cv_probabilities(source, clips, classes, device, batch_size, quiet)
    probs = np.full((len(clips), len(classes)), np.nan)
    row_of = {c.path: i for i, c in enumerate(clips)} | {relative_path(c.path, data): i for i, c in enumerate(clips)}
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [name for name in ["path", *classes] if name not in (reader.fieldnames or [])]
            if missing:
                raise AudioclfError(f"--probs {source}: missing column(s) {', '.join(missing)}; it needs path and one "
                                    f"column per class")
            for line in reader:
                i = row_of.get(line["path"], row_of.get(os.path.realpath(source.parent / line["path"])))
                if i is not None:
                    probs[i] = [float(line[name]) for name in classes]
    except OSError as e:
        raise AudioclfError(f"--probs {source}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise AudioclfError(f"--probs {source}: a probability is not a number ({e})") from None
    return probs


def _cv_probabilities(cv_dir: Path, clips: Sequence[Clip], classes: Sequence[str], device: str, batch_size: int,
                      quiet: bool) -> np.ndarray:
    from .predict import load

    runs = sorted(p for p in cv_dir.glob("fold*") if p.name[4:].isdigit() and (p / "best.pt").is_file())
    if not runs:
        raise AudioclfError(f"--probs {cv_dir}: no fold<k>/best.pt in it; give an audioclf cv folder or a CSV")
    folds = [c.fold for c in clips]
    if (cv_dir / "folds.csv").is_file():  # cv made the folds itself
        by_path = {c.path: c.fold for c in load_clips(DataConfig(root=str(cv_dir / "folds.csv"), format="csv")).clips}
        folds = [by_path.get(c.path) for c in clips]
    probs = np.full((len(clips), len(classes)), np.nan)
    for run in runs:
        rows = [i for i, k in enumerate(folds) if k == int(run.name[4:])]
        clf = load(run, device, batch_size=batch_size)
        unknown = [name for name in classes if name not in clf.labels]
        if unknown:
            raise AudioclfError(f"--probs {run}: the model has no class {', '.join(unknown)}")
        columns = [clf.labels.index(name) for name in classes]
        for i, r in zip(rows, clf.classify_files([clips[i].path for i in rows], quiet=quiet)):
            if not r["error"]:
                probs[i] = np.asarray(r["probs"])[columns]
    return probs


def write_probabilities(path, paths: Sequence[str], classes: Sequence[str], probs: np.ndarray) -> None:
    """The CSV :func:`load_probabilities` reads: ``path`` and one column per class; rows of NaN left out."""
    from .fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", *classes])
        w.writerows([p, *(f"{v:.6f}" for v in row)] for p, row in zip(paths, probs) if np.isfinite(row).all())


# ---------------------------------------------------------------------------------------------- the audit

def audit_dataset(data: DataConfig, *, backbone: str = AuditOptions.backbone, weights_path: Optional[str] = None,
                  near_threshold: float = NEAR_THRESHOLD, match_threshold: float = MATCH_THRESHOLD, probs=None,
                  embedder=None, device: str = PredictOptions.device, batch_size: int = PredictOptions.batch_size,
                  seed: int = 0, quiet: bool = False) -> dict:
    """Audit the dataset ``data`` describes.

    Args:
        data (DataConfig): the dataset (root, format, esc10).
        backbone (str, optional): the pretrained network whose embeddings find near-duplicates and feed the
            linear probe; an AudioSet MobileNet (``mn04_as`` ... ``mn40_as``). (Default: ``"mn04_as"``)
        weights_path (str, optional): a local copy of its official weights. (Default: the torch hub cache, or
            a download)
        near_threshold (float, optional): cosine similarity of centred embeddings, in (0, 1], from which two
            clips are near-duplicate candidates. (Default: :data:`NEAR_THRESHOLD`)
        match_threshold (float, optional): correlation of aligned fingerprints, in (0, 1], from which a
            candidate is a near-duplicate (:mod:`audioclf.fingerprint`). (Default: :data:`MATCH_THRESHOLD`)
        probs (str or Path, optional): out-of-fold probabilities for the label-error search
            (:func:`load_probabilities`). (Default: the linear probe's)
        embedder (Classifier, optional): a model whose ``embed_files`` gives the embeddings, in place of
            ``backbone``'s pretrained ones (a model of your own, or a small one in tests). (Default: ``None``)
        device (str, optional): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. (Default: ``"auto"``)
        batch_size (int, optional): windows per forward pass. (Default: ``32``)
        seed (int, optional): seed of the probe's folds where the dataset has none. (Default: ``0``)
        quiet (bool, optional): no progress bars. (Default: ``False``)

    Returns:
        dict: ``clipset``, ``facts`` (:func:`clip_facts` per clip), ``paths`` (as the manifest gives them),
        ``exact`` (pairs of clip indices), ``candidates`` (:func:`confirm`'s tuples) and ``near`` (those that
        matched), ``issues`` (:func:`label_issues`, clip indices), ``embeddings`` (NaN rows for clips not
        embedded), ``probs`` (the out-of-fold probabilities, or None) and ``settings``.
    """
    AuditOptions(backbone, near_threshold, match_threshold)  # refuses a value out of its range, naming it
    unavailable = None if embedder is not None else _weights_problem(backbone, weights_path)
    clipset: ClipSet = load_clips(data)
    clips = clipset.clips
    log.info("auditing %s: %s", data.root, clipset.describe())
    facts = scan_clips(clips, quiet)
    # silence embeds as one point, and a silent clip carries no evidence of its label
    audible = [i for i, f in enumerate(facts) if not f["error"] and f["peak_db"] >= SILENCE_DB]
    window_s = embedding_window_s([facts[i]["duration_s"] for i in audible])
    embedded_by = f"{backbone}'s AudioSet" if embedder is None else "the given model's"
    if embedder is None and audible and not unavailable:
        embedder = pretrained_embedder(backbone, weights_path, duration_s=window_s, device=device,
                                       batch_size=batch_size)
    emb = _embeddings(embedder, clips, [] if unavailable else audible, quiet)
    usable = [i for i in audible if emb.shape[1] and np.isfinite(emb[i]).all()]
    trunk = getattr(getattr(embedder, "model", None), "n_trunk", emb.shape[1])  # the embedding, without the tags

    exact = exact_pairs([None if f["error"] else f["hash"] for f in facts])
    candidates = []
    if len(usable) > 1:
        found, same = near_pairs(centred_unit(emb[usable, :trunk]), near_threshold), set(exact)
        candidates = confirm([(usable[a], usable[b], s) for a, b, s in found if (usable[a], usable[b]) not in same],
                             clips, quiet)

    labels = np.array([c.label for c in clips])
    oof, source = None, f"none ({unavailable or 'no audible clips'})"
    if probs is not None:
        oof, source = load_probabilities(probs, clips, clipset.classes, data, device=device, batch_size=batch_size,
                                         quiet=quiet), str(probs)
    elif len(usable) > 1:
        oof = np.full((len(clips), len(clipset.classes)), np.nan)
        oof[usable] = probe_probabilities(emb[usable], labels[usable], probe_folds([clips[i] for i in usable], seed),
                                          len(clipset.classes))
        source = f"linear probe on {embedded_by} embeddings"
    return {"clipset": clipset, "facts": facts, "paths": [relative_path(c.path, data) for c in clips],
            "exact": exact, "candidates": candidates, "near": [p for p in candidates if p[3] >= match_threshold],
            "issues": [] if oof is None else _issues(labels, oof), "embeddings": emb, "n_trunk": trunk, "probs": oof,
            "settings": {"backbone": backbone, "near_threshold": near_threshold, "match_threshold": match_threshold,
                         "embedding_window_s": window_s, "silence_db": SILENCE_DB, "clipped_share": CLIPPED_SHARE,
                         "probs": source, "embeddings": unavailable or f"{embedded_by} embeddings"}}


def _weights_problem(backbone: str, weights_path: Optional[str]) -> Optional[str]:
    """Why ``backbone``'s weights cannot be had (then the audit goes on without embeddings: no near-duplicates,
    no linear probe, and the report says so), or None."""
    from .weights import weights_file

    try:
        weights_file(backbone, weights_path)
    except AudioclfError as e:
        log.warning("%s -- auditing without embeddings: no near-duplicates, and no label errors unless --probs "
                    "gives probabilities", e)
        return f"no embeddings: {e}"
    return None


def _embeddings(embedder, clips: Sequence[Clip], rows: list[int], quiet: bool) -> np.ndarray:
    """``(clips, d)`` embeddings of the clips at ``rows``; the other rows (and unreadable clips) are NaN."""
    if not rows:
        return np.full((len(clips), 0), np.nan, np.float32)
    got = embedder.embed_files([clips[i].path for i in rows], quiet=quiet)
    emb = np.full((len(clips), got.shape[1]), np.nan, np.float32)
    emb[rows] = got
    return emb


def _issues(labels: np.ndarray, oof: np.ndarray) -> list[tuple[int, int, float]]:
    """:func:`label_issues` over the clips that have out-of-fold probabilities, as clip indices."""
    rows = np.flatnonzero(np.isfinite(oof).all(axis=1))
    if len(rows) < len(labels):
        log.warning("%d of %d clips have no out-of-fold probabilities: the label-error search leaves them out",
                    len(labels) - len(rows), len(labels))
    if len(set(labels[rows].tolist())) < 2:
        return []
    return [(int(rows[r]), k, s) for r, k, s in label_issues(labels[rows], oof[rows])]
