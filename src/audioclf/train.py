"""Training: ``fit(config, out_dir)`` reads top to bottom, one stage per comment.

run directory (claimed, ``rundir.py``) -> resume (last.pt's config) -> set up (processes, device, seed,
train.log) -> clips -> model (its weights fetched before the feature cache is built) -> data (feature cache,
train/val/test split) -> model on the data (normalisation, device, DDP) -> optimiser, loss and schedule ->
state (fresh, or last.pt's) -> for each epoch: ``train_one_epoch`` -> ``evaluate_split`` on validation ->
metrics.csv row -> checkpoint (best.pt / last.pt, atomic) -> early-stopping check -> test fold (best.pt,
scored as ``audioclf evaluate`` scores) -> curves.png and summary.json.

``train_one_epoch`` and ``evaluate_split`` each return a plain dict of floats; together they make a
metrics.csv row. Every epoch draws its order, crops, masks and mixup from generators seeded by (seed,
epoch, rank), so a run resumed from ``last.pt`` continues exactly as if it had never stopped.
Cross-validation, which calls ``fit`` once per fold, is ``cv.py``.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .augment import SpecAugment, mix, mixup
from .backbones import BACKBONES
from .checkpoint import inference_state, load_checkpoint, save_checkpoint
from .calibrate import calibrated_metrics, fit_trust, store_trust
from .config import RunConfig, TrainConfig
from .data import ClipSet, load_clips, split_clips
from .errors import AudioclfError
from .loggers import Tracker, open_tracker
from .metrics import best_thresholds, multilabel_metrics
from .model import build_model, place_model
from .optim import make_optimizer, make_scheduler
from .rundir import RunDir, claim, resumed_config
from .runtime import amp_dtype, broadcast, deterministic_kernels, dist_info, process_group, resolve_device
from .store import FeatureBank
from .tasks import (forward_loss, mix_fraction, multilabel, n_correct, objective, split_scores, start_at_priors,
                    training_augment, with_frames)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- fit

def fit(config: RunConfig, out_dir, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a classifier as ``config`` says into the run directory ``out_dir``, locked while the run lasts;
    return a summary dict (best_val_loss, best_epoch, epochs_run, stopped_early, pretrained, lr; with a test
    fold test_acc, test_f1, test_n). An earlier run there is refused unless ``resume`` (continue it: only
    ``rundir.RESUMABLE`` settings may differ from its last.pt) or ``overwrite`` (remove its outputs first)."""
    run = RunDir(out_dir)
    with claim(run.path, resume, overwrite) if dist_info()[0] == 0 else nullcontext():  # rank 0 owns the run directory
        # --- resume: last.pt's config wins, so the run continues as it started
        ckpt = _last_checkpoint(run) if resume else None
        if ckpt is not None:
            config = resumed_config(RunConfig.from_saved(ckpt["config"]), config, run.path)
        # --- set up: processes and device, seed, train.log, kernels; all undone when the run ends
        with _session(config.train, run) as s:
            # --- clips, then the model: its weights are fetched (or refused) before the cache build, which can take minutes
            clipset = _load_clips(config, ckpt, run.path)
            model, pretrained, config = _build_model(config, len(clipset.classes))
            t = config.train
            # --- data: the feature store (each rank builds its share of the shards) -> train/val/test split
            bank = _feature_bank(clipset, config, s, run)
            splits = _split(bank, clipset, config)
            train_idx, val_idx = bank.indices(splits["train"]), bank.indices(splits["val"])
            # --- model on the data: normalisation from the training clips, device, channels-last, DDP
            ddp = _place_model(model, bank, train_idx, config, s)
            _log_recipe(config, pretrained, s)
            if s.master:
                run.write_config(config, clipset.classes)
            # --- optimiser, loss, schedule
            decay_all = ckpt is not None and len(ckpt["optimizer"]["param_groups"]) == 1  # started before groups
            opt = make_optimizer(model, t, s.device, decay_all=decay_all)
            loss_fn, sample_weights = objective(t, bank.targets[train_idx], config.data.balance, s.device)
            if multilabel(t) and ckpt is None:
                start_at_priors(model, bank.targets[train_idx])
            scheduler, per_batch = make_scheduler(opt, config, math.ceil(math.ceil(len(train_idx) / s.world) / t.batch_size))
            scaler = torch.amp.GradScaler(enabled=s.amp == torch.float16)
            specaug = SpecAugment(training_augment(config), features=config.features)
            # --- state, from scratch or from last.pt; there is always a last.pt to resume from
            progress, rows = _restore(ckpt, model, opt, scheduler, run)
            if s.master and ckpt is None:
                _save_checkpoints(run, model, config, clipset.classes, opt, scheduler, progress, improved=False)

            stopped_early = False
            for epoch in range(progress.epoch + 1, t.epochs + 1):
                t0 = time.perf_counter()
                generator = _seed_epoch(t.seed, epoch, s.rank)
                specaug.set_generator(generator)
                order = train_idx[epoch_order(len(train_idx), epoch, t.seed, s.rank, s.world, sample_weights)]
                # --- train one epoch, validate, step a per-epoch schedule
                train = train_one_epoch(ddp, bank, order, opt, loss_fn, s, config=config, epoch=epoch,
                                        n_classes=len(clipset.classes), specaug=specaug, scaler=scaler,
                                        generator=generator, scheduler=scheduler if per_batch else None)
                val = evaluate_split(ddp, bank, val_idx, s, t.batch_size * 2, multi_hot=multilabel(t))
                _check_finite(val["val_loss"], f"validation loss is {val['val_loss']} at epoch {epoch}", t.lr)
                lr = opt.param_groups[0]["lr"]
                if not per_batch:
                    scheduler.step(val["val_loss"])
                # --- log a metrics.csv row
                rows.append({"epoch": epoch, "lr": lr, **train, **val, "epoch_s": time.perf_counter() - t0})
                improved = progress.update(epoch, val["val_loss"])
                _log_epoch(rows[-1], improved, s.tracker)
                # --- checkpoint: best by validation loss, last for --resume
                if s.master:
                    run.write_metrics(rows)
                    _save_checkpoints(run, model, config, clipset.classes, opt, scheduler, progress, improved)
                # --- early stopping
                if progress.early_stop(t.patience):
                    stopped_early = True
                    break

            summary = {"best_val_loss": progress.best_val_loss, "best_epoch": progress.best_epoch,
                       "epochs_run": progress.epoch, "stopped_early": stopped_early, "pretrained": pretrained, "lr": t.lr}
            # --- best.pt: its temperature and unknown rule, or its tags' thresholds (validation clips), its test fold
            summary.update(_score_best(model, bank, train_idx, val_idx, splits["test"], run, s, config, clipset.classes))
            # --- curves and summary
            if s.master:
                run.finish(summary)
            return summary


