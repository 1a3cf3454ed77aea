"""The ``audioclf`` command: parse flags, configure logging, call one stage, turn errors into messages.

Each sub-command is a thin wrapper over a library function; the library logs, the CLI decides what the
user sees and the exit code.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
from typing import Optional

import yaml

from ._version import __version__
from .backbones import BACKBONES, DEFAULT_BACKBONE
from .config import PRESET_ALIASES, PRESETS, SECTIONS, load_yaml, resolve
from .errors import AudioclfError
from .options import PredictOptions, ServeLimits
from .rundir import RunDir
from .settings import Setting, settings

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

# settings whose flags exclude each other: a weights file is loaded, so it cannot go with another choice
_EXCLUSIVE = ("pretrained", "weights_path")
# settings whose flag every command has (-q/--quiet, from _common_flags), not generated per section
_GLOBAL = ("quiet",)


def _common_flags() -> argparse.ArgumentParser:
    """-v and -q, accepted before the command and after it. A flag not given leaves no attribute (SUPPRESS),
    so a sub-command's parse does not undo one given before the command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars")
    return p


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@functools.cache
def _run_defaults() -> tuple[dict, set]:
    """(the values `audioclf train` uses when no flag, preset or YAML file says otherwise, by setting name;
    the names that a backbone's front end or recipe sets)."""
    defaults = {k: v for section in resolve("default").to_dict().values() if isinstance(section, dict)
                for k, v in section.items()}
    from_recipe = {k for b in BACKBONES.values() for d in (b.front_end, *b.recipe.values()) for k in d}
    return defaults, from_recipe


def _help(s: Setting, default, from_recipe: bool = False) -> str:
    """``s``'s help with its default, for argparse (which formats help with %)."""
    if from_recipe:
        note = "the backbone's recipe may set it" if "default" in s.help else "default: from the backbone's recipe"
        text = f"{s.help}; {note} ({_show(default)} for {DEFAULT_BACKBONE})"
    else:
        text = s.help if "default" in s.help else f"{s.help} (default: {_show(default)})"
    return text.replace("%", "%%")


def _setting_kwargs(s: Setting, help: str) -> dict:
    """``add_argument`` keywords for setting ``s``: its type and choices as declared."""
    if s.kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help}
    return {"type": s.kind, "choices": s.choices, "help": help}


def _add_setting_args(p: argparse.ArgumentParser, only: Optional[tuple] = None, skip: tuple = ()) -> None:
    """A flag for each config setting that has one (``only`` those, or all but ``skip``), generated from its
    declaration in config.py; a flag not given is None and leaves the config as it is."""
    defaults, from_recipe = _run_defaults()
    for section, cls in SECTIONS.items():
        chosen = [s for s in settings(cls) if s.flag and (only is None or s.name in only)
                  and s.name not in skip + _GLOBAL]
        if not chosen:
            continue
        group = p.add_argument_group(f"{section} settings") if only is None else p
        exclusive = group.add_mutually_exclusive_group() if any(s.name in _EXCLUSIVE for s in chosen) else None
        for s in chosen:
            kwargs = _setting_kwargs(s, _help(s, defaults[s.name], s.name in from_recipe))
            (exclusive if s.name in _EXCLUSIVE else group).add_argument(s.flag, dest=s.name, **kwargs)
        if any(s.name == "pretrained" for s in chosen):
            exclusive.add_argument("--no-pretrained", action="store_const", const="none", dest="pretrained",
                                   help="the same as --pretrained none: random initialisation, the from-scratch "
                                        "recipe")


def _add_option_args(p: argparse.ArgumentParser, cls: type, only: Optional[tuple] = None) -> None:
    """A flag for each option of ``cls`` (:class:`PredictOptions` or :class:`ServeLimits`), ``only`` those
    if given, generated from its declaration in options.py; a flag not given is None: the default applies."""
    for s in settings(cls):
        if only is None or s.name in only:
            p.add_argument(s.flag, dest=s.name, **_setting_kwargs(s, _help(s, s.default)))


def _options(args: argparse.Namespace, cls: type) -> dict:
    """The options of ``cls`` given as flags, checked against their declarations (a bad value is an
    AudioclfError naming it); those not given are left out, so the library's defaults (the same) apply."""
    given = {s.name: getattr(args, s.name) for s in settings(cls) if getattr(args, s.name, None) is not None}
    cls(**given)
    return given


def _quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


