"""Training: ``fit(config, out_dir)`` reads top to bottom, one stage per comment.

set up (devices, DDP) -> data (clips, feature cache, split) -> model (weights, normalisation) ->
optimiser and schedule -> resume -> for each epoch: train -> validate -> log a metrics.csv row ->
checkpoint (best.pt / last.pt, atomic) -> schedule step -> early-stopping check -> curves.png.

Every epoch draws its order, crops, masks and mixup from generators seeded by (seed, epoch, rank), so a
run resumed from ``last.pt`` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import SpecAugment, mixup
from .backbones import BACKBONES
from .checkpoint import inference_state, load_checkpoint, save_checkpoint
from .fileio import atomic_path
from .config import AudioclfError, RunConfig
from .data import load_clips, split_clips
from .evaluate import EVAL_FILES, macro_f1
from .model import AudioResNet, build_model
from .runtime import amp_dtype, resolve_device
from .store import FeatureBank

log = logging.getLogger(__name__)

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "epoch_s", "clips_per_s"]
LR_PRETRAINED, LR_SCRATCH = 1e-4, 1e-3


# ------------------------------------------------------------------------------------------- helpers

def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's training indices for ``epoch``: a seeded permutation (or weighted draw when
    balancing by sampling), padded to a multiple of ``world`` and strided like DistributedSampler."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.multinomial(weights, n, replacement=True, generator=g) if weights is not None else torch.randperm(n, generator=g)
    pad = (-n) % world
    order = torch.cat([order, order[:pad]])
    return order[rank::world]


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as ``t`` (a TrainConfig with its lr resolved) says."""
    # fused: one kernel over all 11M parameters; the per-tensor loop cost 65 ms a step on 2 CPU cores
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def make_scheduler(opt: torch.optim.Optimizer, config: RunConfig, steps_per_epoch: int):
    """(scheduler, steps_per_batch): per-batch schedules step every batch, plateau once per epoch."""
    t = config.train
    total = t.epochs * steps_per_epoch
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2), False
    if t.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=total), True
    warmup = t.warmup_epochs * steps_per_epoch

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, cosine), True


