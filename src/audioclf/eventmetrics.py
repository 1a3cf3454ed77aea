"""Sound event detection metrics, computed by the DCASE reference packages (``pip install 'audioclf[events]'``):

- event-based F1 and error rate (sed_eval): an estimated event matches a reference event of its class
  when its onset is within 200 ms and its offset within max(200 ms, 20 % of the reference's length);
- segment-based F1 and error rate (sed_eval) on 1-s segments;
- PSDS (sed_scores_eval, DCASE's PSDS1 scenario: detection and ground-truth tolerance 0.7, alpha_st 1, up to
  100 false positives per hour) over the reference's classes, when the events carry scores: the score
  tracks are rebuilt from the events, so the sweep runs over the events' scores, not over the raw
  probabilities.

Micro averages over all events (segments) of all files; error rate = (substitutions + deletions +
insertions) / reference events.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import AudioclfError

T_COLLAR = 0.2  # s, onset collar (and the offset collar's floor)
PERCENTAGE_OF_LENGTH = 0.2  # the offset collar, as a fraction of the reference event's length
SEGMENT_S = 1.0


def _packages():
    """sed_eval and dcase_util, imported quietly (they warn about their own dependencies)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dcase_util
            import sed_eval
    except ImportError as e:
        raise AudioclfError(f"event metrics need sed_eval and sed_scores_eval ({e.name} is not installed): "
                            f"pip install 'audioclf[events]'") from None
    return sed_eval, dcase_util


def _container(events, filename: str):
    _, dcase_util = _packages()
    return dcase_util.containers.MetaDataContainer(
        [{"filename": filename, "onset": e.onset, "offset": e.offset, "event_label": e.event_label} for e in events])


class Scorer:
    """Event- and segment-based scores of many event lists against one reference (the reference is
    prepared once: :func:`audioclf.events.tune` scores hundreds of settings).

    Args:
        reference (list of Event): the true events.
        durations (dict): filename -> length in s, of every file evaluated (files with no reference events
            included: each false alarm there counts).
    """

    def __init__(self, reference: Sequence, durations: dict):
        self.durations = dict(durations)
        self.ref = defaultdict(list)
        for e in reference:
            self.ref[e.filename].append(e)
        missing = sorted(set(self.ref) - set(self.durations))
        if missing:
            raise AudioclfError(f"the reference has events of {len(missing)} file(s) that are not evaluated, e.g. "
                                f"{missing[0]}")
        self.ref_containers = {f: _container(self.ref[f], f) for f in self.durations}

    def score(self, events: Sequence, labels: Optional[Sequence[str]] = None, class_wise: bool = False) -> dict:
        """Metrics of ``events`` (estimated, of the files in ``durations``; others are refused)."""
        sed_eval, _ = _packages()
        est = defaultdict(list)
        for e in events:
            est[e.filename].append(e)
        extra = sorted(set(est) - set(self.durations))
        if extra:
            raise AudioclfError(f"estimated events of {len(extra)} file(s) not evaluated, e.g. {extra[0]}")
        labels = sorted(set(labels or ()) | {e.event_label for f in self.ref.values() for e in f}
                        | {e.event_label for e in events})
        ev = sed_eval.sound_event.EventBasedMetrics(labels, t_collar=T_COLLAR, percentage_of_length=PERCENTAGE_OF_LENGTH,
                                                    evaluate_onset=True, evaluate_offset=True)
        seg = sed_eval.sound_event.SegmentBasedMetrics(labels, time_resolution=SEGMENT_S)
        for f, duration_s in self.durations.items():
            e = _container(est[f], f)
            ev.evaluate(self.ref_containers[f], e)
            seg.evaluate(self.ref_containers[f], e, evaluated_length_seconds=duration_s)
        eo, so = ev.results_overall_metrics(), seg.results_overall_metrics()
        out = {"event_f1": eo["f_measure"]["f_measure"], "event_precision": eo["f_measure"]["precision"],
               "event_recall": eo["f_measure"]["recall"], "event_error_rate": eo["error_rate"]["error_rate"],
               "segment_f1": so["f_measure"]["f_measure"], "segment_precision": so["f_measure"]["precision"],
               "segment_recall": so["f_measure"]["recall"], "segment_error_rate": so["error_rate"]["error_rate"],
               "n_reference": int(sum(len(v) for v in self.ref.values())), "n_estimated": len(events)}
        out = {k: v if isinstance(v, int) else _finite(v) for k, v in out.items()}
        if class_wise:
            ec, sc = ev.results_class_wise_metrics(), seg.results_class_wise_metrics()
            out["class_wise"] = {c: {"event_f1": _finite(ec[c]["f_measure"]["f_measure"]),
                                     "segment_f1": _finite(sc[c]["f_measure"]["f_measure"]),
                                     "n_reference": int(ec[c]["count"]["Nref"]),
                                     "n_estimated": int(ec[c]["count"]["Nsys"])} for c in labels}
        return out


