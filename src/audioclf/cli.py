"""The ``audioclf`` command: parse flags, configure logging, call one stage, turn errors into messages.

Each sub-command is a thin wrapper over a library function; the library logs, the CLI decides what the
user sees and the exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import math
import sys
from pathlib import Path
from typing import Optional

from ._version import __version__
from .config import PRESETS, SECTIONS, Setting, load_yaml, resolve, settings
from .errors import AudioclfError

log = logging.getLogger("audioclf")


_DATA_HELP = ("dataset: a folder per class, a CSV manifest, an ESC-50/UrbanSound8K root, or WebDataset shards (a "
              "folder, a .tar or a pattern such as shards-{000..009}.tar)")
NO_REJECT_HELP = ("always answer one of the trained classes: never 'unknown' (which the model's rule, fitted "
                  "on its validation clips, answers for sounds unlike any of them)")

# settings whose flags exclude each other: a weights file is loaded, so it cannot go with another choice
_EXCLUSIVE = ("pretrained", "weights_path")


def _setting_kwargs(s: Setting) -> dict:
    """``add_argument`` keywords for setting ``s``: its type, choices and help as config.py declares them."""
    help = s.help.replace("%", "%%")  # argparse formats help with %
    if s.kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help}
    return {"type": s.kind, "choices": s.choices, "help": help}


def _add_setting_args(p: argparse.ArgumentParser, only: Optional[tuple] = None, skip: tuple = (),
                      sections: Optional[dict] = None) -> None:
    """A flag for each config setting that has one (``only`` those, or all but ``skip``; of ``sections``,
    default RunConfig's), generated from its declaration; a flag not given is None and leaves the config
    as it is."""
    for section, cls in (sections or SECTIONS).items():
        chosen = [s for s in settings(cls) if s.flag and (only is None or s.name in only) and s.name not in skip]
        if not chosen:
            continue
        group = p.add_argument_group(f"{section} settings") if only is None else p
        exclusive = group.add_mutually_exclusive_group() if any(s.name in _EXCLUSIVE for s in chosen) else None
        for s in chosen:
            (exclusive if s.name in _EXCLUSIVE else group).add_argument(s.flag, dest=s.name, **_setting_kwargs(s))
        if any(s.name == "pretrained" for s in chosen):
            exclusive.add_argument("--no-pretrained", action="store_const", const="none", dest="pretrained",
                                   help="the same as --pretrained none: random initialisation, the from-scratch "
                                        "recipe")


class _RefuseFold(argparse.Action):
    """``cv`` picks each fold's test and validation folds itself: a fold flag is an error that says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"cv chooses each fold's test and validation folds itself, so it has no {option_string}: every "
                     f"fold in turn is the test fold (pick which with --folds) and validation is a --val-split of the "
                     f"others; use train for one fixed split")


def _add_run_args(p: argparse.ArgumentParser, skip: tuple = ()) -> None:
    """What train and cv share: the data, the config's sources and every setting's flag (but ``skip``)."""
    p.add_argument("data", help=_DATA_HELP)
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="named recipe (default: the default recipe; seed = the original notebook)")
    p.add_argument("--out", required=True, help="run directory")
    _add_setting_args(p, skip=skip)


def _guess_format(data: str) -> str:
    name = data.lower()
    return "csv" if name.endswith(".csv") else "webdataset" if name.endswith(".tar") else "folder"


def _resumed_run_config(args: argparse.Namespace):
    """With --resume, the config the run started with (a flag not given again keeps its value); else None."""
    last = Path(args.out) / "last.pt"
    if not getattr(args, "resume", False) or not last.is_file():
        return None  # fit says what is missing
    from .checkpoint import load_checkpoint
    from .config import RunConfig

    return RunConfig.from_saved(load_checkpoint(last)["config"]).to_dict()


def config_from_args(args: argparse.Namespace):
    v = vars(args)
    overrides = {sec: {s.name: v[s.name] for s in settings(cls) if v.get(s.name) is not None}
                 for sec, cls in SECTIONS.items()}
    overrides["data"]["root"] = args.data
    if getattr(args, "weights_path", None):
        overrides["model"]["pretrained"] = "auto"  # a given file is loaded or refused, never skipped
    base = _resumed_run_config(args)
    yaml_data = load_yaml(args.config).get("data", {}) if args.config else {}
    if base is None and "format" not in overrides["data"] and "format" not in yaml_data:
        overrides["data"]["format"] = _guess_format(args.data)
    return resolve(args.preset, args.config, overrides, base=base)


