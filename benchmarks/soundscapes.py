"""Sound event detection on 20-s soundscapes made from ESC-50's fold 4, and detect's speed on a 1-h recording.

    python benchmarks/soundscapes.py ESC-50/                      # the tables of docs/events.md
    python benchmarks/soundscapes.py ESC-50/ --scenes 10 --skip-long   # a smoke check

Scenes (our own mixer, seeded): an ambient bed (rain, sea_waves, crackling_fire, crickets or wind clips, end to
end) with 1-4 events of the other 45 classes at 0-12 dB SNR over the bed, at most two at a time, no class
twice in a scene. Each event's reference extent is the active part of its clip: from the first to the last
50-ms frame within 25 dB of the clip's loudest. Test scenes are made from fold 4, which the benchmark models
never train on; tuning (validation) scenes from folds 1-3, so that nothing is chosen on fold 4.

For each model (runs under --runs named by --models: bench-mc, multiclass, trained here with the audioclf
CLI when missing; others, such as a multilabel bench-ml, when present): the post-processing is tuned on the tuning scenes
(``detect --tune``'s grid), for each track source (frames, windows), then scored once on the test scenes with
``evaluate-events``' metrics; the bed classes are ignored. The naive baseline is ``predict --timeline``: each
window's top label, runs of windows with one label merged into an event.

With --long, a 1-h recording (test scenes end to end) goes through ``audioclf detect`` in a subprocess:
wall time, real-time factor and peak memory (max RSS).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf

from audioclf.audio import load_audio
from audioclf.commands.detect import load_detector
from audioclf.eventmetrics import Scorer
from audioclf.events import DetectConfig, Event, find_events, probability_track, tune, write_events

BED = ("rain", "sea_waves", "crackling_fire", "crickets", "wind")
SR = 32000
SCENE_S = 20.0
WEIGHTS_FILE = "mn04_as_mAP_432.pt"

# mn04_as without training: the AudioSet classes that name each ESC-50 event class (a track is the highest
# of theirs); can_opening, drinking_sipping and washing_machine have none
AUDIOSET_OF = {
    "airplane": ["Fixed-wing aircraft, airplane", "Aircraft"], "breathing": ["Breathing"],
    "brushing_teeth": ["Toothbrush"], "car_horn": ["Vehicle horn, car horn, honking"], "cat": ["Cat", "Meow"],
    "chainsaw": ["Chainsaw"], "chirping_birds": ["Bird vocalization, bird call, bird song", "Chirp, tweet"],
    "church_bells": ["Church bell"], "clapping": ["Clapping"], "clock_alarm": ["Alarm clock"],
    "clock_tick": ["Tick-tock", "Tick"], "coughing": ["Cough"], "cow": ["Cattle, bovinae", "Moo"],
    "crow": ["Crow"], "crying_baby": ["Baby cry, infant cry"], "dog": ["Dog", "Bark"],
    "door_wood_creaks": ["Creak"], "door_wood_knock": ["Knock"], "engine": ["Engine"], "fireworks": ["Fireworks"],
    "footsteps": ["Walk, footsteps"], "frog": ["Frog"], "glass_breaking": ["Shatter", "Glass"],
    "hand_saw": ["Sawing"], "helicopter": ["Helicopter"], "hen": ["Chicken, rooster", "Cluck"],
    "insects": ["Insect"], "keyboard_typing": ["Typing", "Computer keyboard"], "laughing": ["Laughter"],
    "mouse_click": ["Clicking"], "pig": ["Pig", "Oink"], "pouring_water": ["Pour"],
    "rooster": ["Crowing, cock-a-doodle-doo"], "sheep": ["Sheep", "Bleat"], "siren": ["Siren"],
    "sneezing": ["Sneeze"], "snoring": ["Snoring"], "thunderstorm": ["Thunderstorm", "Thunder"],
    "toilet_flush": ["Toilet flush"], "train": ["Train"], "vacuum_cleaner": ["Vacuum cleaner"],
    "water_drops": ["Drip"],
}


def esc50_tracks(tracks: dict, audioset: list) -> dict:
    """AudioSet tracks as tracks of the ESC-50 event classes (AUDIOSET_OF's order)."""
    cols = [[audioset.index(name) for name in names] for names in AUDIOSET_OF.values()]
    return {f: (d, np.stack([t[:, c].max(axis=1) for c in cols], axis=1)) for f, (d, t) in tracks.items()}


def active_part(wave: np.ndarray, sr: int = SR, frame_s: float = 0.05, below_db: float = 25.0) -> tuple[int, int]:
    """First and last sample of the frames within ``below_db`` of the clip's loudest frame."""
    n = max(1, int(frame_s * sr))
    frames = wave[:len(wave) // n * n].reshape(-1, n)
    db = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-12)
    on = np.flatnonzero(db >= db.max() - below_db)
    return int(on[0] * n), int((on[-1] + 1) * n)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2) + 1e-12))


