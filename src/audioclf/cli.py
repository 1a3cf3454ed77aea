"""The ``audioclf`` command: parse flags, configure logging, call one stage, turn errors into messages.

Each sub-command is a thin wrapper over a library function; the library logs, the CLI decides what the
user sees and the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import yaml

from ._version import __version__
from .backbones import DEFAULT_BACKBONE
from .config import PRESET_ALIASES, PRESETS, SECTIONS, load_yaml, resolve
from .errors import AudioclfError
from .flags import Deprecated, add_option_args, add_setting_args, common_flags, given_options, is_quiet
from .options import AuditOptions, PredictOptions, ServeLimits
from .rundir import RunDir
from .settings import settings

# the output kinds of predict --out DIR and of export (commands.predict and export hold the same lists: a
# test checks that they agree, so that --help does not import torch to read them)
PREDICT_OUT_FORMATS = ("csv", "parquet", "both")
EXPORT_FORMATS = ("onnx", "safetensors")

log = logging.getLogger("audioclf")

DESCRIPTION = """\
Train, evaluate, serve and export audio classifiers.

audioclf learns the classes of a labelled audio dataset (a folder per class, a CSV manifest, ESC-50,
UrbanSound8K or WebDataset shards): by default it fine-tunes a small AudioSet-pretrained MobileNet
(mn04_as) on log-mel spectrograms. The trained model then classifies files and folders, serves an HTTP
API, or is exported to ONNX or safetensors."""

EPILOG = """\
examples:
  audioclf demo                                        synthetic data: train, evaluate, in a minute or two
  audioclf train my_sounds/ --out runs/mine            a folder per class, the pretrained default
  audioclf train my_sounds/ --out runs/x --print-config   the configuration it would train with
  audioclf predict runs/mine clips/ --out preds.csv    classify files and folders
  audioclf serve runs/mine                             HTTP API and web page on http://127.0.0.1:8000

'audioclf COMMAND --help' lists a command's options. -v and -q may also follow the command."""

_DATA_HELP = ("dataset: a folder per class, a CSV manifest, an ESC-50/UrbanSound8K root, or WebDataset shards (a "
              "folder, a .tar or a pattern such as shards-{000..009}.tar)")