# ------------------------------------------------------------------------------------------- the epoch

def train_one_epoch(model: nn.Module, bank: FeatureBank, order: torch.Tensor, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable, s: Session, *, config: RunConfig, epoch: int, n_classes: int,
                    specaug: SpecAugment, scaler: torch.amp.GradScaler, generator: torch.Generator,
                    scheduler=None) -> dict:
    """One pass over this rank's clips: random crop -> SpecAugment -> mixup -> forward -> backward -> clip
    -> step -> zero_grad -> per-batch schedule step, batch by batch.

    Args:
        model (nn.Module): the network (DDP-wrapped when there are several processes).
        bank (FeatureBank): the cached features; only ``bank.batch`` is read.
        order (torch.Tensor): ``(clips,)`` indices into ``bank``, in the order to train on them.
        optimizer (torch.optim.Optimizer): steps the model's parameters.
        loss_fn (callable): ``loss_fn(logits (batch, classes), soft targets (batch, classes))`` -> scalar.
        s (Session): this process's rank, device and mixed precision.
        config (RunConfig): batch size, gradient clipping, mixup and the lr (named when the loss diverges).
        epoch (int): the epoch, from 1, for the progress bar and the divergence message.
        n_classes (int): the width of mixup's soft targets.
        specaug (SpecAugment): masks and shifts, drawing from ``generator``.
        scaler (torch.amp.GradScaler): scales fp16 losses; a disabled one otherwise.
        generator (torch.Generator): draws the crops and mixup of this epoch.
        scheduler (optional): stepped after every batch. (Default: ``None``, for a per-epoch schedule)

    Returns:
        dict: ``train_loss`` (mean over this rank's clips), ``train_acc`` (:func:`tasks.n_correct` against the
        labels before mixup) and ``clips_per_s`` (all ranks together).

    Raises:
        AudioclfError: when the loss is not finite: the model diverged.
    """
    t = config.train
    t0 = time.perf_counter()
    model.train()
    specaug.train()
    loss_sum = correct = seen = 0.0
    bar = tqdm(range(0, len(order), t.batch_size), desc=f"epoch {epoch}/{t.epochs}", unit="batch", leave=False,
               disable=True if s.quiet else None)
    for i in bar:
        x, y = bank.batch(order[i:i + t.batch_size], random_crop=True, generator=generator, multi_hot=multilabel(t))
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        # clips summed, labels united: polyphony from single-label clips (multilabel only: 0 for multiclass)
        x, y, frames = mix(x, y, mix_fraction(config), config.augment.mix_db, config.features, generator,
                           config.augment.mix_clips, frame_targets=t.frame_loss > 0)
        x, target = mixup(specaug(x), with_frames(y, frames), n_classes, config.augment.mixup_alpha, generator)
        with s.autocast():
            logits, loss = forward_loss(model, x, target, loss_fn, steps=frames is not None)
        scaler.scale(loss).backward()
        if t.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        loss_value = loss.item()
        _check_finite(loss_value, f"training loss is {loss_value} at epoch {epoch}, batch {i // t.batch_size + 1}", t.lr)
        loss_sum += loss_value * len(y)
        correct += n_correct(logits, y)
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    bar.close()
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "clips_per_s": seen * s.world / (time.perf_counter() - t0)}