def _finite(v):
    """sed_eval reports an undefined ratio (no events at all) as NaN; JSON gets 0.0 then."""
    v = float(v)
    return v if np.isfinite(v) else 0.0


def psds(reference: Sequence, estimated: Sequence, durations: dict) -> Optional[float]:
    """PSDS1 of ``estimated`` (events with scores), or None when all their scores are equal (nothing to
    sweep)."""
    if len({e.score for e in estimated}) < 2:
        return None
    try:
        import pandas as pd
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sed_scores_eval import intersection_based
    except ImportError as e:
        raise AudioclfError(f"PSDS needs sed_scores_eval ({e.name} is not installed): pip install 'audioclf[events]'") \
            from None
    # PSDS is defined over the reference's classes: estimated events of other classes do not enter it
    labels = sorted({e.event_label for e in reference})
    estimated = [e for e in estimated if e.event_label in labels]
    if not labels or len({e.score for e in estimated}) < 2:
        return None
    scores, truth = {}, {f: [] for f in durations}
    for e in reference:
        truth[e.filename].append((e.onset, e.offset, e.event_label))
    by_file = defaultdict(list)
    for e in estimated:
        by_file[e.filename].append(e)
    for f, duration_s in durations.items():
        # a score track that is piecewise constant: each event's score over its extent, 0 elsewhere
        cuts = sorted({0.0, float(duration_s)} | {min(t, duration_s) for e in by_file[f] for t in (e.onset, e.offset)})
        mids = [(a + b) / 2 for a, b in zip(cuts[:-1], cuts[1:])]
        table = {c: [max([e.score for e in by_file[f] if e.event_label == c and e.onset <= m < e.offset], default=0.0)
                     for m in mids] for c in labels}
        scores[f] = pd.DataFrame({"onset": cuts[:-1], "offset": cuts[1:], **table})
    value, *_ = intersection_based.psds(scores=scores, ground_truth=truth, audio_durations=durations,
                                        dtc_threshold=0.7, gtc_threshold=0.7, alpha_ct=0.0, alpha_st=1.0,
                                        max_efpr=100.0)
    return float(value)


def evaluate_events(reference: Sequence, estimated: Sequence, durations: Optional[dict] = None) -> dict:
    """Every metric of ``estimated`` against ``reference`` (lists of :class:`audioclf.events.Event`).

    Files are matched by their base name. ``durations`` (filename -> s) defaults to each file's last
    offset, in either list.
    """
    reference = [e._replace(filename=Path(e.filename).name) for e in reference]
    estimated = [e._replace(filename=Path(e.filename).name) for e in estimated]
    if durations is None:
        durations = defaultdict(float)
        for e in list(reference) + list(estimated):
            durations[e.filename] = max(durations[e.filename], e.offset)
    out = Scorer(reference, durations).score(estimated, class_wise=True)
    out["psds1"] = psds(reference, estimated, dict(durations))
    out["n_files"] = len(durations)
    return out


def table(metrics: dict) -> str:
    """The metrics as a printable table: overall, then per class."""
    lines = [f"{'':<24}{'F1':>7}{'precision':>11}{'recall':>8}{'error rate':>12}"]
    for kind in ("event", "segment"):
        lines.append(f"{kind + '-based':<24}{metrics[kind + '_f1']:>7.3f}{metrics[kind + '_precision']:>11.3f}"
                     f"{metrics[kind + '_recall']:>8.3f}{metrics[kind + '_error_rate']:>12.3f}")
    psds1 = metrics.get("psds1")
    lines.append(f"PSDS1: {psds1:.3f}" if psds1 is not None else "PSDS1: - (no event scores to sweep in the reference's classes)")
    lines.append(f"{metrics['n_reference']} reference and {metrics['n_estimated']} estimated events in "
                 f"{metrics['n_files']} files")
    if metrics.get("class_wise"):
        lines.append(f"\n{'class':<24}{'event F1':>9}{'segment F1':>11}{'ref':>6}{'est':>6}")
        for c, m in metrics["class_wise"].items():
            lines.append(f"{c[:23]:<24}{m['event_f1']:>9.3f}{m['segment_f1']:>11.3f}{m['n_reference']:>6}"
                         f"{m['n_estimated']:>6}")
    return "\n".join(lines)