class _RefuseFold(argparse.Action):
    """``cv`` picks each fold's test and validation folds itself: a fold flag is an error that says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"cv chooses each fold's test and validation folds itself, so it has no {option_string}: every "
                     f"fold in turn is the test fold (pick which with --folds) and validation is a --val-split of the "
                     f"others; use train for one fixed split")


def _add_run_args(p: argparse.ArgumentParser, skip: tuple = ()) -> None:
    """What train and cv share: the data, the config's sources and every setting's flag (but ``skip``)."""
    p.add_argument("data", help=_DATA_HELP)
    p.add_argument("--config", help="YAML config file; flags override it (default: none)")
    p.add_argument("--preset", choices=sorted([*PRESETS, *PRESET_ALIASES]),
                   help="named recipe: default (the pretrained default backbone and its recipe) or tutorial (the "
                        "original tutorial's ResNet-18 recipe); seed is tutorial's old name, deprecated "
                        "(default: default)")
    p.add_argument("--out", help="run directory (required, except with --print-config)")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration the run would use (preset, the backbone's front end and recipe, "
                        "YAML file and flags applied) as YAML, and exit without training")
    add_setting_args(p, skip=skip)


def _guess_format(data: str) -> str:
    name = data.lower()
    return "csv" if name.endswith(".csv") else "webdataset" if name.endswith(".tar") else "folder"


def _resumed_run_config(args: argparse.Namespace):
    """With --resume, the config the run started with (a flag not given again keeps its value); else None."""
    last = RunDir(args.out).last if getattr(args, "resume", False) and args.out is not None else None
    if last is None or not last.is_file():
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


def _print_config(args) -> bool:
    """With --print-config, print the resolved configuration as YAML; whether it did (then nothing runs).
    Without it, a run needs somewhere to go."""
    if args.print_config:
        print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")
    elif args.out is None:
        raise AudioclfError(f"--out is required: the run directory to write (audioclf {args.command} {args.data} "
                            f"--out runs/mine)")
    return args.print_config


def cmd_train(args) -> int:
    from .train import fit

    if _print_config(args):
        return 0
    summary = fit(config_from_args(args), args.out, resume=args.resume, overwrite=args.overwrite)
    if _first_process():
        print(f"best validation loss {summary['best_val_loss']:.4f} at epoch {summary['best_epoch']}; "
              f"run directory: {args.out}")
    return 0


def cmd_cv(args) -> int:
    from .cv import cross_validate

    if _print_config(args):
        return 0
    summary = cross_validate(config_from_args(args), args.out, folds=args.folds)
    if _first_process():
        print(summary["table"])
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    r = run_demo(args.out, quiet=is_quiet(args))
    print(r["eval"]["report"])
    print(f"\nmodel:         {r['model']}" + (f"\n               {r['fallback']}" if r["fallback"] else ""))
    print(f"run directory: {r['run_dir']} (config.yaml, metrics.csv, curves.png, best.pt)\n"
          f"evaluation:    {r['eval_dir']} (metrics.json, predictions.csv, confusion_matrix.png)\n"
          f"next: audioclf predict {r['run_dir']} {r['test_dir'] / 'tone'} | audioclf serve {r['run_dir']}")
    return 0


def cmd_evaluate(args) -> int:
    from .config import DataConfig
    from .evaluate import evaluate

    data = DataConfig(root=args.data, format=args.format or _guess_format(args.data), esc10=bool(args.esc10))
    metrics = evaluate(args.model, data, fold=args.fold, out_dir=args.out, quiet=is_quiet(args),
                       **given_options(args, PredictOptions))
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
    r = write_shards(load_clips(data), args.out, quiet=is_quiet(args), **{k: v for k, v in limits.items() if v is not None})
    print(f"{len(r['shards'])} shard(s), {r['samples']} samples, {len(r['skipped'])} skipped: {r['out']}")
    return 0


def cmd_predict(args) -> int:
    from .commands.predict import run_predict

    return run_predict(args.model, args.paths, out=args.out, timeline=args.timeline, probs=args.probs,
                       submission=args.submission, out_format=args.out_format, retry_errors=args.retry_errors,
                       quiet=is_quiet(args), **given_options(args, PredictOptions))


def cmd_serve(args) -> int:
    from .serve import serve

    serve(args.model, **given_options(args, PredictOptions), **given_options(args, ServeLimits))
    return 0


def cmd_export(args) -> int:
    from .export import export

    path = export(args.model, args.out_format, args.out, quantize=args.quantize)
    print(f"exported {args.out_format}{' ' + args.quantize if args.quantize else ''}: {path}")
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

    r = run_embed(args.model, args.paths, out=args.out, quiet=is_quiet(args), **given_options(args, PredictOptions))
    failed = f"; {r['failed']} file(s) failed, left out (see the warnings)" if r["failed"] else ""
    print(f"{r['n_files']} embeddings of dimension {r['dim']}: {r['out']}{failed}")
    return 1 if r["failed"] else 0


def cmd_audit(args) -> int:
    from .commands.audit import run_audit
    from .config import DataConfig

    data = DataConfig(root=args.data, format=args.format or _guess_format(args.data), esc10=bool(args.esc10))
    r = run_audit(data, out=args.out, probs=args.probs, weights_path=args.weights_path, quiet=is_quiet(args),
                  **given_options(args, AuditOptions), **given_options(args, PredictOptions))
    print("\n".join(r["summary"]) + f"\nreport: {r['out'] / 'audit.md'} (and audit.json, PNGs)")
    return 0


def cmd_explain(args) -> int:
    from .commands.explain import run_explain

    r = run_explain(args.model, args.file, out=args.out, label=args.label, **given_options(args, PredictOptions))
    window = f"{r['start_s']:.2f}-{r['start_s'] + r['window_s']:.2f} s"  # the window explained
    print(f"{r['label']} {r['score']:.4f} ({window}): {r['out']}")
    return 0


def cmd_tag(args) -> int:
    from .commands.detect import run_tag

    return run_tag(args.paths, backbone=args.backbone, weights=args.weights, out=args.out, quiet=is_quiet(args),
                   **given_options(args, PredictOptions))


def _detect_flags(args) -> tuple[dict, list[str]]:
    """detect's and listen's shared flags: the DetectConfig settings given, and --ignore's classes."""
    from .events import DetectConfig

    overrides = {s.name: getattr(args, s.name) for s in settings(DetectConfig) if getattr(args, s.name) is not None}
    return overrides, [x.strip() for x in (args.ignore or "").split(",") if x.strip()]


def cmd_detect(args) -> int:
    from .commands.detect import run_detect

    overrides, ignore = _detect_flags(args)
    return run_detect(args.model, args.inputs, out=args.out, tune_on=args.tune, ignore=ignore, plot_dir=args.plot,
                      params=args.params, overrides=overrides, weights=args.weights, quiet=is_quiet(args),
                      **given_options(args, PredictOptions))


def cmd_listen(args) -> int:
    from .commands.listen import run_listen

    overrides, ignore = _detect_flags(args)
    return run_listen(args.model, weights=args.weights, params=args.params, overrides=overrides, ignore=ignore,
                      seconds=args.seconds, **given_options(args, PredictOptions), **given_options(args, ServeLimits))