def evaluate_split(model: nn.Module, bank: FeatureBank, idx: torch.Tensor, s: Session, batch_size: int,
                   name: str = "val", multi_hot: bool = False) -> dict:
    """Loss, accuracy, macro-F1 and mAP (:func:`audioclf.tasks.split_scores`) of ``model`` on clips ``idx``,
    against their labels or (``multi_hot``) their multi-hot targets.

    The clips are sharded across ranks and the predictions gathered, so every rank returns the same
    ``{name}_loss``, ``{name}_acc``, ``{name}_f1`` and ``{name}_map`` (plain floats).
    """
    logits, labels = predict_bank(model, bank, idx[s.rank::s.world], s, batch_size, multi_hot)
    if s.world > 1:
        gathered = [None] * s.world
        dist.all_gather_object(gathered, (logits, labels))
        logits, labels = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    return split_scores(logits, labels, name)


@torch.no_grad()
def predict_bank(model: nn.Module, bank: FeatureBank, idx: torch.Tensor, s: Session, batch_size: int,
                 multi_hot: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (clips, classes), labels (clips,) or multi-hot targets (clips, classes))`` of clips ``idx``
    of ``bank``, centre-cropped, eval mode, on CPU."""
    model.eval()
    logits, labels = [], []
    for i in range(0, len(idx), batch_size):
        x, y = bank.batch(idx[i:i + batch_size], multi_hot=multi_hot)
        with s.autocast():
            logits.append(model(x.to(s.device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def _check_finite(value: float, what: str, lr: float) -> None:
    if not math.isfinite(value):
        raise AudioclfError(f"{what}: the model diverged. Lower the learning rate (lr={lr:.3g}), set train.grad_clip, "
                            f"or check the data for NaN/Inf")


# ------------------------------------------------------------------------------------------- sampling

def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's training indices for ``epoch``: a seeded permutation (or weighted draw when
    balancing by sampling), padded to a multiple of ``world`` and strided like DistributedSampler."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.multinomial(weights, n, replacement=True, generator=g) if weights is not None else torch.randperm(n, generator=g)
    pad = (-n) % world
    order = torch.cat([order, order[:pad]])
    return order[rank::world]


def _seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seed every random draw of ``epoch`` from (seed, epoch, rank), so it is resumable and deterministic;
    return the generator of the crops, masks and mixup."""
    torch.manual_seed(seed * 1000 + epoch * 7919 + rank)
    return torch.Generator().manual_seed(seed * 100003 + epoch * 7919 + rank + 1)


# ------------------------------------------------------------------------------------------- the stages of fit

@dataclass
class Session:
    """This process's part in a run: its rank among ``world`` processes, its device and mixed precision."""
    rank: int
    world: int
    device: torch.device
    amp: Optional[torch.dtype]  # None: full precision
    quiet: bool  # no progress bars
    tracker: Tracker = field(default_factory=Tracker)  # TensorBoard, MLflow: rank 0's; the others' log nowhere

    @property
    def master(self) -> bool:
        """Rank 0 writes the run directory."""
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)