def cmd_train(args) -> int:
    from .train import fit

    summary = fit(config_from_args(args), args.out, resume=args.resume, overwrite=args.overwrite)
    if _first_process():
        print(f"best validation loss {summary['best_val_loss']:.4f} at epoch {summary['best_epoch']}; "
              f"run directory: {args.out}")
    return 0


def cmd_cv(args) -> int:
    from .cv import cross_validate

    summary = cross_validate(config_from_args(args), args.out, folds=args.folds)
    if _first_process():
        print(summary["table"])
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    r = run_demo(args.out, quiet=args.quiet)
    print(r["eval"]["report"])
    print(f"\nrun directory: {r['run_dir']} (config.yaml, metrics.csv, curves.png, best.pt)\n"
          f"evaluation:    {r['eval_dir']} (metrics.json, predictions.csv, confusion_matrix.png)\n"
          f"next: audioclf predict {r['run_dir']} {r['test_dir'] / 'tone'} | audioclf serve {r['run_dir']}")
    return 0


def cmd_evaluate(args) -> int:
    from .config import DataConfig
    from .evaluate import evaluate

    data = DataConfig(root=args.data, format=args.format or _guess_format(args.data), esc10=bool(args.esc10))
    metrics = evaluate(args.model, data, fold=args.fold, out_dir=args.out, device=args.device,
                       batch_size=args.batch_size, quiet=args.quiet)
    print(metrics["report"])
    return 0


def cmd_shard(args) -> int:
    from .config import DataConfig
    from .data import load_clips
    from .webdata import write_shards

    data = DataConfig(root=args.data, format=args.format or _guess_format(args.data), esc10=bool(args.esc10))
    if args.max_shard_mb is not None and not (math.isfinite(args.max_shard_mb) and args.max_shard_mb > 0):
        raise AudioclfError(f"--max-shard-mb {args.max_shard_mb}: must be a number > 0 (MiB)")
    limits = {"samples_per_shard": args.samples_per_shard,
              "max_shard_bytes": None if args.max_shard_mb is None else round(args.max_shard_mb * 2**20)}
    r = write_shards(load_clips(data), args.out, quiet=args.quiet, **{k: v for k, v in limits.items() if v is not None})
    print(f"{len(r['shards'])} shard(s), {r['samples']} samples, {len(r['skipped'])} skipped: {r['out']}")
    return 0


def cmd_predict(args) -> int:
    from .commands.predict import run_predict

    return run_predict(args.model, args.paths, out=args.out, top_k=args.top_k, batch_size=args.batch_size,
                       device=args.device, window_s=args.window, hop_s=args.hop, timeline=args.timeline,
                       submission=args.submission, out_format=args.format, retry_errors=args.retry_errors,
                       quiet=args.quiet, reject=not args.no_reject)


def cmd_serve(args) -> int:
    from .serve import serve

    limits = {k: getattr(args, k) for k in ("max_upload_mb", "max_audio_s", "max_windows", "timeout_s", "cors_origin",
                                            "max_connections")}
    serve(args.model, host=args.host, port=args.port, device=args.device, reject=not args.no_reject,
          **{k: v for k, v in limits.items() if v is not None})
    return 0


def cmd_export(args) -> int:
    from .export import export

    path = export(args.model, args.format, args.out)
    print(f"exported {args.format}: {path}")
    return 0