def cmd_evaluate_events(args) -> int:
    from .commands.detect import run_evaluate_events

    return run_evaluate_events(args.reference, args.estimated, out=args.out)


def _add_event_parsers(command) -> None:
    """tag, detect and evaluate-events (``command(name, help, func)`` makes a sub-command's parser)."""
    from .audioset import tagging_backbones
    from .events import DetectConfig

    p = command("tag", "AudioSet tags (527 classes) of audio files, without training", cmd_tag)
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive) or .txt files listing paths")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=tagging_backbones(),
                   help=f"AudioSet tagger (default: {DEFAULT_BACKBONE})")
    p.add_argument("--weights", help="local copy of the backbone's official weights (default: torch hub cache or "
                                     "download)")
    p.add_argument("--out", help="also write the tags to this .csv (path, rank, label, prob) (default: none)")
    add_option_args(p, PredictOptions, only=("top_k", "batch_size", "device"))

    p = command("detect", "sound events with onsets and offsets (DCASE TSV)", cmd_detect)
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
    add_option_args(p, PredictOptions, only=("batch_size", "device"))
    add_setting_args(p, sections={"detect": DetectConfig})

    p = command("listen", "events from the default input device as they happen (sounddevice)", cmd_listen)
    p.add_argument("model", help="as for detect: a run, a checkpoint, an export or an AudioSet backbone's name")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: at Ctrl-C)")
    p.add_argument("--ignore", help="classes never reported, comma-separated")
    p.add_argument("--params", help="detect settings JSON to read (instead of the model's)")
    p.add_argument("--weights", help="with an AudioSet backbone's name: a local copy of its official weights")
    add_option_args(p, PredictOptions, only=("top_k", "device"))
    add_option_args(p, ServeLimits, only=("listen_hop_s",))
    add_setting_args(p, sections={"detect": DetectConfig})

    p = command("evaluate-events", "event- and segment-based F1, error rate and PSDS (sed_eval)", cmd_evaluate_events)
    p.add_argument("reference", help="true events, DCASE TSV (filename onset offset event_label)")
    p.add_argument("estimated", help="detected events, DCASE TSV (with a score column for PSDS)")
    p.add_argument("--out", help="write the metrics to this JSON file (default: none)")