@dataclass
class Progress:
    """Where a run stands after ``epoch`` epochs; saved in last.pt, so --resume continues from it."""
    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best

    def update(self, epoch: int, val_loss: float) -> bool:
        """Count ``epoch`` in; True when its validation loss is the best so far."""
        self.epoch = epoch
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def early_stop(self, patience: int) -> bool:
        """Whether ``patience`` epochs (0: never) have passed without a better validation loss; says so."""
        if not patience or self.bad_epochs < patience:
            return False
        log.info("early stop: validation loss has not improved for %d epochs (best %.4f at epoch %d)",
                 self.bad_epochs, self.best_val_loss, self.best_epoch)
        return True


def _last_checkpoint(run: RunDir) -> dict:
    if not run.last.is_file():
        raise AudioclfError(f"--resume: {run.last} does not exist; start a new run without --resume")
    return load_checkpoint(run.last)


@contextmanager
def _session(t: TrainConfig, run: RunDir) -> Iterator[Session]:
    """Join the other processes, pick the device, seed, copy the log to train.log and switch kernels as
    ``t`` says; leave the process as it was when the run ends, however it ends."""
    rank, _, world = dist_info()
    with process_group(resolve_device(t.device)) as device, deterministic_kernels(t.deterministic):
        torch.manual_seed(t.seed)
        s = Session(rank, world, device, amp_dtype(device) if t.amp else None, t.quiet or rank != 0)
        if s.master:
            s.tracker = open_tracker(t.logger, run.path)
        finished = False
        with run.logging_to_file() if s.master else nullcontext():
            try:
                yield s
                finished = True
            except KeyboardInterrupt:
                log.warning("interrupted: %s holds the last completed epoch; continue with --resume", run.last)
                raise
            finally:
                s.tracker.close(failed=not finished)


def _load_clips(config: RunConfig, ckpt: Optional[dict], out: Path) -> ClipSet:
    """The dataset's clips and classes; a resumed run needs the classes it was trained on."""
    clipset = load_clips(config.data)
    if multilabel(config.train) and not clipset.multilabel:
        log.info("%s has one class per clip: each trains as that one tag (with the mix augmentation, clips summed "
                 "hold two); its layout (%s) cannot give a clip several classes, a CSV manifest's labels column can",
                 config.data.root, config.data.format)
    if ckpt is not None and clipset.classes != list(ckpt["labels"]):
        raise AudioclfError(f"--resume: {config.data.root} now has the classes {', '.join(clipset.classes)}; the run in "
                            f"{out} was trained on {', '.join(ckpt['labels'])}. Resume needs the same classes: start "
                            f"a new run (another --out, or --overwrite) to train on these")
    return clipset


def _build_model(config: RunConfig, n_classes: int) -> tuple[nn.Module, bool, RunConfig]:
    """(model, pretrained, config with the recipe as this run resolves it: its lr and pretrained weights)."""
    torch.manual_seed(config.train.seed)  # init from the seed alone, whatever ran before in this process
    model, pretrained = build_model(config.model, n_classes, config.features.n_mels)
    b = BACKBONES[config.model.backbone]
    t = config.train if config.train.lr is not None else replace(config.train, lr=b.default_lr(pretrained))
    m = replace(config.model, pretrained=b.pretrained_on if pretrained else "none")
    return model, pretrained, replace(config, train=t, model=m)


def _feature_bank(clipset: ClipSet, config: RunConfig, s: Session, run: RunDir) -> FeatureBank:
    """The clips' feature store: under DDP each rank builds its share of the shards, then every rank opens
    the whole store; rank 0 lists the clips it could not read in skipped.csv."""
    bank = FeatureBank.build(clipset, config.features, cache_dir=config.data.cache_dir, device=s.device,
                             num_workers=config.data.num_workers, strict=config.data.strict, quiet=s.quiet,
                             distributed=s.world > 1)
    if s.master:
        run.write_skipped(bank.skipped)
    if s.device.type == "cuda":
        bank.to_device(s.device, max_bytes=4 * 2**30)  # a small store whole on the GPU: batches never cross PCIe
    return bank


