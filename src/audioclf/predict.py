"""Inference: one path from audio to class probabilities, used by the Python API, ``audioclf predict``,
``audioclf evaluate`` and the HTTP server.

A clip up to the training duration is padded exactly as in training (``audio.fix_length``); a longer one
is cut into sliding windows (:mod:`audioclf.windows`) and gets the mean of the window probabilities (tags:
their maximum). Windows of many inputs share model batches. The model's temperature divides its logits, and
its unknown rule (:mod:`audioclf.trust`) answers ``unknown`` for an input below its threshold. The
``predict`` and ``embed`` commands around this live in :mod:`audioclf.commands`.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import deque
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import default_hop
from .checkpoint import SavedModel, load_model, saved_extras, weights_file
from .config import RunConfig
from .errors import AudioclfError
from .metrics import tags_above
from .model import WaveformClassifier, activation
from .options import PredictOptions
from .runtime import auto_workers, cpu_threads_beside, dying_with_parent, resolve_device
from .trust import TRUST_KEYS, UNKNOWN, read_trust
from .waveforms import unbatch
from .windows import LimitError, PrepareFiles, Source, count_windows, limited, prepare  # noqa: F401
# LimitError, count_windows: predict's API (the server's) before the windows moved out

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- classifier

class Classifier:
    """A trained model ready for inference; build it with :func:`load`.

    Args:
        model (nn.Module): the trained network (:func:`audioclf.model.build_network`).
        config (RunConfig): its run config; ``config.features`` is the only source of feature settings.
        labels (list of str): class names, the order of probability columns.
        device (str, optional): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. (Default: ``"auto"``)
        batch_size (int, optional): windows per forward pass. (Default: ``32``)
        thresholds (list of float, optional): a multilabel model's tags' thresholds. (Default: 0.5 each)
        trust (dict, optional): the model's ``temperature`` and ``reject`` rule as saved (``trust.read_trust``).
            (Default: none: temperature 1, no rule)
        reject (bool, optional): answer ``"unknown"`` for inputs below the rule's threshold. (Default: ``True``)

    Inputs are file paths, or numpy arrays / torch tensors of shape ``(time,)`` or ``(channels, time)``
    in [-1, 1]; an array's ``sample_rate`` (Hz) defaults to the training sample rate.
    """

    weights_file: Optional[str] = None  # the file load() read the weights from; None for a model built in Python

    def __init__(self, model: torch.nn.Module, config: RunConfig, labels: Sequence[str], *,
                 device: str = PredictOptions.device, batch_size: int = PredictOptions.batch_size, thresholds=None,
                 trust: Optional[dict] = None, reject: bool = PredictOptions.reject):
        if batch_size < 1:
            raise AudioclfError(f"batch_size={batch_size} must be >= 1")
        self.labels = list(labels)
        self.config = config
        self.multilabel, self.thresholds = config.train.task == "multilabel", thresholds
        self.device = resolve_device(str(device))
        self.batch_size = batch_size
        self.temperature, rejector = read_trust(trust or {})
        self.rejector = rejector if reject and not self.multilabel else None
        # channels_last: oneDNN and cuDNN convolve it fastest (1.3x on a 2-core CPU, same fp32 arithmetic)
        self._net = WaveformClassifier(config.features, model, config.train.task, self.temperature).to(
            self.device, memory_format=torch.channels_last).eval()
        self.model = self._net.model

    def __repr__(self):
        f = self.config.features
        return (f"Classifier({len(self.labels)} classes, {f.sample_rate} Hz, {f.duration_s:g} s windows, "
                f"device={self.device})")

    # -- public API

    def predict_proba(self, audio, sample_rate: Optional[int] = None, *, batch: Optional[bool] = None) -> np.ndarray:
        """Class probabilities, columns in ``labels`` order: ``(n_classes,)`` for one input, ``(n, n_classes)``
        for a list of inputs.

        Args:
            batch (bool, optional): a 2-D (or 3-D) array's first axis: ``True``, clips (one row each); ``False``,
                one clip's channels (mixed down). Required for 2-D input, which could be either. (Default: ``None``)
        """
        return self._window_means(audio, sample_rate, width=len(self.labels), batch=batch)

    def predict(self, audio, sample_rate: Optional[int] = None, *, batch: Optional[bool] = None):
        """The most probable label (a list of them for several inputs), from ``predict_proba``; ``"unknown"``
        for an input the model's rule rejects."""
        audio = unbatch(audio, batch)
        labels = [self._decide(s)[0] for s in self._each(audio, sample_rate)]
        return labels if isinstance(audio, (list, tuple)) else labels[0]

    def classify(self, audio, sample_rate: Optional[int] = None, *, window_s: Optional[float] = None,
                 hop_s: Optional[float] = None, timeline: bool = False, top_k: int = PredictOptions.top_k) -> dict:
        """Classify one input (file path or waveform).

        Args:
            window_s (float, optional): sliding-window length in seconds. (Default: training duration)
            hop_s (float, optional): seconds between window starts. (Default: half the window)
            timeline (bool, optional): add ``windows``, each window's label. (Default: ``False``)
            top_k (int, optional): how many of the best classes to list. (Default: ``3``)

        Returns:
            dict: ``label`` (``"unknown"`` when the model's rule rejects the input), ``confidence``, ``probs``
            (list, ``labels`` order), ``top_k`` (list of ``{"label", "prob"}``), ``duration_s``, and with
            ``timeline`` ``windows`` (list of ``{"start_s", "end_s", "label", "confidence"}``); a multilabel
            model's also ``tags``; with a rule, its ``score`` and ``threshold``.

        Raises:
            AudioclfError: naming the file, when it cannot be read.
        """
        *_, result = self.classify_steps(audio, sample_rate, window_s=window_s, hop_s=hop_s, timeline=timeline,
                                         top_k=top_k)
        return result

    def classify_steps(self, audio, sample_rate: Optional[int] = None, *, window_s: Optional[float] = None,
                       hop_s: Optional[float] = None, timeline: bool = False, top_k: int = PredictOptions.top_k,
                       batch_size: Optional[int] = None, max_duration_s: Optional[float] = None,
                       max_windows: Optional[int] = None) -> Iterator[Optional[dict]]:
        """:meth:`classify`, one forward pass at a time: yields ``None`` after each batch of windows, then
        the result. Between two steps a caller can let other work use the model (take a lock per step) or
        stop iterating (cancel); memory holds one batch.

        Args:
            batch_size (int, optional): windows per step. (Default: the Classifier's)
            max_duration_s (float, optional): refuse (LimitError) audio longer than this many seconds,
                counted as it decodes. (Default: no limit)
            max_windows (int, optional): refuse (LimitError) more windows than this. (Default: no limit)

        The other arguments, and the result, are :meth:`classify`'s.
        """
        self._check_top_k(top_k)
        for source in self.window_steps(audio, sample_rate, window_s=window_s, hop_s=hop_s, batch_size=batch_size,
                                        max_duration_s=max_duration_s, max_windows=max_windows):
            yield None if source is None else self._summarise(source, self._window(window_s, hop_s)[0], timeline,
                                                              top_k)

    def window_steps(self, audio, sample_rate: Optional[int] = None, *, window_s: Optional[float] = None,
                     hop_s: Optional[float] = None, frames: bool = False, batch_size: Optional[int] = None,
                     max_duration_s: Optional[float] = None, max_windows: Optional[int] = None) -> Iterator:
        """The model's output for each sliding window of one input, one forward pass at a time: yields
        ``None`` after each batch, then the input as a source with ``name``, ``duration_s``, ``starts``
        (samples) and ``rows``: each window's class probabilities ``(n_classes,)``, or with ``frames`` its
        frame-level probabilities ``(steps, n_classes)`` (``WaveformClassifier.frames``). The other arguments
        are :meth:`classify_steps`'."""
        window, hop = self._window(window_s, hop_s)
        yield from self._steps(audio, sample_rate, window, hop, self._net.frames if frames else None, batch_size,
                               max_duration_s, max_windows)

    def embed_steps(self, audio, sample_rate: Optional[int] = None, *, batch_size: Optional[int] = None,
                    max_duration_s: Optional[float] = None, max_windows: Optional[int] = None) -> Iterator[Optional[np.ndarray]]:
        """:meth:`embed` of one input a forward pass at a time: ``None`` after each step, then ``(d,)``."""
        window, hop = self._window(None, None)
        for source in self._steps(audio, sample_rate, window, hop, self._embed, batch_size, max_duration_s, max_windows):
            yield None if source is None else source.mean()

    def classify_files(self, paths: Sequence, *, window_s: Optional[float] = None, hop_s: Optional[float] = None,
                       timeline: bool = False, top_k: int = PredictOptions.top_k, num_workers: Optional[int] = None,
                       quiet: bool = False) -> Iterator[dict]:
        """:meth:`classify` for many files, decoded by background DataLoader workers while the model runs.

        Yields one dict per path, in order: ``classify``'s keys plus ``path`` and ``error`` (``None``, or
        the reason the file could not be read, in which case the other keys are absent). ``num_workers``
        defaults to ``runtime.auto_workers()`` (none for one or two files); a progress bar goes to stderr unless ``quiet``.
        """
        window, hop = self._window(window_s, hop_s)
        self._check_top_k(top_k)
        sources = tqdm(self._run_loaded(self._file_loader(paths, window, hop, num_workers)), total=len(paths),
                       desc="predict", unit="file", disable=True if quiet else None)
        # a generator expression, so that the checks above run now, not at the first result
        return ({"path": s.name, "error": str(s.error)} if s.error is not None else
                {"path": s.name, "error": None, **self._summarise(s, window, timeline, top_k)} for s in sources)

    def embed(self, audio, sample_rate: Optional[int] = None, *, batch: Optional[bool] = None) -> np.ndarray:
        """Embeddings for search and clustering: the network's pooled trunk features (before any classifier
        layer; 512 for resnet18, 384 for mn04_as), averaged over a long input's windows.

        Returns ``(d,)`` for one input, ``(n, d)`` for a list of them or a ``batch`` (:meth:`predict_proba`)."""
        return self._window_means(audio, sample_rate, self._embed, batch=batch)

    def embed_files(self, paths: Sequence, *, quiet: bool = False) -> np.ndarray:
        """:meth:`embed` of many files, decoded in background workers: ``(len(paths), d)``. A file that cannot
        be read gets a row of NaN and a warning naming it, so one bad file does not lose the others."""
        window, hop = self._window(None, None)
        rows = []
        for s in tqdm(self._run_loaded(self._file_loader(paths, window, hop), self._embed), total=len(paths), desc="embed",
                      unit="file", disable=True if quiet else None):
            if s.error is not None:
                log.warning("%s", s.error)
            rows.append(None if s.error is not None else s.mean())
        dim = next((len(r) for r in rows if r is not None), 0)
        return np.stack([np.full(dim, np.nan, np.float32) if r is None else r for r in rows]) if rows else np.zeros((0, 0))

    def logits(self, audio, sample_rate: Optional[int] = None) -> np.ndarray:
        """The network's raw outputs (before the temperature and the softmax), averaged over a long input's
        windows: ``(n_classes,)`` for one input, ``(n, n_classes)`` for a list of them."""
        return self._window_means(audio, sample_rate, lambda wave: self.model(self._net.logmel(wave)), len(self.labels))

    # -- the one inference path

    def _steps(self, audio, sample_rate: Optional[int], window: int, hop: int, head, batch_size: Optional[int],
               max_duration_s: Optional[float], max_windows: Optional[int]) -> Iterator[Optional[Source]]:
        """One input through ``head`` (:meth:`_run`), ``batch_size`` windows a step: ``None`` after each step,
        then the source with its rows; its error raised instead, a LimitError past the limits."""
        source = prepare(audio, sample_rate, self.config.features, window, hop)
        if max_duration_s is not None or max_windows is not None:
            source.windows = limited(source.windows, source.name, window, self.config.features.sample_rate,
                                      max_duration_s, max_windows)
        for done in self._run([source], head, batch_size=batch_size, steps=True):
            if done is None:
                yield None
        if source.error is not None:
            raise source.error
        yield source

    def _embed(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model.embed(self._net.logmel(wave))

    def _window_means(self, audio, sample_rate: Optional[int], head=None, width: int = 0,
                      batch: Optional[bool] = None) -> np.ndarray:
        """``head`` (a batch of windows to one row each; default: class probabilities) on every window of
        every input, averaged over each input's windows: ``(d,)`` for one input, ``(n, d)`` for a list of
        them (or the rows of an array, with ``batch``), ``(0, width)`` for an empty list. Raises the error
        of the first input that cannot be read."""
        audio = unbatch(audio, batch)
        rows = [s.mean() if head is not None else self._pooled(s) for s in self._each(audio, sample_rate, head)]
        if not isinstance(audio, (list, tuple)):
            return rows[0]
        return np.stack(rows) if rows else np.zeros((0, width), np.float32)

    def _each(self, audio, sample_rate: Optional[int], head=None) -> Iterator[Source]:
        """Each input (one, or a list) through ``head`` (:meth:`_run`) at the default windows, in order;
        raises the error of the first input that cannot be read."""
        window, hop = self._window(None, None)
        one = not isinstance(audio, (list, tuple))
        sources = (prepare(a, sample_rate, self.config.features, window, hop) for a in ([audio] if one else audio))
        for s in self._run(sources, head):
            if s.error is not None:
                raise s.error
            yield s

    def _file_loader(self, paths: Sequence, window: int, hop: int,
                     num_workers: Optional[int] = None) -> torch.utils.data.DataLoader:
        """``paths`` prepared by background DataLoader workers (``runtime.auto_workers()`` unless
        ``num_workers``), one source at a time, in order."""
        # a worker process costs more to start than a couple of files cost to decode
        workers = (auto_workers() if len(paths) > 2 else 0) if num_workers is None else num_workers
        return torch.utils.data.DataLoader(
            PrepareFiles(paths, self.config.features, window, hop), batch_size=None, num_workers=workers,
            prefetch_factor=self.batch_size if workers else None,  # a batch of short clips stays queued
            worker_init_fn=dying_with_parent())

    def _run_loaded(self, loader: torch.utils.data.DataLoader, head=None) -> Iterator[Source]:
        """:meth:`_run` over a file loader, with the model's CPU threads leaving the decoding workers their
        cores (on 2 cores, 2 torch threads beside 1 decoding worker ran 3x slower than 1 thread)."""
        with cpu_threads_beside(loader.num_workers, self.device):
            yield from self._run(loader, head)

    def _run(self, sources: Iterable[Source], head=None, batch_size: Optional[int] = None,
             steps: bool = False) -> Iterator[Optional[Source]]:
        """Push every window of every source through the model, ``batch_size`` windows per forward pass
        whatever source they come from; yield each source, in input order, once all its windows are done,
        and with ``steps`` also ``None`` after each forward pass.

        ``head`` maps a batch of windows to one row each (default: :meth:`_probs_and_scores`); its rows are
        collected in each source's ``rows``."""
        batch_size = batch_size or self.batch_size
        pending: deque[Source] = deque()
        batch: list[tuple[Source, int, np.ndarray]] = []
        for source in sources:
            pending.append(source)
            windows = iter(source.windows)
            while source.error is None:
                try:
                    item = next(windows, None)
                except AudioclfError as e:
                    source.error = e
                    break
                except Exception as e:  # a streamed file that fails part-way fails alone
                    source.error = AudioclfError(f"{source.name}: decoding failed part-way ({type(e).__name__}: {e})")
                    break
                if item is None:
                    break
                batch.append((source, *item))
                if len(batch) == batch_size:
                    self._forward(batch, head)
                    if steps:
                        yield None
                    # the batch is empty now: every source but the current one has all its windows done
                    while len(pending) > 1:
                        yield pending.popleft()
            source.windows = ()  # done with it: free the clip
        self._forward(batch, head)
        while pending:
            yield pending.popleft()

    def _forward(self, batch: list, head=None) -> None:
        if not batch:
            return
        x = torch.from_numpy(np.stack([w for _, _, w in batch])).to(self.device)  # (batch, window samples)
        with torch.inference_mode():
            out = (head or self._probs_and_scores)(x)
        rows, scores = out if isinstance(out, tuple) else (out, None)
        rows = rows.float().cpu().numpy()  # (batch, n_classes or embedding size)
        for i, ((source, start, _), row) in enumerate(zip(batch, rows)):
            if not np.isfinite(row).all() and source.error is None:
                # samples far outside [-1, 1] (a float file of 1e30) overflow the features: no answer, not NaN
                at = start / self.config.features.sample_rate
                source.error = AudioclfError(f"{source.name}: its features or the model's output are not finite (window "
                                             f"at {at:.2f} s): samples far outside [-1, 1] overflow them; check the file")
            source.starts.append(start)
            source.rows.append(row)
            if scores is not None:
                source.scores.append(float(scores[i]))
        batch.clear()

    def _probs_and_scores(self, wave: torch.Tensor):
        """The default head: class probabilities (the temperature applied), with each window's known-class
        score when the rule needs one that the probabilities do not give (every score but msp)."""
        r = self.rejector
        if r is None or r.kind == "msp":
            return self._net(wave)
        logmel = self._net.logmel(wave)
        logits, emb = self.model.logits_and_embedding(logmel) if r.needs_embedding else (self.model(logmel), None)
        return (activation(self._net.task)(logits / self.temperature),
                r.torch_score(logits, emb).cpu())

    def _pooled(self, source: Source) -> np.ndarray:
        """A whole input's class probabilities: its windows' mean (tags: their maximum)."""
        return (np.max if self.multilabel else np.mean)(source.rows, axis=0)

    def _decide(self, source: Source) -> tuple[str, Optional[float]]:
        """(label, known-class score) of a whole input: ``"unknown"`` when the rule rejects it; the score is
        None without a rule. MSP scores the mean probabilities; the other scores average the windows'."""
        probs = self._pooled(source)
        label = self.labels[int(probs.argmax())]
        if self.rejector is None:
            return label, None
        score = float(probs.max()) if self.rejector.kind == "msp" else float(np.mean(source.scores))
        return (UNKNOWN if score < self.rejector.threshold else label), score

    # -- helpers

    def _window(self, window_s: Optional[float], hop_s: Optional[float]) -> tuple[int, int]:
        """Window and hop in samples; defaults: the training duration and half of it."""
        f = self.config.features
        window_s = f.duration_s if window_s is None else window_s
        for name, value in (("window_s", window_s), ("hop_s", 1.0 if hop_s is None else hop_s)):
            # NaN fails every comparison and inf overflows the sample count: name them before the range
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise AudioclfError(f"{name}={value!r} must be a finite number of seconds in (0, 3600]")
            if not 0 < value <= 3600:
                raise AudioclfError(f"{name}={value!r} is out of range: it must be in (0, 3600] seconds")
        window = f.window_samples(window_s)
        # the default hop is the one the training cache used: the same windows in both
        return window, default_hop(window) if hop_s is None else max(1, int(round(hop_s * f.sample_rate)))

    def _check_top_k(self, top_k: int) -> None:
        if not isinstance(top_k, int) or top_k < 1:
            raise AudioclfError(f"top_k={top_k!r} must be an integer >= 1")

    def _summarise(self, source: Source, window: int, timeline: bool, top_k: int) -> dict:
        sr = self.config.features.sample_rate
        probs = self._pooled(source)
        best = np.argsort(-probs)[:top_k]
        label, score = self._decide(source)
        out = {"label": label, "confidence": float(probs[best[0]]),
               "probs": [float(p) for p in probs],
               "top_k": [{"label": self.labels[i], "prob": float(probs[i])} for i in best],
               "duration_s": source.duration_s,
               **({"tags": tags_above(probs, self.labels, self.thresholds)} if self.multilabel else {})}
        if score is not None:  # the top classes stay listed: the nearest known ones
            out.update(score=score, threshold=self.rejector.threshold)
        if timeline:
            out["windows"] = [{"start_s": start / sr, "end_s": min((start + window) / sr, source.duration_s),
                               "label": self.labels[int(p.argmax())], "confidence": float(p.max()),
                               **({"tags": tags_above(p, self.labels, self.thresholds)} if self.multilabel else {})}
                              for start, p in zip(source.starts, source.rows)]
        return out


def load(model, device: str = PredictOptions.device, *, batch_size: int = PredictOptions.batch_size,
         weights_path: Optional[str] = None, reject: bool = PredictOptions.reject) -> Classifier:
    """A :class:`Classifier` from a run directory, ``.pt`` checkpoint or exported safetensors folder, or an
    AudioSet backbone's name (``mn04_as``): its pretrained 527-class tagger (:mod:`audioclf.audioset`), with
    its official weights from ``weights_path`` or the torch hub cache. A trained model comes with its
    temperature and, unless ``reject=False``, answers ``"unknown"`` below its rule's threshold."""
    from .audioset import is_backbone_name, pretrained_model

    trust = None
    if is_backbone_name(model):
        saved = SavedModel(*pretrained_model(model, weights_path))
        weights = weights_path
    elif weights_path:
        raise AudioclfError(f"weights_path is for an AudioSet backbone's name (mn04_as, ...), not a trained model "
                            f"({model})")
    else:
        saved = load_model(model)
        weights = weights_file(model)
        trust = saved_extras(model, TRUST_KEYS)
        read_trust(trust, model)  # a damaged rule is refused naming the model's file
    clf = Classifier(*saved, device=device, batch_size=batch_size, thresholds=saved.thresholds, trust=trust,
                     reject=reject)
    clf.weights_file = str(weights) if weights else None
    return clf