class _Deprecated(argparse.Action):
    """An old spelling that still works: it sets the new option's value and says on stderr what to use."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated here, use {self.new} (it will be removed)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


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
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration the run would use (preset, the backbone's front end and recipe, "
                        "YAML file and flags applied) as YAML, and exit without training")
    _add_setting_args(p, skip=skip)


def _guess_format(data: str) -> str:
    name = data.lower()
    return "csv" if name.endswith(".csv") else "webdataset" if name.endswith(".tar") else "folder"


def _resumed_run_config(args: argparse.Namespace):
    """With --resume, the config the run started with (a flag not given again keeps its value); else None."""
    last = RunDir(args.out).last
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


def _print_config(args) -> bool:
    """With --print-config, print the resolved configuration as YAML; whether it did (then nothing runs)."""
    if args.print_config:
        print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")
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

    r = run_demo(args.out, quiet=_quiet(args))
    print(r["eval"]["report"])
    print(f"\nrun directory: {r['run_dir']} (config.yaml, metrics.csv, curves.png, best.pt)\n"
          f"evaluation:    {r['eval_dir']} (metrics.json, predictions.csv, confusion_matrix.png)\n"
          f"next: audioclf predict {r['run_dir']} {r['test_dir'] / 'tone'} | audioclf serve {r['run_dir']}")
    return 0


def cmd_evaluate(args) -> int:
    from .config import DataConfig
    from .evaluate import evaluate

    data = DataConfig(root=args.data, format=args.format or _guess_format(args.data), esc10=bool(args.esc10))
    metrics = evaluate(args.model, data, fold=args.fold, out_dir=args.out, quiet=_quiet(args),
                       **_options(args, PredictOptions))
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
    r = write_shards(load_clips(data), args.out, quiet=_quiet(args), **{k: v for k, v in limits.items() if v is not None})
    print(f"{len(r['shards'])} shard(s), {r['samples']} samples, {len(r['skipped'])} skipped: {r['out']}")
    return 0


def cmd_predict(args) -> int:
    from .commands.predict import run_predict

    return run_predict(args.model, args.paths, out=args.out, timeline=args.timeline, submission=args.submission,
                       out_format=args.out_format, retry_errors=args.retry_errors, quiet=_quiet(args),
                       **_options(args, PredictOptions))


def cmd_serve(args) -> int:
    from .serve import serve

    serve(args.model, **_options(args, PredictOptions), **_options(args, ServeLimits))
    return 0


def cmd_export(args) -> int:
    from .export import export

    path = export(args.model, args.out_format, args.out)
    print(f"exported {args.out_format}: {path}")
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

    r = run_embed(args.model, args.paths, out=args.out, quiet=_quiet(args), **_options(args, PredictOptions))
    print(f"{r['n_files']} embeddings of dimension {r['dim']}: {r['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = _common_flags()
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

    p = command("demo", "make a synthetic dataset, train on it, evaluate", cmd_demo)
    p.add_argument("--out", default="runs/demo", help="where the data and the run go (default: runs/demo)")

    p = command("evaluate", "metrics, per-clip predictions and a confusion matrix", cmd_evaluate)
    p.add_argument("model", help="run directory or .pt checkpoint")
    p.add_argument("data", help=_DATA_HELP)
    _add_setting_args(p, only=("format", "esc10"))
    p.add_argument("--fold", type=int, help="evaluate this fold only (default: every clip)")
    p.add_argument("--out", help="output folder (default: MODEL_DIR/eval)")
    _add_option_args(p, PredictOptions, only=("batch_size", "device"))

    p = command("shard", "write a dataset as WebDataset tar shards (audio, label, fold, group)", cmd_shard)
    p.add_argument("data", help=_DATA_HELP)
    p.add_argument("--out", required=True, help="folder for the shards and their dataset.json")
    _add_setting_args(p, only=("format", "esc10"))
    p.add_argument("--samples-per-shard", type=int, help="most samples in one shard (default: 500)")
    p.add_argument("--max-shard-mb", type=float, help="about the largest shard, in MiB (default: 256)")

    p = command("predict", "classify audio files, folders or lists of paths", cmd_predict)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive), .txt files listing paths, or - for "
                   "one file on stdin")
    p.add_argument("--out", help="output .csv, .json or .parquet file (default: CSV on stdout), or a folder (existing, "
                   "or a new name without a suffix): resumable, and shared among torchrun's processes; the rows go to "
                   "DIR/parts as they come and are merged into DIR/predictions.csv")
    p.add_argument("--out-format", choices=PREDICT_OUT_FORMATS,
                   help="with --out DIR: predictions.csv (default), predictions.parquet or both")
    p.add_argument("--format", choices=PREDICT_OUT_FORMATS, dest="out_format", action=_Deprecated, new="--out-format",
                   help="deprecated spelling of --out-format (--format names the dataset layout elsewhere)")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --out DIR: classify again the files done with an error (a rerun otherwise skips every "
                        "file with a row in DIR/parts, failed ones included)")
    _add_option_args(p, PredictOptions)
    p.add_argument("--timeline", action="store_true", help="add per-window rows (start, end, label, confidence)")
    p.add_argument("--submission", action="store_true", help="write an ID,Class CSV")

    p = command("serve", "HTTP API and web page for a trained model", cmd_serve)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    _add_option_args(p, PredictOptions, only=("device",))
    _add_option_args(p.add_argument_group("server and limits"), ServeLimits)

    p = command("backbones", "list the backbones, their front ends and weight status", cmd_backbones)

    p = command("embed", "penultimate-layer embeddings of audio files, for search and clustering", cmd_embed)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive) or .txt files listing paths")
    p.add_argument("--out", required=True, help="emb.npy (an .npy array plus emb.paths.txt) or emb.parquet")
    _add_option_args(p, PredictOptions, only=("batch_size", "device"))

    p = command("export", "export to ONNX or safetensors", cmd_export)
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--out-format", choices=EXPORT_FORMATS,
                      help="onnx: the whole graph, waveform to probabilities; safetensors: the weights and config "
                           "(no default: give one)")
    kind.add_argument("--format", choices=EXPORT_FORMATS, dest="out_format", action=_Deprecated, new="--out-format",
                      help="deprecated spelling of --out-format (--format names the dataset layout elsewhere)")
    p.add_argument("--out", required=True, help="output folder")
    return parser


def _first_process() -> bool:
    """Rank 0 under torchrun (which sets RANK), or no torchrun; read from the environment so that ``--help``
    does not import torch (runtime.dist_info does)."""
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    first = _first_process()  # under torchrun, rank 0 speaks for the job; the others only warn
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO if first else logging.WARNING,
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