def _split(bank: FeatureBank, clipset: ClipSet, config: RunConfig) -> dict:
    """``{"train", "val", "test"}`` clips of the bank (``data.split_clips``); every class needs training clips."""
    splits = split_clips(bank.clips, val_fold=config.data.val_fold, test_fold=config.data.test_fold,
                         val_split=config.data.val_split, seed=config.train.seed, classes=clipset.classes)
    for name, clips in splits.items():
        if clips:
            log.info("%-5s: %s", name, clipset.describe(clips))
    missing = set(clipset.classes) - {clipset.classes[k] for c in splits["train"] for k in c.targets}
    if missing:
        raise AudioclfError(f"class(es) {', '.join(sorted(missing))} have no training clips after the split; "
                            f"change val_fold/test_fold/val_split or add clips")
    return splits


def _place_model(model: nn.Module, bank: FeatureBank, train_idx: torch.Tensor, config: RunConfig, s: Session) -> nn.Module:
    """The model fitted on the training clips only (:func:`audioclf.model.place_model`) and on the device;
    DDP-wrapped when there are several processes (the bare model otherwise)."""
    place_model(model, config.model, (bank.clip_frames(i) for i in train_idx.tolist()), s.device)
    if s.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[s.device.index] if s.device.type == "cuda" else None)


def _log_recipe(config: RunConfig, pretrained: bool, s: Session) -> None:
    t = config.train
    log.info("recipe: %s %s, lr %.2g, %s schedule, %d epochs max, patience %d, batch %d, device %s%s%s",
             config.model.backbone, f"pretrained on {config.model.pretrained}" if pretrained else "from scratch", t.lr,
             t.scheduler, t.epochs, t.patience, t.batch_size, s.device, f" x{s.world} processes" if s.world > 1 else "",
             f", mixed precision {str(s.amp).removeprefix('torch.')}" if s.amp else "")
    s.tracker.start(config.to_dict())  # --logger tensorboard | mlflow: the recipe as it runs


def _restore(ckpt: Optional[dict], model: nn.Module, opt, scheduler, run: RunDir) -> tuple[Progress, list[dict]]:
    """(progress, metrics.csv rows so far): fresh, or from ``ckpt`` (last.pt), whose state is loaded
    into the model, optimiser and schedule."""
    if ckpt is None:
        return Progress(), []
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    progress = Progress(**{f.name: ckpt[f.name] for f in fields(Progress)})
    rows = [r for r in run.read_metrics() if r["epoch"] <= progress.epoch]
    log.info("resumed from %s at epoch %d", run.last, progress.epoch)
    return progress, rows


def _log_epoch(row: dict, improved: bool, tracker: Tracker) -> None:
    tracker.log(row)
    log.info("epoch %3d  lr %.2e  train loss %.4f acc %.3f  val loss %.4f acc %.3f f1 %.3f mAP %.3f  %5.1fs %6.1f "
             "clips/s%s", row["epoch"], row["lr"], row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
             row["val_f1"], row["val_map"], row["epoch_s"], row["clips_per_s"], "  *" if improved else "")


