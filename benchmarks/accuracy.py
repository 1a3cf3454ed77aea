"""Accuracy on real data by cross-validation, with training time and epochs per fold.

    python benchmarks/accuracy.py --esc50 ESC-50/ --only esc50 --backbones mn04_as     # the headline: ESC-50, 4 folds
    python benchmarks/accuracy.py --esc50 ESC-50/ --only esc10 --backbones resnet18 --recipes default tutorial
    python benchmarks/accuracy.py --fsdd FSDD/ --only fsdd --backbones mn04_as
    python benchmarks/accuracy.py --quick         # 2 folds / 2 speakers, fewer epochs: a smoke check
    python benchmarks/accuracy.py --json

Runs (each one is ``audioclf cv``; a fold already finished under --out is reused, so an interrupted
benchmark continues where it stopped), for each backbone of --backbones:
- ESC-50 (--esc50 DIR: audio/, meta/esc50.csv; the figures use its folds 1-4, 50 classes): 4-fold CV.
- ESC-10 (the same folds, 10 classes): 4-fold CV; for resnet18 also the recipes of --recipes (ablations).
- FSDD (--fsdd DIR: recordings/): speaker-independent CV, each of the six speakers in turn held out as the test
  fold; validation clips come from the five training speakers.
resnet18 trains from scratch (the ``imagenet`` recipe runs when
$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth exists). The MobileNets fine-tune their AudioSet
weights: --weights, else ../shared/weights/<official file> beside the clone, else the torch hub cache or a
download. Without --esc50/--fsdd, the data is looked for in ../shared/data beside the clone.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

from audioclf.backbones import BACKBONE_NAMES, BACKBONES
from audioclf.config import resolve
from audioclf.cv import cross_validate
from audioclf.weights import hub_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # where --esc50 and --fsdd look by default
SHARED_WEIGHTS = SHARED.parent / "weights"
FSDD_SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def fsdd_manifest(root: Path, out: Path) -> Path:
    """A CSV manifest with one fold per speaker (1..6 in FSDD_SPEAKERS order).

    No group column: the validation split is carved from the clips of all five training speakers, so
    training sees five voices rather than four; the held-out speaker's fold is never trained on.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold"])
        for p in sorted((root / "recordings").glob("*.wav")):
            digit, speaker, _ = p.stem.split("_")
            w.writerow([str(p), digit, FSDD_SPEAKERS.index(speaker) + 1])
    return out


# ESC-10 recipes for resnet18: (preset, overrides on top of it). "default" is what `audioclf train
# --backbone resnet18` does; the others are the ablation rows of docs/results.md, each one change away from it
# or from the original tutorial's recipe. (The rows gain1e4, gain-long, no-pool and gain-cmn measured settings that did not help
# and have since been removed from audioclf: features.mel_gain, model.stem_pool, model.normalization clip.)
_ESC10_RECIPES = {
    "default": ("default", {}),
    "tutorial": ("tutorial", {}),  # the original tutorial's recipe
    "imagenet": ("default", {"model": {"pretrained": "imagenet"}}),
    # the first default: no peak normalisation, no time shift, uncapped time masks, patience 10
    "v0": ("default", {"features": {"peak_normalize": False}, "train": {"patience": 10},
                       "augment": {"time_shift": 0.0, "time_mask_fraction": 1.0}}),
    "no-peak": ("default", {"features": {"peak_normalize": False}}),
    "no-shift": ("default", {"augment": {"time_shift": 0.0}}),
    "mixup": ("default", {"augment": {"mixup_alpha": 0.2}}),
    "long": ("default", {"train": {"epochs": 60}}),  # twice the optimiser steps
    "long-mixup": ("default", {"train": {"epochs": 60}, "augment": {"mixup_alpha": 0.4}}),
    "wd": ("default", {"train": {"weight_decay": 0.05}}),
    "seed1": ("default", {"train": {"seed": 1}}),  # the default again with other random draws: the noise floor
    "stretch": ("default", {"augment": {"time_stretch": 0.2}}),
}
# every ESC-10 recipe above is a ResNet-18 one (the MobileNets have their own recipe, backbones.py)
ESC10_RECIPES = {name: (preset, {**o, "model": {"backbone": "resnet18", **o.get("model", {})}})
                 for name, (preset, o) in _ESC10_RECIPES.items()}


