"""Audit: does ``audioclf audit`` find planted duplicates and flipped labels?

    python benchmarks/audit.py ESC-50/ --esc10 --weights mn04_as_mAP_432.pt      # about 2 min on 2 CPU cores
    python benchmarks/audit.py ESC-50/ --esc10 --seeds 0 1 2 --cv               # + audioclf cv's probabilities

The dataset (an ESC-50 root; ``--esc10`` keeps its ESC-10 subset) is copied to a temporary folder, never
changed in place. Into the copy go

- 20 exact duplicates of 20 clips, each in another fold than its source (half byte-for-byte copies, half
  re-encoded losslessly to 16-bit WAV: the same decoded samples in another container);
- 20 near-duplicates of 20 other clips, each in another fold: 5 resampled to 16 kHz, 5 re-encoded lossily
  (Ogg Vorbis and MP3 in turn), 5 with their gain changed (-3 to -12 dB), 5 trimmed by 0.5 s (at the start or
  the end). Each gets a ``src_file`` of its own, so the dataset's groups do not mark them;
- 5 % of the other clips get another class, at random.

Then ``audit_dataset`` runs on the copy, and the table says how many planted pairs it found (recall), how many
pairs it reported that were not planted (false positives, split into pairs of two original clips, which may be
real duplicates in the dataset, and wrong partners of a planted clip), the margin (lowest cosine of a planted
near pair, highest of any other pair), and how many flipped labels are among the audit's top-k label issues
(k = the number flipped) and among all it reports. ``--probe-c`` compares the probe's regularisation;
``--cv`` also trains ``audioclf cv`` (mn04_as, the default recipe) on the copy and uses its out-of-fold
probabilities (tens of minutes on a CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from audioclf.audio import decode, resample
from audioclf.audit import MATCH_THRESHOLD, NEAR_THRESHOLD, PROBE_C, audit_dataset, centred_unit, label_issues, \
    probe_folds, probe_probabilities
from audioclf.config import DataConfig

log = logging.getLogger("bench-audit")
N_EXACT, N_NEAR, FLIP_SHARE = 20, 20, 0.05
NEAR_KINDS = ("resampled", "re-encoded", "gain", "trimmed")


# ---------------------------------------------------------------------------------------------- the copy

def read_meta(root: Path, esc10: bool) -> tuple[list[str], list[dict]]:
    with open(root / "meta" / "esc50.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if not esc10 or r["esc10"].strip().lower() in ("true", "1")]
        return list(reader.fieldnames), rows


def plant(root: Path, copy: Path, esc10: bool, seed: int) -> dict:
    """Copy the dataset to ``copy``, plant the duplicates and flip the labels; what was planted."""
    rng = np.random.default_rng(seed)
    fields, rows = read_meta(root, esc10)
    (copy / "audio").mkdir(parents=True)
    for r in rows:
        shutil.copy(root / "audio" / r["filename"], copy / "audio" / r["filename"])
    folds = sorted({r["fold"] for r in rows})
    sources = rng.permutation(len(rows))
    exact_src, near_src, rest = sources[:N_EXACT], sources[N_EXACT:N_EXACT + N_NEAR], sources[N_EXACT + N_NEAR:]
    planted, new_rows = [], []
    for k, i in enumerate([*exact_src, *near_src]):
        src = rows[i]
        kind = "exact" if k < N_EXACT else NEAR_KINDS[(k - N_EXACT) % len(NEAR_KINDS)]
        fold = str(rng.choice([f for f in folds if f != src["fold"]]))
        wave, sr = decode(root / "audio" / src["filename"])
        suffix, fmt = ".flac", {}
        if kind == "exact" and k % 2:
            suffix, fmt = ".wav", {"subtype": "PCM_16"}
        elif kind == "resampled":
            wave, sr = resample(wave.mean(axis=1), sr, 16000)[:, None], 16000
        elif kind == "re-encoded":
            suffix = ".ogg" if k % 2 else ".mp3"
        elif kind == "gain":
            wave = wave * 10 ** (-rng.uniform(3, 12) / 20)
        elif kind == "trimmed":
            cut = int(0.5 * sr)
            wave = wave[cut:] if rng.random() < 0.5 else wave[:-cut]
        name = f"{fold}-{900000 + k}-A-{src['target']}{suffix}"
        if kind == "exact" and not k % 2:
            shutil.copy(root / "audio" / src["filename"], copy / "audio" / name)
        else:
            sf.write(copy / "audio" / name, wave, sr, **fmt)
        new_rows.append({**src, "filename": name, "fold": fold, "src_file": str(900000 + k), "take": "A"})
        planted.append({"a": src["filename"], "b": name, "kind": kind})
    classes = sorted({(r["target"], r["category"]) for r in rows})
    flipped = {}
    for i in rng.choice(rest, size=int(round(FLIP_SHARE * len(rows))), replace=False):
        target, category = classes[rng.choice([j for j, c in enumerate(classes) if c[1] != rows[i]["category"]])]
        flipped[rows[i]["filename"]] = {"given": category, "true": rows[i]["category"]}
        rows[i] = {**rows[i], "target": target, "category": category}
    (copy / "meta").mkdir()
    with open(copy / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows + new_rows)
    return {"pairs": planted, "flipped": flipped}


# ---------------------------------------------------------------------------------------------- scoring

def score(result: dict, planted: dict) -> dict:
    paths = result["paths"]
    name = [Path(p).name for p in paths]
    is_planted = {name.index(p["b"]) for p in planted["pairs"]}
    want = {frozenset((name.index(p["a"]), name.index(p["b"]))): p["kind"] for p in planted["pairs"]}
    found = {frozenset(p[:2]): "exact" for p in result["exact"]} | {frozenset(p[:2]): "near" for p in result["near"]}
    out = {"exact_planted": N_EXACT, "near_planted": N_NEAR}
    out["exact_found"] = sum(1 for pair, kind in want.items() if kind == "exact" and found.get(pair) == "exact")
    out["near_found"] = sum(1 for pair, kind in want.items() if kind != "exact" and pair in found)
    for kind in NEAR_KINDS:
        out[f"near_found_{kind}"] = sum(1 for pair, k in want.items() if k == kind and pair in found)
    # a pair the audit reports that was not planted: two original clips that are copies of each other in the
    # dataset itself (their waveforms correlate >= 0.9 at the best lag), a planted copy matched with such a
    # copy of its source (right too), or a false positive
    extra = [pair for pair in found if pair not in want]
    real = {pair for pair in extra if not pair & is_planted and waveform_correlation(*(paths[i] for i in pair),
                                                                                     result["clipset"].clips) >= 0.9}
    source_of = {name.index(p["b"]): name.index(p["a"]) for p in planted["pairs"]}
    via = {pair for pair in extra if pair & is_planted and len(pair) == 2 and
           frozenset(source_of.get(i, i) for i in pair) in real}
    out["in_dataset"] = [sorted(paths[i] for i in pair) for pair in real]
    out["via_dataset_copy"] = len(via)
    out["false_positives"] = [sorted(paths[i] for i in pair) + [found[pair]] for pair in extra
                              if pair not in real and pair not in via]

    # the margins: planted near pairs against the other pairs, by embedding cosine and by aligned match
    emb = result["embeddings"][:, :result["n_trunk"]]
    ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
    unit = np.zeros_like(emb)
    unit[ok] = centred_unit(emb[ok])
    sims = unit @ unit.T
    near_pairs = [tuple(sorted(pair)) for pair, kind in want.items() if kind != "exact"]
    exact_pairs = {frozenset(p[:2]) for p in result["exact"]}
    out["near_min_cosine"] = float(min(sims[a, b] for a, b in near_pairs))
    mask = np.triu(np.ones_like(sims, dtype=bool), 1)
    for pair in [*want, *exact_pairs]:
        a, b = sorted(pair)
        mask[a, b] = False
    out["max_other_cosine"] = float(sims[mask].max())
    match = {frozenset(p[:2]): p[3] for p in result["candidates"]}
    out["candidates"] = len(match)
    out["near_min_match"] = min(match.get(frozenset(p), 0.0) for p in near_pairs)
    out["max_other_match"] = max([m for pair, m in match.items() if pair not in want and pair not in real | via]
                                 or [0.0])
    return out


def waveform_correlation(a: str, b: str, clips) -> float:
    """The largest normalised cross-correlation of the two clips' waveforms (16 kHz): near 1 for copies."""
    from scipy.signal import fftconvolve

    from audioclf.audio import load_audio

    by_name = {Path(c.path).name: c.path for c in clips}
    x, y = (load_audio(by_name[Path(p).name], 16000) for p in (a, b))
    lag = int(np.abs(fftconvolve(x, y[::-1], mode="full")).argmax()) - (len(y) - 1)
    xs, ys = x[max(lag, 0):], y[max(-lag, 0):]
    n = min(len(xs), len(ys))
    return float(abs(np.corrcoef(xs[:n], ys[:n])[0, 1]))