def _save_checkpoints(run: RunDir, model: nn.Module, config: RunConfig, classes: list[str], opt, scheduler,
                      progress: Progress, improved: bool) -> None:
    """last.pt (everything --resume needs) and, when ``improved``, best.pt (what inference needs)."""
    state = inference_state(model, config, classes, {"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                                                     **asdict(progress)})
    if improved:
        save_checkpoint({k: state[k] for k in ("config", "labels", "model", "epoch", "best_val_loss")}, run.best)
    save_checkpoint(state, run.last)


def _load_best(model: nn.Module, run: RunDir, s: Session) -> dict:
    """best.pt, read by rank 0 and sent to the others, its weights loaded into ``model``."""
    best = load_checkpoint(run.best) if s.master or s.world == 1 else None
    best = broadcast(best, s.device)
    model.load_state_dict(best["model"])
    return best


def _score_best(model: nn.Module, bank: FeatureBank, train_idx: torch.Tensor, val_idx: torch.Tensor, test: list,
                run: RunDir, s: Session, config: RunConfig, classes: list[str]) -> dict:
    """The last stages, on best.pt: a multilabel model's thresholds, or a multiclass model's temperature and
    unknown rule (:mod:`audioclf.calibrate`; rank 0 stores them), then the test fold's scores (if any)."""
    if multilabel(config.train):
        _choose_thresholds(model, bank, val_idx, run, s, config)
    elif s.master:
        model.load_state_dict(load_checkpoint(run.best)["model"])
        store_trust(run.best, fit_trust(model, bank, train_idx, val_idx, config, len(classes), s.device))
    return _test_fold(model, bank, test, run, s, config, classes) if test else {}


def _choose_thresholds(model: nn.Module, bank: FeatureBank, val_idx: torch.Tensor, run: RunDir, s: Session,
                       config: RunConfig) -> None:
    """Each class's decision threshold, the one that maximises its F1 on the validation clips
    (:func:`audioclf.metrics.best_thresholds`) with best.pt's weights; rank 0 adds them to best.pt as
    ``thresholds`` (a list of floats, in labels order), for predict, serve and export."""
    best = _load_best(model, run, s)
    logits, targets = predict_bank(model, bank, val_idx, s, config.train.batch_size * 2, multi_hot=True)
    thresholds = best_thresholds(targets.numpy(), torch.sigmoid(logits).numpy())
    if s.master:
        save_checkpoint({**best, "thresholds": [float(x) for x in thresholds]}, run.best)
    log.info("decision thresholds chosen on %d validation clips: median %.2f (%.2f-%.2f)", len(val_idx),
             float(np.median(thresholds)), float(thresholds.min()), float(thresholds.max()))


def _test_fold(model: nn.Module, bank: FeatureBank, clips: list, run: RunDir, s: Session, config: RunConfig,
               classes: list[str]) -> dict:
    """Score best.pt on the test fold's clips as ``audioclf evaluate`` does (:func:`classification_metrics`,
    or :func:`multilabel_metrics` at best.pt's thresholds); rank 0 writes test_metrics.json and
    test_predictions.csv. Returns ``test_acc``, ``test_f1`` (macro), ``test_n``, and for multilabel ``test_map``
    and ``test_micro_f1``."""
    best = _load_best(model, run, s)
    idx = bank.indices(clips)
    if multilabel(config.train):
        return _test_fold_multilabel(model, bank, idx, run, s, config, classes, best.get("thresholds"))
    logits, labels = predict_bank(model, bank, idx, s, config.train.batch_size * 2)
    metrics, probs = calibrated_metrics(logits, labels.numpy(), classes, best.get("temperature", 1.0))
    if s.master:
        pred = probs.argmax(1)
        run.write_test(metrics, [(bank.clips[i].path, classes[y], classes[k], p[k])
                                 for i, y, k, p in zip(idx.tolist(), labels.tolist(), pred.tolist(), probs)])
    log.info("test fold %s: accuracy %.4f, macro-F1 %.4f, ECE %.4f (%.4f before temperature scaling; %.4f for a "
             "perfectly calibrated model) (%d clips)", config.data.test_fold, metrics["accuracy"], metrics["macro_f1"],
             metrics["ece"], metrics["ece_uncalibrated"], metrics["ece_floor"], metrics["n_clips"])
    return {"test_acc": metrics["accuracy"], "test_f1": metrics["macro_f1"], "test_n": metrics["n_clips"],
            "test_ece": metrics["ece"]}


def _test_fold_multilabel(model: nn.Module, bank: FeatureBank, idx: torch.Tensor, run: RunDir, s: Session,
                          config: RunConfig, classes: list[str], thresholds: Optional[list[float]]) -> dict:
    logits, targets = predict_bank(model, bank, idx, s, config.train.batch_size * 2, multi_hot=True)
    probs = torch.sigmoid(logits).numpy()
    metrics = multilabel_metrics(targets.numpy(), probs, classes, thresholds)
    if s.master:
        run.write_test_tags(metrics, [bank.clips[i].path for i in idx.tolist()], targets.numpy(), probs, classes,
                            thresholds)
    log.info("test fold %s: mAP %.4f, micro-F1 %.4f, macro-F1 %.4f (%d clips)", config.data.test_fold, metrics["mAP"],
             metrics["micro_f1"], metrics["macro_f1"], metrics["n_clips"])
    return {"test_acc": metrics["subset_accuracy"], "test_f1": metrics["macro_f1"], "test_map": metrics["mAP"],
            "test_micro_f1": metrics["micro_f1"], "test_n": metrics["n_clips"]}