def cmd_backbones(args) -> int:
    from dataclasses import asdict

    from .backbones import BACKBONES, DEFAULT_BACKBONE
    from .config import FeatureConfig, ModelConfig
    from .model import build_network
    from .weights import status

    print(f"{'backbone':<10} {'parameters':>11}  {'input':<36} {'weights':<13} description")
    for name, b in BACKBONES.items():
        fe = {**asdict(FeatureConfig()), **b.front_end}  # no front end of its own: the config's defaults
        inp = (f"{fe['n_mels']} {fe['mel_scale'].capitalize()} mels, {fe['sample_rate'] / 1000:g} kHz, "
               f"hop {fe['hop_length']}")
        # with the published head (527 AudioSet classes; ImageNet's 1000): the count the weights hold
        net = build_network(ModelConfig(backbone=name), b.head_classes, fe["n_mels"])
        params = f"{sum(p.numel() for p in net.parameters()):,}"
        default = " (default)" if name == DEFAULT_BACKBONE else ""
        print(f"{name:<10} {params:>11}  {inp:<36} {status(name):<13} {b.description}{default}")
    print("weights: cached = in the torch hub cache; downloadable = fetched from the official URL on first use")
    return 0


def cmd_embed(args) -> int:
    from .commands.embed import run_embed

    r = run_embed(args.model, args.paths, out=args.out, batch_size=args.batch_size, device=args.device,
                  quiet=args.quiet)
    print(f"{r['n_files']} embeddings of dimension {r['dim']}: {r['out']}")
    return 0


def cmd_tag(args) -> int:
    from .commands.detect import run_tag

    return run_tag(args.paths, backbone=args.backbone, weights=args.weights, top_k=args.top_k, out=args.out,
                   device=args.device, batch_size=args.batch_size, quiet=args.quiet)


def cmd_detect(args) -> int:
    from .commands.detect import run_detect
    from .events import DetectConfig

    overrides = {s.name: getattr(args, s.name) for s in settings(DetectConfig) if getattr(args, s.name) is not None}
    ignore = [x.strip() for x in (args.ignore or "").split(",") if x.strip()]
    return run_detect(args.model, args.inputs, out=args.out, tune_on=args.tune, ignore=ignore, plot_dir=args.plot,
                      params=args.params, overrides=overrides, weights=args.weights, device=args.device,
                      batch_size=args.batch_size, quiet=args.quiet)


def cmd_evaluate_events(args) -> int:
    from .commands.detect import run_evaluate_events

    return run_evaluate_events(args.reference, args.estimated, out=args.out)