# ESC-50 recipes for the MobileNets, on top of their recipe (backbones.py): "e30" trains twice as long,
# "peak" turns peak normalisation on (off in their recipe)
MN_RECIPES = {"default": {}, "e30": {"train": {"epochs": 30}}, "peak": {"features": {"peak_normalize": True}}}


# FSDD recipes on top of the backbone's recipe + 1-s windows: "e10" is an earlier benchmark's 10 epochs,
# "freq-shift" adds vocal-tract-length perturbation, "peak" peak normalisation (resnet18's default; off in
# the MobileNets' recipe)
FSDD_RECIPES = {"default": {}, "e10": {"train": {"epochs": 10}}, "freq-shift": {"augment": {"freq_shift": 2}},
                "peak": {"features": {"peak_normalize": True}}}


def backbone_overrides(backbone: str, weights) -> dict:
    """model settings for ``backbone``: resnet18 from scratch, a MobileNet on its AudioSet weights."""
    if backbone == "resnet18":
        return {"backbone": backbone, "pretrained": "none"}
    local = Path(weights) if weights else SHARED_WEIGHTS / BACKBONES[backbone].weights_file
    return {"backbone": backbone, "pretrained": "audioset", **({"weights_path": str(local)} if local.is_file() else {})}


def run(name: str, data: dict, overrides: dict, out: Path, folds, preset: str = "default") -> dict:
    cfg = resolve(preset, overrides={"data": data, **overrides})
    t0 = time.perf_counter()
    s = cross_validate(cfg, out / name, folds=folds)
    s["wall_s"] = time.perf_counter() - t0
    s["name"] = name
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 folds, at most 8 epochs: minutes, not an hour")
    p.add_argument("--only", choices=["esc50", "esc10", "fsdd"], nargs="+", default=["esc50", "esc10", "fsdd"],
                   help="datasets to run (default: all three)")
    p.add_argument("--backbones", nargs="+", default=["mn04_as", "resnet18"], choices=BACKBONE_NAMES)
    p.add_argument("--weights", help="the MobileNet's weights file (default: ../shared/weights, hub cache, download)")
    p.add_argument("--recipes", nargs="+", default=["default"], choices=list(ESC10_RECIPES),
                   help="resnet18 ESC-10 recipes: default (scratch), tutorial (preset), imagenet (needs cached weights), "
                        f"or an ablation: {', '.join(r for r in ESC10_RECIPES if r not in ('default', 'tutorial', 'imagenet'))}")
    p.add_argument("--mn-recipes", nargs="+", default=["default"], choices=list(MN_RECIPES),
                   help=f"MobileNet ESC-50 recipes: default, or {', '.join(list(MN_RECIPES)[1:])}")
    p.add_argument("--folds", nargs="+", type=int, help="ESC test folds (default: all four)")
    p.add_argument("--fsdd-speakers", nargs="+", default=FSDD_SPEAKERS,
                   help="held-out speakers (each a fold)")
    p.add_argument("--fsdd-recipes", nargs="+", default=["default"], choices=list(FSDD_RECIPES),
                   help=f"FSDD recipes: default, or an ablation: {', '.join(list(FSDD_RECIPES)[1:])}")
    p.add_argument("--esc50", type=Path, default=SHARED / "esc50",
                   help="ESC-50 folder: audio/, meta/esc50.csv (default: ../shared/data/esc50 beside the clone)")
    p.add_argument("--fsdd", type=Path, default=SHARED / "fsdd",
                   help="Free Spoken Digit Dataset folder: recordings/ (default: ../shared/data/fsdd beside the clone)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench-accuracy")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    for name, folder in (("esc50", args.esc50), ("esc10", args.esc50), ("fsdd", args.fsdd)):
        if name in args.only and not folder.is_dir():
            flag = "--fsdd" if name == "fsdd" else "--esc50"
            p.error(f"{flag} {folder}: no such folder; give the dataset's folder, or leave {name} out of --only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out) / ("quick" if args.quick else "full")
    quick = {"epochs": 8, "patience": 0} if args.quick else {}
    results = []

    esc = args.esc50
    folds = args.folds or ([1, 2] if args.quick else None)
    for backbone in args.backbones:
        model = backbone_overrides(backbone, args.weights)
        train = {"device": args.device, "quiet": True, **quick}
        if "esc50" in args.only:
            data = {"root": str(esc), "format": "esc50", "esc10": False}
            for recipe in (args.mn_recipes if backbone != "resnet18" else ["default"]):
                o = MN_RECIPES[recipe]
                name = f"esc50-{backbone}" if recipe == "default" else f"esc50-{backbone}-{recipe}"
                results.append(run(name, data, {**o, "model": model, "train": {**o.get("train", {}), **train}}, out, folds))
        if "esc10" in args.only:
            data = {"root": str(esc), "format": "esc50", "esc10": True}
            for recipe in (args.recipes if backbone == "resnet18" else ["default"]):
                preset, overrides = ESC10_RECIPES[recipe]
                overrides = {**overrides, "train": {**overrides.get("train", {}), **train}}
                if recipe == "imagenet":
                    if not hub_path(BACKBONES["resnet18"]).is_file():
                        logging.warning("no %s: skipping the ImageNet recipe (download it to run it)", hub_path(BACKBONES["resnet18"]))
                        continue
                    results.append(run("esc10-resnet18-imagenet", data, overrides, out, folds))
                    continue
                overrides["model"] = {**overrides.get("model", {}), **model}
                name = f"esc10-{backbone}" if recipe == "default" else f"esc10-resnet18-{recipe}"
                results.append(run(name, data, overrides, out, folds, preset=preset))
        fsdd = args.fsdd
        if "fsdd" in args.only:
            speakers = args.fsdd_speakers[:2] if args.quick else args.fsdd_speakers
            manifest = fsdd_manifest(fsdd, out / "fsdd_speakers.csv")
            data = {"root": str(manifest), "format": "csv"}
            # 1-s windows: 99 % of the digits are shorter (median 0.42 s). Peak normalisation evens out the
            # speakers' recording levels (about 20 dB apart); the time-mask cap keeps SpecAugment from
            # blanking a whole digit.
            for recipe in args.fsdd_recipes:
                overrides = FSDD_RECIPES[recipe]
                name = f"fsdd-{backbone}" if recipe == "default" else f"fsdd-{backbone}-{recipe}"
                results.append(run(name, data, {**overrides, "features": {"duration_s": 1.0, **overrides.get("features", {})},
                                                "model": {**model, **overrides.get("model", {})},
                                                "train": {**train, **overrides.get("train", {})}},
                                   out, [FSDD_SPEAKERS.index(s) + 1 for s in speakers]))

    if args.json:
        print(json.dumps({r["name"]: {k: r[k] for k in ("accuracy_mean", "accuracy_std", "macro_f1_mean",
                                                          "macro_f1_std", "folds", "wall_s", "recipe")}
                          for r in results}, indent=1))
        return 0
    print("| benchmark | recipe | folds | accuracy (mean ± std) | macro-F1 | epochs per fold | train min per fold |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in results:
        epochs = ", ".join(str(f["epochs_run"]) for f in r["folds"])
        minutes = sum(f.get("train_s") or 0 for f in r["folds"]) / 60 / len(r["folds"])
        print(f"| {r['name']} | {r['recipe']} | {len(r['folds'])} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
              f"{r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f} | {epochs} | {minutes:.1f} |")
    for r in results:
        if r["name"].startswith("fsdd"):
            per = ", ".join(f"{FSDD_SPEAKERS[f['fold'] - 1]} {f['test_acc']:.3f}" for f in r["folds"])
            print(f"\nFSDD held-out speakers: {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
