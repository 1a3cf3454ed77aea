"""The report of an audit (:func:`audioclf.audit.audit_dataset`): ``audit.json`` (everything, paths as the
manifest gives them), ``audit.md`` (the same for people, with the plots) and the PNGs: ``durations.png``,
``sample_rates.png``, ``channels.png`` and ``counts.png`` (clips per class and fold).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from .audit import CLIPPED_SHARE, SILENCE_DB, crosses, relative_path, write_probabilities
from .fileio import write_text_atomic

REPORT_FILES = ("audit.json", "audit.md", "durations.png", "sample_rates.png", "channels.png", "counts.png",
                "oof_probs.csv")
LISTED = 50  # rows of each list in audit.md; audit.json has them all


def report_dict(result: dict, data) -> dict:
    """What ``audit.json`` holds."""
    clipset, facts, paths = result["clipset"], result["facts"], result["paths"]
    clips, classes = clipset.clips, clipset.classes
    ok = [f for f in facts if not f["error"]]
    unreadable = [{"path": p, "reason": f["error"]} for p, f in zip(paths, facts) if f["error"]]
    unreadable += [{"path": relative_path(p, data), "reason": why} for p, why in clipset.skipped]
    silent = [{"path": p, "peak_db": round(f["peak_db"], 1)} for p, f in zip(paths, facts)
              if not f["error"] and f["peak_db"] < SILENCE_DB]
    clipped = [{"path": p, "clipped_share": round(f["clipped"], 5)} for p, f in zip(paths, facts)
               if not f["error"] and f["clipped"] >= CLIPPED_SHARE]
    duplicates = [_pair(clips, paths, a, b, "exact", 1.0, 1.0, 0.0) for a, b in result["exact"]]
    duplicates += [_pair(clips, paths, *pair[:2], "near", *pair[2:]) for pair in result["near"]]
    issues = [{"path": paths[i], "given": classes[clips[i].label], "suggested": classes[k], "score": round(s, 4)}
              for i, k, s in result["issues"]]
    per_class_fold: dict[str, dict[str, int]] = {name: {} for name in classes}
    for c in clips:
        fold = "none" if c.fold is None else str(c.fold)
        per_class_fold[classes[c.label]][fold] = per_class_fold[classes[c.label]].get(fold, 0) + 1
    durations = np.array([f["duration_s"] for f in ok]) if ok else np.zeros(0)
    counts = {
        "clips": len(clips) + len(clipset.skipped), "classes": len(classes),
        "per_class": dict(Counter(classes[c.label] for c in clips)),
        "per_fold": {k: v for k, v in sorted(Counter("none" if c.fold is None else str(c.fold) for c in clips).items())},
        "per_class_fold": per_class_fold,
        "unreadable": len(unreadable), "silent": len(silent), "clipped": len(clipped),
        "exact_duplicates": len(result["exact"]), "near_duplicates": len(result["near"]),
        "cross_fold_duplicates": sum(d["cross_fold"] for d in duplicates), "label_issues": len(issues),
    }
    audio = {
        "duration_s": {"min": _round(durations.min()), "median": _round(np.median(durations)),
                       "max": _round(durations.max())} if len(durations) else {},
        "sample_rates": _tally(f["sample_rate"] for f in ok), "channels": _tally(f["channels"] for f in ok),
    }
    return {"data": {"root": str(data.root), "format": data.format, "esc10": data.esc10}, "counts": counts,
            "audio": audio, "unreadable": unreadable, "silent": silent, "clipped": clipped,
            "duplicates": duplicates, "label_issues": issues, "settings": result["settings"]}


def _pair(clips, paths, a: int, b: int, kind: str, similarity: float, match: float, offset_s: float) -> dict:
    return {"a": paths[a], "b": paths[b], "kind": kind, "similarity": round(float(similarity), 4),
            "match": round(float(match), 4), "offset_s": round(float(offset_s), 2),
            "cross_fold": crosses(clips[a], clips[b]), "same_group": clips[a].group_key == clips[b].group_key}


def _round(x) -> float:
    return round(float(x), 3)


def _tally(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


# ---------------------------------------------------------------------------------------------- plots

def _bars(path: Path, tally: dict[str, int], title: str, xlabel: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(tally)), list(tally.values()), color="tab:blue")
    ax.set_xticks(range(len(tally)), list(tally))  # values as names: 44100 and 48000 are two bars, not a range
    ax.set(title=title, xlabel=xlabel, ylabel="clips")
    fig.savefig(path, dpi=110)


def plot_durations(path: Path, durations: np.ndarray) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.hist(durations, bins=min(50, max(5, len(np.unique(np.round(durations, 2))))), color="tab:blue")
    ax.set(title=f"durations ({len(durations)} readable clips)", xlabel="seconds", ylabel="clips")
    fig.savefig(path, dpi=110)


def plot_counts(path: Path, per_class_fold: dict[str, dict[str, int]]) -> None:
    """Clips per class, stacked by fold; sized so that 50 class names stay readable."""
    from matplotlib.figure import Figure

    names = list(per_class_fold)
    folds = sorted({f for row in per_class_fold.values() for f in row}, key=lambda f: (f == "none", f))
    fig = Figure(figsize=(max(6.0, 0.25 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(names))
    for fold in folds:
        heights = np.array([per_class_fold[n].get(fold, 0) for n in names])
        ax.bar(range(len(names)), heights, bottom=bottom, label=f"fold {fold}")
        bottom += heights
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8 if len(names) > 20 else 10)
    ax.set(title="clips per class and fold", ylabel="clips")
    ax.legend(fontsize=8, ncols=min(len(folds), 5))
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- markdown

def summary_lines(report: dict) -> list[str]:
    """The printed summary: one line per finding."""
    c, s = report["counts"], report["settings"]
    return [
        f"{c['clips']} clips, {c['classes']} classes, folds: "
        + (", ".join(f"{k} ({v})" for k, v in c["per_fold"].items())),
        f"unreadable: {c['unreadable']}, silent (peak < {s['silence_db']:g} dBFS): {c['silent']}, clipped: {c['clipped']}",
        f"duplicates: {c['exact_duplicates']} exact, "
        + (f"{c['near_duplicates']} near (cosine >= {s['near_threshold']:g}, aligned match >= {s['match_threshold']:g})"
           if s["embeddings"].endswith(" embeddings") else "near ones NOT CHECKED (no embeddings)")
        + f"; {c['cross_fold_duplicates']} cross folds or groups (leakage)",
        f"likely label errors: {c['label_issues']} (probabilities: {s['probs']})",
    ]


def _table(rows: list[dict], columns: list[str], limit: int = LISTED) -> list[str]:
    if not rows:
        return ["none", ""]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r[k]).replace("|", "\\|") for k in columns) + " |" for r in rows[:limit]]
    if len(rows) > limit:
        out.append(f"\n... and {len(rows) - limit} more in audit.json")
    return out + [""]


def markdown(report: dict) -> str:
    c, a = report["counts"], report["audio"]
    folds = list(c["per_fold"])
    lines = [f"# Audit of {report['data']['root']} ({report['data']['format']})", "", *[f"- {s}" for s in summary_lines(report)],
             "", "## Counts", "", "| class | " + " | ".join(f"fold {f}" for f in folds) + " | total |",
             "|---|" + "---:|" * (len(folds) + 1)]
    for name, row in c["per_class_fold"].items():
        lines.append(f"| {name} | " + " | ".join(str(row.get(f, 0)) for f in folds) + f" | {sum(row.values())} |")
    d = a["duration_s"]
    lines += ["", "![clips per class and fold](counts.png)", "", "## Audio", "",
              f"Durations {d.get('min', '-')} to {d.get('max', '-')} s (median {d.get('median', '-')} s); sample rates "
              f"{', '.join(f'{k} Hz ({v})' for k, v in a['sample_rates'].items())}; channels "
              f"{', '.join(f'{k} ({v})' for k, v in a['channels'].items())}.", "",
              "![durations](durations.png) ![sample rates](sample_rates.png) ![channels](channels.png)", "",
              "## Unreadable clips", "", *_table(report["unreadable"], ["path", "reason"]),
              "## Silent clips", "", *_table(report["silent"], ["path", "peak_db"]),
              "## Clipped clips", "", *_table(report["clipped"], ["path", "clipped_share"]),
              "## Duplicates", "",
              "`similarity`: cosine of the two clips' embeddings; `match`: correlation of their aligned log-mel "
              "fingerprints, at `offset_s` (where `b` starts in `a`). `cross_fold`: the two clips are in different "
              "folds (without folds: different groups), so a model can be tested on what it trained on. "
              "`same_group`: the dataset itself marks them as one recording.", "",
              *_table(report["duplicates"], ["a", "b", "kind", "similarity", "match", "offset_s", "cross_fold",
                                             "same_group"]),
              "## Likely label errors", "",
              "Most likely first; `score` is the out-of-fold probability of the given label.", "",
              *_table(report["label_issues"], ["path", "given", "suggested", "score"])]
    return "\n".join(lines)


def write_report(result: dict, data, out_dir) -> dict:
    """Write every report file into ``out_dir`` and return the ``audit.json`` dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report_dict(result, data)
    ok = [f for f in result["facts"] if not f["error"]]
    plot_durations(out / "durations.png", np.array([f["duration_s"] for f in ok]))
    _bars(out / "sample_rates.png", report["audio"]["sample_rates"], "sample rates", "Hz")
    _bars(out / "channels.png", report["audio"]["channels"], "channels", "channels")
    plot_counts(out / "counts.png", report["counts"]["per_class_fold"])
    probs: Optional[np.ndarray] = result["probs"]
    if probs is not None:
        write_probabilities(out / "oof_probs.csv", result["paths"], result["clipset"].classes, probs)
    write_text_atomic(out / "audit.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "audit.md", markdown(report) + "\n")
    return report