def _add_event_parsers(sub) -> None:
    """tag, detect and evaluate-events."""
    from .audioset import tagging_backbones
    from .events import DetectConfig

    p = sub.add_parser("tag", help="AudioSet tags (527 classes) of audio files, without training")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive) or .txt files listing paths")
    p.add_argument("--backbone", default="mn04_as", choices=tagging_backbones(), help="AudioSet tagger (default mn04_as)")
    p.add_argument("--weights", help="local copy of the backbone's official weights (default: torch hub cache or "
                                     "download)")
    p.add_argument("--top-k", type=int, default=3, help="tags per file (default 3)")
    p.add_argument("--out", help="also write the tags to this .csv (path, rank, label, prob)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("detect", help="sound events with onsets and offsets (DCASE TSV)")
    p.add_argument("model", help="run directory, .pt checkpoint, safetensors export, or an AudioSet backbone's name "
                                 "(mn04_as: AudioSet's 527 classes, no training)")
    p.add_argument("inputs", nargs="*", help="audio files, folders (recursive) or .txt files listing paths")
    p.add_argument("--out", help="event list to write: filename onset offset event_label score, tab-separated")
    p.add_argument("--tune", nargs=2, metavar=("VAL_AUDIO", "VAL_EVENTS"),
                   help="first choose the post-processing on validation recordings (a folder) and their events "
                        "(DCASE TSV), and save it with the model (RUN_DIR/detect.json, the checkpoint's 'detect')")
    p.add_argument("--ignore", help="classes never reported, comma-separated (background: rain,wind)")
    p.add_argument("--plot", metavar="DIR", help="a PNG per file: probability tracks and events over the spectrogram")
    p.add_argument("--params", help="detect settings JSON to read (instead of the model's), or to write with --tune")
    p.add_argument("--weights", help="with an AudioSet backbone's name: a local copy of its official weights")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    _add_setting_args(p, sections={"detect": DetectConfig})
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("evaluate-events", help="event- and segment-based F1, error rate and PSDS (sed_eval)")
    p.add_argument("reference", help="true events, DCASE TSV (filename onset offset event_label)")
    p.add_argument("estimated", help="detected events, DCASE TSV (with a score column for PSDS)")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate_events)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioclf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"audioclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier on a dataset")
    _add_run_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/last.pt; only --epochs, --device, --quiet, --num-workers, --cache-dir and "
                        "--deterministic may differ from the run's start")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="k-fold cross-validation over the dataset's folds")
    _add_run_args(p, skip=("val_fold", "test_fold"))
    p.add_argument("--folds", type=int, nargs="+", help="test folds to run (default: all)")
    for flag in ("--val-fold", "--test-fold"):
        p.add_argument(flag, nargs="?", action=_RefuseFold, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("demo", help="make a synthetic dataset, train on it, evaluate")
    p.add_argument("--out", default="runs/demo", help="where the data and the run go (default runs/demo)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="metrics, per-clip predictions and a confusion matrix")
    p.add_argument("model", help="run directory or .pt checkpoint")
    p.add_argument("data", help=_DATA_HELP)
    _add_setting_args(p, only=("format", "esc10"))
    p.add_argument("--fold", type=int, help="evaluate this fold only")
    p.add_argument("--out", help="output folder (default MODEL_DIR/eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("shard", help="write a dataset as WebDataset tar shards (audio, label, fold, group)")
    p.add_argument("data", help=_DATA_HELP)
    p.add_argument("--out", required=True, help="folder for the shards and their dataset.json")
    _add_setting_args(p, only=("format", "esc10"))
    p.add_argument("--samples-per-shard", type=int, help="most samples in one shard (default 500)")
    p.add_argument("--max-shard-mb", type=float, help="about the largest shard, in MiB (default 256)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("predict", help="classify audio files, folders or lists of paths")
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive), .txt files listing paths, or - for "
                   "one file on stdin")
    p.add_argument("--out", help="output .csv, .json or .parquet file (default: CSV on stdout), or a folder (existing, "
                   "or a new name without a suffix): resumable, and shared among torchrun's processes; the rows go to "
                   "DIR/parts as they come and are merged into DIR/predictions.csv")
    p.add_argument("--format", choices=["csv", "parquet", "both"],
                   help="with --out DIR: predictions.csv (default), predictions.parquet or both")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --out DIR: classify again the files done with an error (a rerun otherwise skips every "
                        "file with a row in DIR/parts, failed ones included)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--window", type=float, help="sliding-window length in s (default: training duration)")
    p.add_argument("--hop", type=float, help="sliding-window hop in s (default: half the window)")
    p.add_argument("--timeline", action="store_true", help="add per-window rows (start, end, label, confidence)")
    p.add_argument("--submission", action="store_true", help="write an ID,Class CSV")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-reject", action="store_true", help=NO_REJECT_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="HTTP API and web page for a trained model")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=float, help="largest upload in MiB, else 413 (default 50)")
    p.add_argument("--max-audio-s", type=float, help="longest decoded audio in s, else 413 (default 600)")
    p.add_argument("--max-windows", type=int, help="most sliding windows per request, else 422 (default 2000)")
    p.add_argument("--timeout-s", type=float, help="seconds a client may stall: headers, body, idle (default 10)")
    p.add_argument("--max-connections", type=int, help="open connections before requests get 503 (default 64)")
    p.add_argument("--cors-origin", help="let pages from this one origin call the API (default: none)")
    p.add_argument("--no-reject", action="store_true", help=NO_REJECT_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("backbones", help="list the backbones, their front ends and weight status")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("embed", help="penultimate-layer embeddings of audio files, for search and clustering")
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive) or .txt files listing paths")
    p.add_argument("--out", required=True, help="emb.npy (an .npy array plus emb.paths.txt) or emb.parquet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_embed)

    _add_event_parsers(sub)

    p = sub.add_parser("export", help="export to ONNX or safetensors")
    p.add_argument("model")
    p.add_argument("--format", choices=["onnx", "safetensors"], required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)
    return parser


def _first_process() -> bool:
    """Rank 0 under torchrun (which sets RANK), or no torchrun; read from the environment so that ``--help``
    does not import torch (runtime.dist_info does)."""
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    first = _first_process()  # under torchrun, rank 0 speaks for the job; the others only warn
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO if first else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except AudioclfError as e:
        print(f"audioclf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"audioclf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