@torch.no_grad()
def predict_bank(model: torch.nn.Module, bank: FeatureBank, idx: torch.Tensor, device, batch_size: int,
                 autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of clips ``idx`` from the feature cache, centre-cropped, eval mode."""
    model.eval()
    logits, labels = [], []
    for i in range(0, len(idx), batch_size):
        x, y = bank.batch(idx[i:i + batch_size])
        with autocast():
            logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def validate(model, bank: FeatureBank, idx: torch.Tensor, device, batch_size: int, autocast,
             rank: int, world: int) -> dict:
    """Loss, accuracy and macro-F1 over ``idx`` (sharded across ranks, gathered everywhere): plain floats."""
    logits, labels = predict_bank(model, bank, idx[rank::world], device, batch_size, autocast)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (logits, labels))
        logits, labels = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    pred = logits.argmax(1)
    return {"val_loss": F.cross_entropy(logits, labels).item(), "val_acc": (pred == labels).float().mean().item(),
            "val_f1": macro_f1(labels.numpy(), pred.numpy())}


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    col = {k: [float(r[k]) for r in rows] for k in METRIC_FIELDS[1:]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(ep, col["train_loss"], label="train"), axes[0].plot(ep, col["val_loss"], label="validation")
    axes[0].set_title("loss"), axes[0].legend()
    axes[1].plot(ep, col["train_acc"], label="train"), axes[1].plot(ep, col["val_acc"], label="validation")
    axes[1].plot(ep, col["val_f1"], label="validation macro-F1", linestyle="--")
    axes[1].set_title("accuracy"), axes[1].set_ylim(0, 1.02), axes[1].legend()
    axes[2].plot(ep, col["lr"]), axes[2].set_title("learning rate")
    if min(col["lr"]) > 0:
        axes[2].set_yscale("log")
    for a in axes:
        a.set_xlabel("epoch"), a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, METRIC_FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in METRIC_FIELDS} for r in rows)


# ------------------------------------------------------------------------------------------- fit

def fit(config: RunConfig, out_dir, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a classifier as ``config`` says; write everything to ``out_dir``; return a summary dict
    (best_val_loss, best_epoch, epochs_run, stopped_early, pretrained, and test metrics with a test fold).

    ``out_dir`` is locked while the run lasts: a second training into it is refused. A directory that
    holds an earlier run is refused unless ``resume`` (continue it: only the settings in ``_RESUMABLE``
    may differ from its ``last.pt``) or ``overwrite`` (remove its outputs first).
    """
    out = Path(out_dir)
    if _dist_info()[0] != 0:  # rank 0 owns the run directory
        return _fit(config, out, resume)
    _check_out_dir(out)
    with _run_dir_lock(out):
        _clear_earlier_run(out, resume, overwrite)
        return _fit(config, out, resume)


def _fit(config: RunConfig, out: Path, resume: bool) -> dict:
    rank, local_rank, world = _dist_info()
    master = rank == 0

    # --- resume: the checkpoint's config wins, so the run continues as it started; only run-only settings change
    ckpt = None
    if resume:
        if not (out / "last.pt").is_file():
            raise AudioclfError(f"--resume: {out / 'last.pt'} does not exist; start a new run without --resume")
        ckpt = load_checkpoint(out / "last.pt")
        config = _resumed_config(RunConfig.from_saved(ckpt["config"]), config, out)
    t = config.train

    # --- devices and processes
    device = resolve_device(t.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(t.seed)
    amp = amp_dtype(device) if t.amp else None
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)  # noqa: E731
    quiet = t.quiet or not master
    handler = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        handler = _log_to_file(out / "train.log")
    restore_kernels = _deterministic_kernels(t.deterministic)

    try:
        # --- clips: the dataset's files and classes
        clipset = load_clips(config.data)
        if ckpt is not None and clipset.classes != list(ckpt["labels"]):
            raise AudioclfError(f"--resume: {config.data.root} now has the classes {', '.join(clipset.classes)}; the run in "
                                f"{out} was trained on {', '.join(ckpt['labels'])}. Resume needs the same classes: start "
                                f"a new run (another --out, or --overwrite) to train on these")
        n_classes = len(clipset.classes)

        # --- model: the backbone, pretrained or from scratch; its weights are fetched (or refused) before
        # the feature cache build, which can take minutes
        torch.manual_seed(t.seed)  # init from the seed alone, whatever ran before in this process
        model, pretrained = build_model(config.model, n_classes, config.features.n_mels)
        if t.lr is None:
            t = replace(t, lr=LR_PRETRAINED if pretrained else LR_SCRATCH)
        config = replace(config, train=t, model=replace(
            config.model, pretrained=BACKBONES[config.model.backbone].pretrained_on if pretrained else "none"))

        # --- data: clips -> cached features (rank 0 builds the cache, the others read it) -> split
        build = lambda: FeatureBank.build(clipset, config.features, cache_dir=config.data.cache_dir,  # noqa: E731
                                          device=device, num_workers=config.data.num_workers,
                                          strict=config.data.strict, quiet=quiet)
        if master:
            bank = build()
        if world > 1:
            dist.barrier()
        if not master:
            bank = build()
        splits = split_clips(bank.clips, val_fold=config.data.val_fold, test_fold=config.data.test_fold,
                             val_split=config.data.val_split, seed=t.seed, classes=clipset.classes)
        for name, clips in splits.items():
            if clips:
                log.info("%-5s: %s", name, clipset.describe(clips))
        missing = {clipset.classes[c] for c in range(len(clipset.classes))} - {clipset.classes[c.label] for c in splits["train"]}
        if missing:
            raise AudioclfError(f"class(es) {', '.join(sorted(missing))} have no training clips after the split; "
                                f"change val_fold/test_fold/val_split or add clips")
        if master:
            _write_skipped(out / "skipped.csv", bank.skipped)
        train_idx, val_idx = bank.indices(splits["train"]), bank.indices(splits["val"])
        if device.type == "cuda":
            bank.to_device(device, max_bytes=4 * 2**30)  # a store that fits whole on the GPU: batches never cross PCIe

        # --- model on the data: ResNet-18's normalisation fitted on the training clips only
        if isinstance(model, AudioResNet):  # the MobileNets' front end normalises with fixed numbers
            model.norm.fit((bank.clip_frames(i) for i in train_idx.tolist()),
                           per_band=config.model.normalization != "global")
        log.info("recipe: %s %s, lr %.2g, %s schedule, %d epochs max, patience %d, batch %d, device %s%s%s",
                 config.model.backbone, f"pretrained on {config.model.pretrained}" if pretrained else "from scratch", t.lr, t.scheduler, t.epochs,
                 t.patience, t.batch_size, device, f" x{world} processes" if world > 1 else "",
                 f", mixed precision {str(amp).removeprefix('torch.')}" if amp else "")
        model.to(device)
        model.to(memory_format=torch.channels_last)  # what cuDNN and oneDNN convolve fastest (1.2-1.3x on CPU)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world > 1 else model
        if master:
            config.save_yaml(out / "config.yaml")
            (out / "labels.json").write_text(json.dumps(clipset.classes, indent=1))

        # --- optimiser, loss, schedule
        opt = make_optimizer(model, t, device)
        class_weights = None
        sample_weights = None
        counts = torch.bincount(bank.labels[train_idx], minlength=n_classes).float()
        if config.data.balance == "weights":
            class_weights = (counts.sum() / (n_classes * counts)).to(device)
        elif config.data.balance == "sampler":
            sample_weights = (1.0 / counts)[bank.labels[train_idx]]
        steps_per_epoch = math.ceil(math.ceil(len(train_idx) / world) / t.batch_size)
        scheduler, per_batch = make_scheduler(opt, config, steps_per_epoch)
        scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
        specaug = SpecAugment(config.augment, features=config.features)

        # --- state, from scratch or from last.pt
        start_epoch, best_val_loss, best_epoch, bad_epochs, rows = 1, float("inf"), 0, 0, []
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            start_epoch, best_val_loss = ckpt["epoch"] + 1, ckpt["best_val_loss"]
            best_epoch, bad_epochs = ckpt["best_epoch"], ckpt["bad_epochs"]
            rows = [r for r in _read_metrics(out / "metrics.csv") if r["epoch"] < start_epoch]
            log.info("resumed from %s at epoch %d", out / "last.pt", ckpt["epoch"])

        def train_state(epoch: int) -> dict:
            return inference_state(model, config, clipset.classes, {
                "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "best_val_loss": best_val_loss, "best_epoch": best_epoch, "bad_epochs": bad_epochs})

        if master and ckpt is None:
            save_checkpoint(train_state(0), out / "last.pt")  # there is always a state to resume from

        stopped_early = False
        epoch = start_epoch - 1
        for epoch in range(start_epoch, t.epochs + 1):
            t0 = time.perf_counter()
            # every random draw of this epoch comes from (seed, epoch, rank): resumable and deterministic
            torch.manual_seed(t.seed * 1000 + epoch * 7919 + rank)
            gen = torch.Generator().manual_seed(t.seed * 100003 + epoch * 7919 + rank + 1)
            specaug.set_generator(gen)

            # --- train one epoch
            ddp.train()
            specaug.train()
            order = train_idx[epoch_order(len(train_idx), epoch, t.seed, rank, world, sample_weights)]
            loss_sum = correct = seen = 0.0
            bar = tqdm(range(0, len(order), t.batch_size), desc=f"epoch {epoch}/{t.epochs}", unit="batch",
                       leave=False, disable=True if quiet else None)
            for i in bar:
                x, y = bank.batch(order[i:i + t.batch_size], random_crop=True, generator=gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x = specaug(x)
                x, target = mixup(x, y, n_classes, config.augment.mixup_alpha, gen)
                with autocast():
                    logits = ddp(x)
                    loss = F.cross_entropy(logits.float(), target, weight=class_weights, label_smoothing=t.label_smoothing)
                scaler.scale(loss).backward()
                if t.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if per_batch:
                    scheduler.step()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise AudioclfError(f"training loss is {loss_value} at epoch {epoch}, batch {i // t.batch_size + 1}: "
                                        f"the model diverged. Lower the learning rate (lr={t.lr:.3g}), "
                                        f"set train.grad_clip, or check the data for NaN/Inf")
                loss_sum += loss_value * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
            bar.close()
            train_s = time.perf_counter() - t0

            # --- validate
            v = validate(ddp, bank, val_idx, device, t.batch_size * 2, autocast, rank, world)
            if not math.isfinite(v["val_loss"]):
                raise AudioclfError(f"validation loss is {v['val_loss']} at epoch {epoch}: the model diverged. "
                                    f"Lower the learning rate (lr={t.lr:.3g}) or set train.grad_clip")
            lr = opt.param_groups[0]["lr"]
            if not per_batch:
                scheduler.step(v["val_loss"])

            # --- log
            row = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_loss": v["val_loss"], "val_acc": v["val_acc"], "val_f1": v["val_f1"],
                   "epoch_s": time.perf_counter() - t0, "clips_per_s": seen * world / train_s}
            rows.append(row)
            improved = v["val_loss"] < best_val_loss
            if improved:
                best_val_loss, best_epoch, bad_epochs = v["val_loss"], epoch, 0
            else:
                bad_epochs += 1
            log.info("epoch %3d  lr %.2e  train loss %.4f acc %.3f  val loss %.4f acc %.3f f1 %.3f  %5.1fs %6.1f clips/s%s",
                     epoch, lr, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"], row["val_f1"],
                     row["epoch_s"], row["clips_per_s"], "  *" if improved else "")

            # --- checkpoint: best by validation loss, last for --resume
            if master:
                _write_metrics(out / "metrics.csv", rows)
                state = train_state(epoch)
                if improved:
                    save_checkpoint({k: state[k] for k in ("config", "labels", "model", "epoch", "best_val_loss")},
                                    out / "best.pt")
                save_checkpoint(state, out / "last.pt")

            # --- early stopping
            if t.patience and bad_epochs >= t.patience:
                log.info("early stop: validation loss has not improved for %d epochs (best %.4f at epoch %d)",
                         bad_epochs, best_val_loss, best_epoch)
                stopped_early = True
                break

        summary = {"best_val_loss": best_val_loss, "best_epoch": best_epoch, "epochs_run": epoch,
                   "stopped_early": stopped_early, "pretrained": pretrained, "lr": t.lr}
        # --- test fold: the best model on clips it never saw, from the same cache
        if splits["test"]:
            best = load_checkpoint(out / "best.pt") if master or world == 1 else None
            if world > 1:
                holder = [best]
                dist.broadcast_object_list(holder, src=0)
                best = holder[0]
            model.load_state_dict(best["model"])
            test_idx = bank.indices(splits["test"])
            logits, labels = predict_bank(model, bank, test_idx, device, t.batch_size * 2, autocast)
            pred = logits.argmax(1)
            summary.update(test_acc=(pred == labels).float().mean().item(), test_f1=macro_f1(labels.numpy(), pred.numpy()),
                           test_n=len(labels))
            if master:
                _write_test(out, logits, labels, [bank.clips[i].path for i in test_idx.tolist()], clipset.classes)
            log.info("test fold %s: accuracy %.4f, macro-F1 %.4f (%d clips)", config.data.test_fold,
                     summary["test_acc"], summary["test_f1"], len(labels))
        if master:
            plot_curves(out / "metrics.csv", out / "curves.png")
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    except KeyboardInterrupt:
        log.warning("interrupted: %s holds the last completed epoch; continue with --resume", out / "last.pt")
        raise
    finally:
        restore_kernels()
        if handler is not None:
            logging.getLogger("audioclf").removeHandler(handler)
            handler.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _write_test(out: Path, logits: torch.Tensor, labels: torch.Tensor, paths: list[str], classes: list[str]) -> None:
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    with open(out / "test_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", "correct"])
        for p, y, k, pr in zip(paths, labels.tolist(), pred.tolist(), probs.max(1).values.tolist()):
            w.writerow([p, classes[y], classes[k], f"{pr:.4f}", int(y == k)])
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(labels.numpy(), pred.numpy(), labels=list(range(len(classes))))
    (out / "test_metrics.json").write_text(json.dumps({
        "accuracy": (pred == labels).float().mean().item(), "macro_f1": macro_f1(labels.numpy(), pred.numpy()),
        "n_clips": len(labels), "labels": classes, "confusion_matrix": cm.tolist()}, indent=1))


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # names as on disk
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
    if skipped:
        log.warning("%d clip(s) skipped, listed in %s", len(skipped), path)


def _log_to_file(path: Path) -> logging.Handler:
    """Copy the library's log to the run directory (removed again when the run ends)."""
    root = logging.getLogger("audioclf")
    h = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")  # file names need not be UTF-8
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return h


def _deterministic_kernels(enabled: bool):
    """Switch to deterministic kernels when ``enabled``; return a callable that restores the previous
    settings, so a library caller's process is left as it was."""
    if not enabled:
        return lambda: None
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # cuBLAS sums reproducibly only with a fixed workspace; read when CUDA first runs a matmul
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic kernel (CUDA's adaptive pooling backward) warns, not stops
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def restore():
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]

    return restore


# ------------------------------------------------------------------------------------------- run directory

LOCK_FILE = ".audioclf.lock"
# what a training writes into its run directory; --overwrite removes these (and earlier evaluations and
# exports of the old model) and nothing else
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "summary.json", "test_metrics.json", "test_predictions.csv",
             "config.yaml", "labels.json", "curves.png", "skipped.csv", "train.log")
_EARLIER_RUN = ("best.pt", "last.pt", "metrics.csv", "summary.json", "test_metrics.json")  # worth keeping


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that cannot become a run directory before any work starts."""
    if out.exists() and not out.is_dir():
        raise AudioclfError(f"--out {out} is a file; name a folder for the run")
    existing = out
    while not existing.exists():  # the nearest existing folder above: where the run directory will be made
        existing = existing.parent
    if not existing.is_dir():
        raise AudioclfError(f"--out {out} lies under {existing}, which is a file; name a folder for the run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AudioclfError(f"--out {out}: {existing} is not writable; name a folder you can write to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AudioclfError(f"--out {out}: cannot create the folder ({e.strerror})") from None


@contextmanager
def _run_dir_lock(out: Path):
    """Hold an exclusive lock on ``out`` (``LOCK_FILE``, with this pid) while the block runs.

    A second training into the same folder is refused with the first one's pid. The kernel drops the
    lock when its process dies, so a killed run leaves no stale lock behind.
    """
    import fcntl

    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AudioclfError(f"--out {out}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AudioclfError(f"{out} is in use by another training (pid {pid}); wait for it to finish "
                                f"or choose another --out") from None
        try:  # the holder before us may have removed the file between our open and our lock
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiting run then locks a fresh file
        os.close(fd)


def _clear_earlier_run(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run with an earlier one in ``out``; with ``overwrite``, remove the earlier outputs."""
    if resume and overwrite:
        raise AudioclfError(f"--resume continues the run in {out} and --overwrite replaces it: give one of them")
    earlier = [name for name in _EARLIER_RUN if (out / name).exists()]
    if resume or not earlier:
        return
    if not overwrite:
        raise AudioclfError(f"{out} holds an earlier run ({', '.join(earlier)}); continue it with --resume, "
                            f"replace it with --overwrite, or choose another --out")
    from .export import CONFIG_FILE, ONNX_FILE, SAFETENSORS_FILE

    old = [out / name for name in RUN_FILES] + [out / "eval" / name for name in EVAL_FILES]
    if (out / SAFETENSORS_FILE).exists() or (out / ONNX_FILE).exists():  # an export of the old model
        old += [out / SAFETENSORS_FILE, out / ONNX_FILE, out / CONFIG_FILE]
    removed = [p for p in old if p.is_file()]
    for p in removed:
        p.unlink()
    if (out / "eval").is_dir() and not any((out / "eval").iterdir()):
        (out / "eval").rmdir()
    log.info("--overwrite: removed %d file(s) of the earlier run in %s", len(removed), out)


# settings that change where or how loudly a run goes, not what it learns
_RUN_ONLY = {("train", "quiet"), ("train", "device"), ("train", "deterministic"), ("data", "num_workers"),
             ("data", "cache_dir")}
# what --resume may change: the run-only settings, and how many epochs it lasts
_RESUMABLE = _RUN_ONLY | {("train", "epochs")}


def _config_diff(was: dict, now: dict) -> list[tuple[str, str, object, object]]:
    """(section, key, value in ``was``, value in ``now``) of each setting that differs."""
    return [(sec, key, was[sec][key], val) for sec, d in now.items() if isinstance(d, dict)
            for key, val in d.items() if was[sec][key] != val]


def _resumed_config(saved: RunConfig, requested: RunConfig, out: Path) -> RunConfig:
    """``saved`` (the config in last.pt) with the ``_RESUMABLE`` settings of ``requested``; any other
    difference is refused, since the run would no longer continue as it started. A requested value that
    training resolves (lr None, pretrained "auto") matches what the saved run resolved it to."""
    def unresolved(sec, key, val):
        return (sec, key) in {("train", "lr"), ("model", "pretrained")} and val in (None, "auto")

    def same_path(a, b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    applied, refused = {}, []
    if requested.preset != saved.preset:
        refused.append(f"preset: {saved.preset!r} there, {requested.preset!r} now")
    for sec, key, old, new in _config_diff(saved.to_dict(), requested.to_dict()):
        if unresolved(sec, key, new) or ((sec, key) == ("data", "root") and same_path(old, new)):
            continue
        if (sec, key) == ("train", "epochs") and saved.train.scheduler == "onecycle":
            refused.append(f"train.epochs: {old!r} there, {new!r} now (the onecycle schedule's length is fixed "
                           f"when a run starts)")
        elif (sec, key) in _RESUMABLE:
            applied.setdefault(sec, {})[key] = new
            log.info("resume: %s.%s=%r (was %r)", sec, key, new, old)
        else:
            refused.append(f"{sec}.{key}: {old!r} there, {new!r} now")
    if refused:
        allowed = ", ".join(key for _, key in sorted(_RESUMABLE))
        raise AudioclfError(f"--resume continues the run in {out} as it started, but {'; '.join(refused)}. Only "
                            f"{allowed} may change on resume; start a new run (another --out, or --overwrite) for the rest")
    return replace(saved, **{sec: replace(getattr(saved, sec), **kv) for sec, kv in applied.items()})


# ------------------------------------------------------------------------------------------- cross-validation

def cross_validate(config: RunConfig, out_dir, folds: Optional[list[int]] = None, n_folds: int = 5) -> dict:
    """k-fold cross-validation: each fold in turn is the test fold; the model trains on the others with
    early stopping on a group-aware validation split carved from the training folds (never the test fold).

    Datasets without folds get ``n_folds`` stratified, group-aware folds, written to ``OUT/folds.csv``.
    A fold whose ``summary.json`` exists is reused, so an interrupted CV continues where it stopped.
    Writes ``cv_summary.json``, ``cv_summary.md`` and ``confusion_matrix.png`` (summed over folds).
    """
    out = Path(out_dir)
    _check_out_dir(out)
    clipset = load_clips(config.data)
    if any(c.fold is None for c in clipset.clips):
        config = replace(config, data=replace(config.data, root=str(_write_folds(clipset, out / "folds.csv", n_folds, config.train.seed)),
                                              format="csv", esc10=False))
        clipset = load_clips(config.data)
    all_folds = sorted({c.fold for c in clipset.clips})
    folds = folds or all_folds
    bad = [k for k in folds if k not in all_folds]
    if bad or len(all_folds) < 2:
        raise AudioclfError(f"cv needs at least 2 folds and test folds among {all_folds}; got {bad or all_folds}")
    results = []
    for i, k in enumerate(folds, 1):
        run = out / f"fold{k}"
        fold_config = replace(config, data=replace(config.data, test_fold=k, val_fold=None))
        log.info("=== fold %d/%d: test fold %d ===", i, len(folds), k)
        if (run / "summary.json").is_file() and (run / "test_metrics.json").is_file():
            s = json.loads((run / "summary.json").read_text())
            _check_same_recipe(s.get("requested_config"), fold_config, run)
            log.info("fold %d already done (%s); reusing it", k, run / "summary.json")
        else:
            t0 = time.perf_counter()
            s = fit(fold_config, run, overwrite=True)  # an unfinished fold starts again, as it always has
            s["train_s"] = time.perf_counter() - t0
            s["requested_config"] = fold_config.to_dict()
            (run / "summary.json").write_text(json.dumps(s, indent=1))
        s["fold"] = k
        s["confusion_matrix"] = json.loads((run / "test_metrics.json").read_text())["confusion_matrix"]
        results.append(s)
    acc = np.array([r["test_acc"] for r in results])
    f1 = np.array([r["test_f1"] for r in results])
    std = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
    cm = np.sum([r["confusion_matrix"] for r in results], axis=0)
    summary = {
        "folds": [{k: r.get(k) for k in ("fold", "test_acc", "test_f1", "test_n", "epochs_run", "best_epoch", "train_s", "pretrained")}
                  for r in results],
        "accuracy_mean": float(acc.mean()), "accuracy_std": std(acc),
        "macro_f1_mean": float(f1.mean()), "macro_f1_std": std(f1),
        "labels": clipset.classes, "confusion_matrix": cm.tolist(),
        "recipe": f"{config.model.backbone} " + ("pretrained" if results[0].get("pretrained") else "from scratch"),
    }
    lines = ["| fold | accuracy | macro-F1 | clips | epochs | train s |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['fold']} | {r['test_acc']:.4f} | {r['test_f1']:.4f} | {r.get('test_n', '')} | {r.get('epochs_run', '')} | "
              f"{r.get('train_s', float('nan')):.0f} |" for r in results]
    lines.append(f"| mean ± std | {acc.mean():.4f} ± {std(acc):.4f} | {f1.mean():.4f} ± {std(f1):.4f} | {int(cm.sum())} | | |")
    summary["table"] = "\n".join(lines)
    (out / "cv_summary.json").write_text(json.dumps(summary, indent=1))
    (out / "cv_summary.md").write_text(summary["table"] + "\n")
    from .evaluate import plot_confusion_matrix

    plot_confusion_matrix(cm, clipset.classes, out / "confusion_matrix.png")
    log.info("cross-validation: accuracy %.4f ± %.4f, macro-F1 %.4f ± %.4f over %d folds",
             acc.mean(), std(acc), f1.mean(), std(f1), len(results))
    return summary


def _check_same_recipe(saved: Optional[dict], config: RunConfig, run: Path) -> None:
    """Refuse to reuse a finished fold that was trained with other settings than ``config``."""
    if saved is None:
        log.warning("%s predates recipe records: reusing it without checking its settings", run)
        return
    now, saved = config.to_dict(), RunConfig.from_saved(saved).to_dict()  # settings added since: as before them
    diff = [f"{sec}.{key}: {old!r} there, {new!r} now" for sec, key, old, new in _config_diff(saved, now)
            if (sec, key) not in _RUN_ONLY]
    if diff:
        raise AudioclfError(f"{run} is a finished fold of a different recipe ({'; '.join(diff[:4])}); "
                            f"use another --out, or delete {run} to retrain it")


def _write_folds(clipset, path: Path, n_folds: int, seed: int) -> Path:
    """Assign stratified, group-aware folds 1..n_folds and write them as a CSV manifest."""
    from sklearn.model_selection import StratifiedGroupKFold

    clips = clipset.clips
    groups = [c.group if c.group is not None else c.path for c in clips]
    fold = np.zeros(len(clips), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(clips)), [c.label for c in clips], groups), 1):
        fold[test] = k
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold", "group"])
        w.writerows([c.path, clipset.classes[c.label], int(k), g] for c, k, g in zip(clips, fold, groups))
    log.info("no folds in the dataset: %d stratified group folds written to %s", n_folds, path)
    return path