def score_labels(issues: list, paths: list[str], flipped: dict) -> dict:
    names = [Path(paths[i]).name for i, _, _ in issues]
    k = len(flipped)
    hits = sum(1 for n in names if n in flipped)
    return {"flipped": k, "top_k_hits": sum(1 for n in names[:k] if n in flipped), "reported": len(names),
            "reported_hits": hits, "precision": hits / len(names) if names else 0.0, "recall": hits / k}


def run_cv(copy: Path, out: Path, weights: str, device: str) -> Path:
    from audioclf.config import resolve
    from audioclf.cv import cross_validate

    config = resolve("default", overrides={"data": {"root": str(copy), "format": "esc50"},
                                           "model": {"weights_path": weights},
                                           "train": {"quiet": True, "device": device}})
    cross_validate(config, out)
    return out


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="an ESC-50 root (audio/, meta/esc50.csv)")
    p.add_argument("--esc10", action="store_true", help="keep the ESC-10 subset")
    p.add_argument("--weights", help="mn04_as weights file (default: the torch hub cache, or a download)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one planted copy per seed")
    p.add_argument("--probe-c", type=float, nargs="+", default=[PROBE_C], help="the probe's C values to compare")
    p.add_argument("--near-threshold", type=float, default=NEAR_THRESHOLD, help="candidates' cosine (default: the "
                   "audit's)")
    p.add_argument("--cv", action="store_true", help="also audioclf cv's out-of-fold probabilities (slow)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="audioclf-audit-") as tmp:
            copy = Path(tmp) / "data"
            planted = plant(Path(args.root), copy, args.esc10, seed)
            data = DataConfig(root=str(copy), format="esc50")
            result = audit_dataset(data, weights_path=args.weights, near_threshold=args.near_threshold,
                                   device=args.device, quiet=True)
            row = {"seed": seed, "clips": len(result["clipset"].clips), **score(result, planted)}
            clips = result["clipset"].clips
            labels = np.array([c.label for c in clips])
            ok = np.flatnonzero(np.isfinite(result["embeddings"]).all(axis=1))
            for c in args.probe_c:
                probs = probe_probabilities(result["embeddings"][ok], labels[ok], probe_folds([clips[i] for i in ok]),
                                            len(result["clipset"].classes), c=c)
                issues = [(int(ok[r]), s, q) for r, s, q in label_issues(labels[ok], probs)]
                row[f"labels_probe_C{c:g}"] = score_labels(issues, result["paths"], planted["flipped"])
            if args.cv:
                cv_dir = run_cv(copy, Path(tmp) / "cv", args.weights, args.device)
                cv = audit_dataset(data, weights_path=args.weights, probs=cv_dir, device=args.device, quiet=True)
                row["labels_cv"] = score_labels(cv["issues"], cv["paths"], planted["flipped"])
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"\nnear_threshold {args.near_threshold}, match_threshold {MATCH_THRESHOLD}; {N_EXACT} exact and {N_NEAR} near duplicates planted across folds, "
          f"{FLIP_SHARE:.0%} of labels flipped\n")
    print("| seed | clips | exact found | near found (resampled/re-encoded/gain/trimmed) | false positives | "
          "copies in the dataset (+ via them) | cosine: lowest planted / highest other | candidates | "
          "match: lowest planted / highest other |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kinds = "/".join(str(r[f"near_found_{k}"]) for k in NEAR_KINDS)
        print(f"| {r['seed']} | {r['clips']} | {r['exact_found']}/{r['exact_planted']} | {r['near_found']}/"
              f"{r['near_planted']} ({kinds}) | {len(r['false_positives'])} | {len(r['in_dataset'])} "
              f"(+{r['via_dataset_copy']}) | {r['near_min_cosine']:.3f} / {r['max_other_cosine']:.3f} | "
              f"{r['candidates']} | {r['near_min_match']:.3f} / {r['max_other_match']:.3f} |")
    print("\n| seed | probabilities | flipped | in top-k | reported | of them flipped | precision | recall |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for key in [k for k in r if k.startswith("labels_")]:
            m = r[key]
            print(f"| {r['seed']} | {key[7:]} | {m['flipped']} | {m['top_k_hits']} | {m['reported']} | "
                  f"{m['reported_hits']} | {m['precision']:.2f} | {m['recall']:.2f} |")
    for r in rows:
        for a, b in r["in_dataset"]:
            print(f"seed {r['seed']}: copies in the dataset itself: {a} ~ {b}")
        for a, b, kind in r["false_positives"]:
            print(f"seed {r['seed']}: false positive ({kind}): {a} ~ {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