def build_parser() -> argparse.ArgumentParser:
    common = common_flags()
    parser = argparse.ArgumentParser(prog="audioclf", description=DESCRIPTION, epilog=EPILOG, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"audioclf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", parents=[common])
        p.set_defaults(func=func)
        return p

    p = command("train", "train a classifier on a dataset", cmd_train)
    _add_run_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/last.pt; only --epochs, --device, --quiet, --num-workers, --cache-dir and "
                        "--deterministic may differ from the run's start")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")

    p = command("cv", "k-fold cross-validation over the dataset's folds", cmd_cv)
    _add_run_args(p, skip=("val_fold", "test_fold"))
    p.add_argument("--folds", type=int, nargs="+", help="test folds to run (default: all)")
    for flag in ("--val-fold", "--test-fold"):
        p.add_argument(flag, nargs="?", action=_RefuseFold, help=argparse.SUPPRESS)

    p = command("demo", "make a synthetic dataset, fine-tune the default backbone on it, evaluate", cmd_demo)
    p.add_argument("--out", default="runs/demo", help="where the data and the run go (default: runs/demo)")

    p = command("evaluate", "metrics, per-clip predictions and a confusion matrix", cmd_evaluate)
    p.add_argument("model", help="run directory or .pt checkpoint")
    p.add_argument("data", help=_DATA_HELP)
    add_setting_args(p, only=("format", "esc10"))
    p.add_argument("--fold", type=int, help="evaluate this fold only (default: every clip)")
    p.add_argument("--out", help="output folder (default: MODEL_DIR/eval)")
    add_option_args(p, PredictOptions, only=("batch_size", "device"))

    p = command("shard", "write a dataset as WebDataset tar shards (audio, label, fold, group)", cmd_shard)
    p.add_argument("data", help=_DATA_HELP)
    p.add_argument("--out", required=True, help="folder for the shards and their dataset.json")
    add_setting_args(p, only=("format", "esc10"))
    p.add_argument("--samples-per-shard", type=int, help="most samples in one shard (default: 500)")
    p.add_argument("--max-shard-mb", type=float, help="about the largest shard, in MiB (default: 256)")

    p = command("predict", "classify audio files, folders or lists of paths", cmd_predict)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive), .txt files listing paths, or - for "
                   "one file on stdin")
    p.add_argument("--out", help="output .csv, .json or .parquet file (default: CSV on stdout), or a folder (existing, "
                   "or a new name without a suffix): resumable, and shared among torchrun's processes; the rows go to "
                   "DIR/parts as they come and are merged into DIR/predictions.csv. Columns: path, label, confidence, "
                   "label_1, prob_1, ... (the --top-k best), error")
    p.add_argument("--out-format", choices=PREDICT_OUT_FORMATS,
                   help="with --out DIR: predictions.csv (default), predictions.parquet or both")
    p.add_argument("--format", choices=PREDICT_OUT_FORMATS, dest="out_format", action=Deprecated, new="--out-format",
                   help="deprecated spelling of --out-format (--format names the dataset layout elsewhere)")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --out DIR: classify again the files done with an error (a rerun otherwise skips every "
                        "file with a row in DIR/parts, failed ones included)")
    add_option_args(p, PredictOptions)
    p.add_argument("--timeline", action="store_true", help="also write the timeline table, one row per sliding "
                   "window (path, start_s, end_s, label, prob): x.timeline.csv beside --out x.csv, DIR/timeline.csv "
                   "with --out DIR, nested in .json; on stdout it replaces the per-file table")
    p.add_argument("--probs", action="store_true", help="add one probability column per class (p_<class>, in the "
                   "model's label order) to the per-file table")
    p.add_argument("--submission", action="store_true", help="write an ID,Class CSV")

    p = command("serve", "HTTP API and web page for a trained model", cmd_serve)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    add_option_args(p, PredictOptions, only=("device", "reject"))
    add_option_args(p.add_argument_group("server and limits"), ServeLimits)

    p = command("backbones", "list the backbones, their front ends and weight status", cmd_backbones)

    p = command("embed", "penultimate-layer embeddings of audio files, for search and clustering", cmd_embed)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive) or .txt files listing paths")
    p.add_argument("--out", required=True, help="emb.npy (an .npy array plus emb.paths.txt) or emb.parquet")
    add_option_args(p, PredictOptions, only=("batch_size", "device"))

    p = command("audit", "check a dataset: counts, unreadable, silent and clipped clips, duplicates and leakage, "
                         "likely label errors", cmd_audit)
    p.add_argument("data", help=_DATA_HELP)
    p.add_argument("--out", required=True, help="folder for audit.md, audit.json and the PNGs")
    add_setting_args(p, only=("format", "esc10", "weights_path"))
    add_option_args(p, AuditOptions)
    p.add_argument("--probs", help="out-of-fold probabilities for the label-error search: an audioclf cv folder, or "
                   "a CSV (path and one column per class, as the audit's own oof_probs.csv); default: a linear probe "
                   "on the embeddings, cross-validated over the folds")
    add_option_args(p, PredictOptions, only=("batch_size", "device"))

    p = command("explain", "draw where in time and frequency the model's evidence for a class lies", cmd_explain)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("file", help="audio file")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--label", help="class to explain (default: the predicted one)")
    add_option_args(p, PredictOptions, only=("batch_size", "device"))

    _add_event_parsers(command)

    p = command("export", "export to ONNX or safetensors", cmd_export)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--out-format", choices=EXPORT_FORMATS,
                      help="onnx: the whole graph, waveform to probabilities; safetensors: the weights and config "
                           "(no default: give one)")
    kind.add_argument("--format", choices=EXPORT_FORMATS, dest="out_format", action=Deprecated, new="--out-format",
                      help="deprecated spelling of --out-format (--format names the dataset layout elsewhere)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quantize", choices=["int8"], help="ONNX only: 8-bit weights (onnxruntime dynamic "
                   "quantization), a file about 2.6x smaller (default: fp32)")
    return parser


def _first_process() -> bool:
    """Rank 0 under torchrun (which sets RANK), or no torchrun; read from the environment so that ``--help``
    does not import torch (runtime.dist_info does)."""
    return os.environ.get("RANK", "0") == "0"


def _tell_torchrun(message: str) -> None:
    """Under torchrun, leave ``message`` where its failure report reads a process's root cause from (it names
    the file in ``TORCHELASTIC_ERROR_FILE``); without it the report shows only a link. torchrun still prints its
    own traceback after the report: it raises in the launcher, which no process of ours can stop."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(record), encoding="utf-8")
    except OSError:
        pass  # the report falls back to its link; the message is on stderr already


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    first = _first_process()  # under torchrun, rank 0 speaks for the job; the others only warn
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO if first else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except AudioclfError as e:
        message = f"audioclf {args.command}: error: {e}"
        print(message, file=sys.stderr)
        _tell_torchrun(message)
        return 2
    except KeyboardInterrupt:
        print(f"audioclf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