def tuning_and_test_clips(root: Path) -> tuple[list[dict], list[dict]]:
    """Folds 1-3's clips (the tuning scenes': the models trained on them, but nothing is tuned on the test
    fold) and fold 4's (the test scenes')."""
    with open(root / "meta" / "esc50.csv") as f:
        clips = list(csv.DictReader(f))
    return [r for r in clips if r["fold"] in ("1", "2", "3")], [r for r in clips if r["fold"] == "4"]


def make_scenes(root: Path, clips: list[dict], n: int, out: Path, seed: int) -> tuple[Path, list[Event]]:
    """``n`` scenes as FLAC files in ``out``, and their reference events."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    beds = [c for c in clips if c["category"] in BED]
    events_pool = [c for c in clips if c["category"] not in BED]
    cache: dict[str, np.ndarray] = {}

    def audio(c):
        if c["filename"] not in cache:
            cache[c["filename"]] = load_audio(root / "audio" / c["filename"], SR)
        return cache[c["filename"]]

    n_samples, reference = int(SCENE_S * SR), []
    for i in range(n):
        name = f"scene{i:03d}.flac"
        bed_class = rng.choice(BED)
        pool = [c for c in beds if c["category"] == bed_class]
        bed = np.concatenate([audio(pool[j]) for j in rng.integers(0, len(pool), 5)])[:n_samples]
        bed = bed / rms(bed) * 10 ** (-30 / 20)  # -30 dB RMS
        scene, placed = bed.copy(), []
        classes = set()
        for _ in range(int(rng.integers(1, 5))):
            for _attempt in range(50):
                c = events_pool[int(rng.integers(len(events_pool)))]
                if c["category"] in classes:
                    continue
                w = audio(c)
                a, b = active_part(w)
                w = w[a:b]
                start = int(rng.integers(0, n_samples - len(w) + 1))
                span = (start, start + len(w))
                overlapping = [p for p in placed if p[0] < span[1] and span[0] < p[1]]
                # at most two at a time: the new event may overlap others only where they do not overlap
                if any(p[0] < q[1] and q[0] < p[1] and max(p[0], q[0]) < span[1] and span[0] < min(p[1], q[1])
                       for k, p in enumerate(overlapping) for q in overlapping[k + 1:]):
                    continue
                snr_db = rng.uniform(0, 12)
                scene[span[0]:span[1]] += w / rms(w) * rms(bed) * 10 ** (snr_db / 20)
                placed.append(span)
                classes.add(c["category"])
                reference.append(Event(name, round(span[0] / SR, 3), round(span[1] / SR, 3), c["category"], 1.0))
                break
        sf.write(out / name, (scene / max(1.0, np.abs(scene).max() / 0.99)).astype(np.float32), SR)
    write_events(reference, out / "events.tsv")
    return out, reference


def ensure_run(run: Path, root: Path, weights: Path | None) -> None:
    """bench-mc, trained with the audioclf CLI when missing: mn04_as on folds 1-3, fold 4 held out."""
    if (run / "best.pt").is_file():
        return
    cmd = ["audioclf", "train", str(root), "--format", "esc50", "--test-fold", "4", "--backbone", "mn04_as",
           "--out", str(run)] + (["--weights", str(weights)] if weights else [])
    logging.info("training %s: %s", run, " ".join(cmd))
    subprocess.run(cmd, check=True)


def tracks_of(clf, folder: Path, config: DetectConfig) -> dict:
    return {p.name: probability_track(clf, str(p), config) for p in sorted(folder.glob("*.flac"))}


def detect_all(tracks: dict, labels, config: DetectConfig) -> list[Event]:
    return [e for name, (d, t) in tracks.items()
            for e in find_events(t, labels, config, filename=name, duration_s=d, ignore=BED)]


def baseline(clf, folder: Path) -> list[Event]:
    """predict --timeline's top labels, runs of windows with one label merged, the bed's labels left out."""
    events = []
    for p in sorted(folder.glob("*.flac")):
        windows = clf.classify(str(p), timeline=True)["windows"]
        for w in windows:
            last = events[-1] if events else None
            if last and last.filename == p.name and last.event_label == w["label"] and w["start_s"] <= last.offset:
                events[-1] = last._replace(offset=w["end_s"], score=max(last.score, w["confidence"]))
            else:
                events.append(Event(p.name, w["start_s"], w["end_s"], w["label"], w["confidence"]))
    return [e for e in events if e.event_label not in BED]


def long_run(run: Path, scenes: Path, out: Path, hours: float = 1.0) -> dict:
    """``audioclf detect`` on a recording of ``hours`` (the test scenes end to end) in a subprocess."""
    long = out / "long.flac"
    if not long.is_file():
        parts = [sf.read(p, dtype="float32")[0] for p in sorted(scenes.glob("*.flac"))]
        n = int(hours * 3600 * SR)
        with sf.SoundFile(long, "w", SR, 1, format="FLAC") as f:
            written = 0
            while written < n:
                for x in parts:
                    x = x[:n - written]
                    f.write(x)
                    written += len(x)
    cmd = ["audioclf", "detect", str(run), str(long), "--out", str(out / "long.tsv"), "--quiet", "--ignore", ",".join(BED)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"audio_s": hours * 3600, "wall_s": round(wall, 1), "real_time_factor": round(wall / (hours * 3600), 4),
            "peak_rss_mb": round(peak_mb), "command": " ".join(cmd)}


def audioset_results(tune_dir: Path, tune_ref, test_dir: Path, test_ref, weights: Path | None) -> list[dict]:
    """mn04_as with its AudioSet head, no training: frame-level tracks mapped to the ESC-50 classes."""
    try:
        clf = load_detector("mn04_as", weights=str(weights) if weights else None)
    except Exception as e:  # no weights offline: the row is left out, saying why
        logging.info("mn04_as skipped: %s", e)
        return []
    config, labels = DetectConfig(), list(AUDIOSET_OF)
    t = time.perf_counter()
    tune_tracks = esc50_tracks(tracks_of(clf, tune_dir, config), clf.labels)
    best, tuned = tune(tune_tracks, labels, tune_ref, config, quiet=True)
    test_tracks = esc50_tracks(tracks_of(clf, test_dir, config), clf.labels)
    m = Scorer(test_ref, {n: d for n, (d, _) in test_tracks.items()}).score(detect_all(test_tracks, labels, best))
    row = {"model": "mn04_as", "method": "detect (frames), AudioSet head", "event_f1": m["event_f1"],
           "segment_f1": m["segment_f1"], "event_error_rate": m["event_error_rate"],
           "tuning_event_f1": tuned["event_f1"], "settings": asdict(best), "seconds": round(time.perf_counter() - t, 1)}
    logging.info("%s", row)
    return [row]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("esc50", type=Path, help="ESC-50 root (audio/, meta/esc50.csv)")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="where the runs named by --models live")
    ap.add_argument("--models", nargs="+", default=["bench-mc", "bench-ml", "mn04_as"],
                    help="runs under --runs to score (bench-mc is trained when missing; others are skipped when "
                         "missing), and mn04_as: the AudioSet head with no training (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("soundscapes-out"), help="scenes, event lists, results")
    ap.add_argument("--scenes", type=int, default=60, help="test scenes (and as many tuning scenes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, help=f"local copy of {WEIGHTS_FILE} (default: beside the data, or the "
                    f"torch hub cache)")
    ap.add_argument("--skip-long", action="store_true", help="no 1-h timing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    tune_clips, test_clips = tuning_and_test_clips(args.esc50)
    tune_dir, tune_ref = make_scenes(args.esc50, tune_clips, args.scenes, args.out / "tune", args.seed + 1)
    test_dir, test_ref = make_scenes(args.esc50, test_clips, args.scenes, args.out / "test", args.seed + 2)
    # the official mn04_as file: --weights, else beside the data (a shared/data/esc50 root: shared/weights/),
    # else the torch hub cache or a download
    beside = args.esc50.resolve().parents[1] / "weights" / WEIGHTS_FILE
    weights = args.weights or (beside if beside.is_file() else None)
    if "bench-mc" in args.models or not args.skip_long:
        ensure_run(args.runs / "bench-mc", args.esc50, weights)
    results = []
    for run in [args.runs / name for name in args.models if name != "mn04_as"]:
        if not (run / "best.pt").is_file():
            logging.info("%s: no run, skipped", run)
            continue
        clf = load_detector(str(run))
        tune_scorer = None
        test_scorer = None
        # the two track sources are compared on the first model; the others use detect's default, frames
        for source in ("frames", "windows") if run.name == "bench-mc" else ("frames",):
            # 1-s windows every 0.25 s: at detect's 0.1-s default the windows cost 10 forward passes a second
            config = DetectConfig(source=source, hop_s=0.1 if source == "frames" else 0.25)
            t = time.perf_counter()
            tune_tracks = tracks_of(clf, tune_dir, config)
            best, tuned = tune(tune_tracks, clf.labels, tune_ref, config, ignore=BED, quiet=True)
            test_tracks = tracks_of(clf, test_dir, config)
            test_scorer = test_scorer or Scorer(test_ref, {n: d for n, (d, _) in test_tracks.items()})
            m = test_scorer.score(detect_all(test_tracks, clf.labels, best))
            results.append({"model": run.name, "method": f"detect ({source})", "event_f1": m["event_f1"],
                            "segment_f1": m["segment_f1"], "event_error_rate": m["event_error_rate"],
                            "tuning_event_f1": tuned["event_f1"], "settings": asdict(best),
                            "seconds": round(time.perf_counter() - t, 1)})
            logging.info("%s", results[-1])
        m = test_scorer.score(baseline(clf, test_dir))
        results.append({"model": run.name, "method": "predict --timeline (baseline)", "event_f1": m["event_f1"],
                        "segment_f1": m["segment_f1"], "event_error_rate": m["event_error_rate"]})
        logging.info("%s", results[-1])
    if "mn04_as" in args.models:
        results += audioset_results(tune_dir, tune_ref, test_dir, test_ref, weights)
    report = {"scenes": {"tuning": len(list(tune_dir.glob('*.flac'))), "test": args.scenes,
                         "test_events": len(test_ref)}, "results": results}
    if not args.skip_long:
        report["long"] = long_run(args.runs / "bench-mc", test_dir, args.out)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"{'model':<10} {'method':<32} {'event F1':>9} {'segment F1':>11} {'event ER':>9} {'tuning event F1':>16}")
    for r in results:
        print(f"{r['model']:<10} {r['method']:<32} {r['event_f1']:>9.3f} {r['segment_f1']:>11.3f} "
              f"{r['event_error_rate']:>9.3f} {r.get('tuning_event_f1', float('nan')):>16.3f}")
    if "long" in report:
        print(json.dumps(report["long"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
