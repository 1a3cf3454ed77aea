"""The ``audioclf`` command: parse flags, configure logging, call one stage, turn errors into messages.

Each sub-command is a thin wrapper over a library function; the library logs, the CLI decides what the
user sees and the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._version import __version__
from .backbones import BACKBONE_NAMES
from .config import PRESETS, AudioclfError, load_yaml, resolve

log = logging.getLogger("audioclf")


def _add_data_args(p: argparse.ArgumentParser, with_splits: bool = True, with_folds: bool = True) -> None:
    p.add_argument("data", help="dataset: a folder per class, a CSV manifest, or an ESC-50/UrbanSound8K root")
    p.add_argument("--format", choices=["folder", "csv", "esc50", "urbansound8k"], default=None,
                   help="dataset layout (default: folder, or csv when DATA is a .csv file)")
    p.add_argument("--esc10", action="store_true", default=None, help="ESC-50: keep the ESC-10 subset")
    if with_splits and with_folds:  # cv chooses each fold's test fold itself
        p.add_argument("--val-fold", type=int, help="hold out this fold for validation")
        p.add_argument("--test-fold", type=int, help="hold out this fold for the final test")
    if with_splits:
        p.add_argument("--val-split", type=float, help="validation fraction when no --val-fold (default 0.2)")
        p.add_argument("--cache-dir", help="feature cache folder (default $AUDIOCLF_CACHE or ~/.cache/audioclf)")
        p.add_argument("--strict", action="store_true", default=None, help="stop at the first unreadable clip")
        p.add_argument("--balance", choices=["none", "weights", "sampler"], help="class-imbalance handling")
        p.add_argument("--num-workers", type=int, help="decoding processes for the feature cache")


def _add_train_args(p: argparse.ArgumentParser, with_folds: bool = True) -> None:
    _add_data_args(p, with_folds=with_folds)
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named recipe (default: the default recipe; seed = the original notebook)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 pretrained, 1e-3 from scratch)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (0 = off)")
    p.add_argument("--scheduler", choices=["plateau", "cosine", "onecycle"])
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--mixup", type=float, dest="mixup_alpha", help="mixup alpha (0 = off)")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--freq-mask", type=int, dest="freq_mask_width", help="widest frequency mask (mel bands)")
    p.add_argument("--time-mask", type=int, dest="time_mask_width", help="widest time mask (frames)")
    p.add_argument("--time-shift", type=float, help="roll examples in time by up to this fraction (0 = off)")
    p.add_argument("--time-stretch", type=float, help="stretch examples in time by up to 1 + this factor (0 = off)")
    p.add_argument("--freq-shift", type=int, help="shift examples by up to this many mel bands (0 = off)")
    p.add_argument("--gain-db", type=float, help="random gain in +-dB (0 = off)")
    p.add_argument("--sample-rate", type=int)
    p.add_argument("--duration", type=float, dest="duration_s", help="seconds per example")
    p.add_argument("--backbone", choices=BACKBONE_NAMES,
                   help="network, with its own front end and recipe (list them: audioclf backbones)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-pretrained", action="store_const", const="none", dest="pretrained",
                   help="random initialisation (the from-scratch recipe)")
    g.add_argument("--pretrained", choices=["auto", "imagenet", "audioset", "none"], dest="pretrained",
                   help="auto (default): the backbone's pretrained weights when available, else from scratch")
    g.add_argument("--weights", dest="weights_path",
                   help="local copy of the backbone's official weights (e.g. mn04_as_mAP_432.pt)")
    p.add_argument("--no-stem-pool", action="store_const", const=False, dest="stem_pool",
                   help="drop ResNet's max-pool after the stem: 2x the resolution, 4x the compute")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_const", const=False, dest="amp",
                   help="full fp32 (default: mixed precision on CUDA and on CPUs with native bf16)")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_const", const=True,
                   help="deterministic kernels: the same seed gives the same model on CUDA too (slower)")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    p.add_argument("--out", required=True, help="run directory")


# flag name -> config section; None values (flags not given) leave the config as it is
_SECTIONS = {
    "data": ["format", "esc10", "val_fold", "test_fold", "val_split", "cache_dir", "strict", "balance", "num_workers"],
    "features": ["sample_rate", "duration_s"],
    "augment": ["mixup_alpha", "freq_mask_width", "time_mask_width", "time_shift", "time_stretch", "freq_shift", "gain_db"],
    "model": ["backbone", "pretrained", "weights_path", "dropout", "stem_pool"],
    "train": ["epochs", "batch_size", "lr", "weight_decay", "patience", "scheduler", "warmup_epochs",
              "label_smoothing", "device", "amp", "seed", "quiet", "deterministic"],
}


def _guess_format(data: str) -> str:
    return "csv" if data.lower().endswith(".csv") else "folder"


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
    overrides = {sec: {k: v[k] for k in keys if v.get(k) is not None} for sec, keys in _SECTIONS.items()}
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
    print(f"best validation loss {summary['best_val_loss']:.4f} at epoch {summary['best_epoch']}; "
          f"run directory: {args.out}")
    return 0


def cmd_cv(args) -> int:
    from .cv import cross_validate

    summary = cross_validate(config_from_args(args), args.out, folds=args.folds)
    print(summary["table"])
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quiet=args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from .config import DataConfig
    from .evaluate import evaluate

    data = DataConfig(root=args.data, format=args.format or _guess_format(args.data), esc10=bool(args.esc10))
    metrics = evaluate(args.model, data, fold=args.fold, out_dir=args.out, device=args.device,
                       batch_size=args.batch_size, quiet=args.quiet)
    print(metrics["report"])
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_cli

    return predict_cli(args)


def cmd_serve(args) -> int:
    from .serve import serve

    limits = {k: getattr(args, k) for k in ("max_upload_mb", "max_audio_s", "max_windows", "timeout_s", "cors_origin",
                                            "max_connections")}
    serve(args.model, host=args.host, port=args.port, device=args.device,
          **{k: v for k, v in limits.items() if v is not None})
    return 0


def cmd_export(args) -> int:
    from .export import export

    path = export(args.model, args.format, args.out)
    print(f"exported {args.format}: {path}")
    return 0


def cmd_backbones(args) -> int:
    from .backbones import BACKBONES, DEFAULT_BACKBONE
    from .config import ModelConfig
    from .model import build_network
    from .weights import status

    print(f"{'backbone':<10} {'parameters':>11}  {'input':<36} {'weights':<13} description")
    for name, b in BACKBONES.items():
        fe = b.front_end
        inp = (f"{fe['n_mels']} Kaldi mels, {fe['sample_rate'] // 1000} kHz, hop {fe['hop_length']}" if fe
               else "80 Slaney mels, 22.05 kHz, hop 256")
        # with the published head (527 AudioSet classes; ImageNet's 1000): the count the weights hold
        n_out = 527 if fe else 1000
        params = f"{sum(p.numel() for p in build_network(ModelConfig(backbone=name), n_out, fe.get('n_mels', 80)).parameters()):,}"
        default = " (default)" if name == DEFAULT_BACKBONE else ""
        print(f"{name:<10} {params:>11}  {inp:<36} {status(name):<13} {b.description}{default}")
    print("weights: cached = in the torch hub cache; downloadable = fetched from the official URL on first use")
    return 0


def cmd_embed(args) -> int:
    from .predict import collect_paths, load, write_embeddings

    clf = load(args.model, device=args.device, batch_size=args.batch_size)
    paths = collect_paths(args.paths)
    emb = clf.embed_files(paths, quiet=args.quiet)
    out = write_embeddings(args.out, [str(p) for p in paths], emb)
    print(f"{len(paths)} embeddings of dimension {emb.shape[1]}: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioclf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"audioclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier on a dataset")
    _add_train_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/last.pt; only --epochs, --device, --quiet, --num-workers, --cache-dir and "
                        "--deterministic may differ from the run's start")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="k-fold cross-validation over the dataset's folds")
    _add_train_args(p, with_folds=False)
    p.add_argument("--folds", type=int, nargs="+", help="test folds to run (default: all)")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("demo", help="make a synthetic dataset, train on it, evaluate")
    p.add_argument("--out", default="runs/demo", help="where the data and the run go (default runs/demo)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="metrics, per-clip predictions and a confusion matrix")
    p.add_argument("model", help="run directory or .pt checkpoint")
    _add_data_args(p, with_splits=False)
    p.add_argument("--fold", type=int, help="evaluate this fold only")
    p.add_argument("--out", help="output folder (default MODEL_DIR/eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify audio files, folders or lists of paths")
    p.add_argument("model", help="run directory, .pt checkpoint or exported safetensors folder")
    p.add_argument("paths", nargs="+", help="audio files, folders (recursive), .txt files listing paths, or - for "
                   "one file on stdin")
    p.add_argument("--out", help="output .csv or .json (default: CSV on stdout)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--window", type=float, help="sliding-window length in s (default: training duration)")
    p.add_argument("--hop", type=float, help="sliding-window hop in s (default: half the window)")
    p.add_argument("--timeline", action="store_true", help="add per-window rows (start, end, label, confidence)")
    p.add_argument("--submission", action="store_true", help="write an ID,Class CSV")
    p.add_argument("--quiet", action="store_true")
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

    p = sub.add_parser("export", help="export to ONNX or safetensors")
    p.add_argument("model")
    p.add_argument("--format", choices=["onnx", "safetensors"], required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
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
