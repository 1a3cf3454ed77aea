"""Configuration: one dataclass per stage, nested in :class:`RunConfig`.

The resolved ``RunConfig`` is written to the run directory before training starts and stored in every
checkpoint. At inference time the saved :class:`FeatureConfig` is the only source of feature settings,
so training and prediction can never disagree about how audio becomes a spectrogram.

Each setting is declared once, as a dataclass field made by :func:`~audioclf.settings.setting`: its default,
help text, command-line flag and allowed values. The checks and the CLI's flags (``cli.py``) are generated
from those declarations; only the rules that relate two settings are written out by hand here.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ._version import __version__
from .backbones import BACKBONE_NAMES, BACKBONES, DEFAULT_BACKBONE
from .errors import AudioclfError
from .fileio import read_yaml
from .settings import (DEVICES, _check_choice, _check_range, _check_settings, check_device, name_sections,  # noqa: F401
                       setting, settings)  # settings: read from here too

log = logging.getLogger(__name__)


# why the front-end constants of a backbone have no flags
_FRONT_END = ("one of a pretrained backbone's front-end constants (backbones.py): set it in YAML to train from "
              "scratch on another front end")


@dataclass
class FeatureConfig:
    """How audio becomes model input. Saved with every model; inference reads only this copy."""

    sample_rate: int = setting(22050, help="Hz: every clip is resampled to this", low=1000, high=384000)
    duration_s: float = setting(5.0, flag="--duration", help="seconds of audio per example (crop or zero-pad)",
                                low=0.0, high=3600.0, low_open=True)
    n_mels: int = setting(80, help="mel bands", low=8, high=512)
    n_fft: int = setting(1024, help="samples per FFT", low=16, high=65536)
    hop_length: int = setting(256, help="samples between frames, at most n_fft", low=1)
    win_length: int = setting(1024, help="samples in the Hann window, at most n_fft", low=1)
    f_min: float = setting(0.0, help="Hz: lowest mel filter edge", low=0.0)
    f_max: Optional[float] = setting(None, help="Hz: highest mel filter edge (default: sample_rate / 2)")
    # recordings made at different levels (FSDD's speakers are 20 dB apart) then look alike to the model
    peak_normalize: bool = setting(True, help="scale each clip (each window, at inference) to a peak of 1 "
                                              "before the STFT")
    # The settings below exist so that a pretrained backbone's own front end is one FeatureConfig
    # (backbones.py); their defaults are the original tutorial's librosa features.
    window: Literal["periodic", "symmetric"] = setting("periodic", yaml_only=_FRONT_END, help="Hann window kind")
    preemphasis: float = setting(0.0, yaml_only=_FRONT_END, low=0.0, high=0.999,
                                 help="y[t] = x[t] - preemphasis * x[t-1] before the STFT; 0 = off")
    mel_scale: Literal["slaney", "kaldi"] = setting("slaney", yaml_only=_FRONT_END,
                                                    help="librosa's area-normalised mel filters, or Kaldi's")
    compression: Literal["log1p", "log"] = setting("log1p", yaml_only=_FRONT_END,
                                                   help="log1p(mel power), or log(mel power + 1e-5)")
    offset: float = setting(0.0, yaml_only=_FRONT_END, low=-1e6, high=1e6,
                            help="features are (compressed + offset) / scale: a fixed normalisation")
    scale: float = setting(1.0, yaml_only=_FRONT_END, low=0.0, high=1e6, low_open=True,
                           help="see offset")

    def __post_init__(self):
        _check_settings(self)
        _check_range("hop_length", self.hop_length, high=self.n_fft)
        _check_range("win_length", self.win_length, high=self.n_fft)
        _check_range("f_min", self.f_min, high=self.sample_rate / 2)
        _check_range("f_max", self.f_max, self.f_min, self.sample_rate / 2, low_open=True)
        self.window_samples(self.duration_s, "duration_s")

    def window_samples(self, seconds: float, name: str = "window_s") -> int:
        """Samples in a window of ``seconds``; refuses a window too short for one centred STFT frame
        (reflect padding needs more than ``n_fft // 2`` samples). Training checks ``duration_s`` with this
        rule, inference its window, so a model is never trained on a length it cannot predict."""
        n = int(round(seconds * self.sample_rate))
        if n <= self.n_fft // 2:
            raise AudioclfError(f"{name}={seconds!r} is too short: {n} samples at {self.sample_rate} Hz, and the STFT "
                                f"needs more than n_fft/2={self.n_fft // 2} samples ({self.n_fft / 2 / self.sample_rate:.3f} s)")
        return n

    @property
    def n_samples(self) -> int:
        """Samples in one example."""
        return int(round(self.duration_s * self.sample_rate))

    @property
    def n_frames(self) -> int:
        """Spectrogram frames in one example (centred STFT)."""
        return 1 + self.n_samples // self.hop_length


# augment.mix when unset, by train.task: a multiclass target cannot hold the two classes of a mix
MIX_DEFAULT = {"multiclass": 0.0, "multilabel": 0.5}
# What a task changes, for every backbone: over the backbone's recipe, under a preset, YAML and flags. A tagger
# learns "which sounds, and when" with attention over time, frame targets and mixes of up to 3 clips, and
# its mixtures keep improving long after 15 epochs (docs/multilabel.md#benchmark-polyphonic-esc-50).
TASK_RECIPES = {"multilabel": {"model": {"pooling": "attention"}, "augment": {"mix_clips": 3},
                               "train": {"frame_loss": 1.0, "epochs": 60}}}


def _recipe_text(task: str) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {format(v, 'g') if isinstance(v, float) else v}"
                     for section in TASK_RECIPES[task].values() for k, v in section.items())


@dataclass
class AugmentConfig:
    """Training-only augmentation. SpecAugment widths are upper bounds: each mask draws its width."""

    freq_mask_width: int = setting(15, flag="--freq-mask", help="widest frequency mask, in mel bands", low=0,
                                   high=10000)
    time_mask_width: int = setting(25, flag="--time-mask", help="widest time mask, in frames", low=0, high=10000)
    n_freq_masks: int = setting(2, help="frequency masks per example", low=0, high=10000)
    n_time_masks: int = setting(2, help="time masks per example", low=0, high=10000)
    # SpecAugment's p: 25 frames would blank a spoken digit in a 1-s clip, while 5-s clips (431 frames)
    # are unaffected
    time_mask_fraction: float = setting(0.1, help="a time mask covers at most this fraction of the frames",
                                        low=0.0, high=1.0)
    time_shift: float = setting(0.5, low=0.0, high=1.0,
                                help="roll each example in time by up to this fraction of its frames (0 = off)")
    time_stretch: float = setting(0.0, low=0.0, high=1.0, help="stretch each example in time by a factor up to "
                                                               "1 + this, or its inverse (0 = off)")
    freq_shift: int = setting(0, low=0, high=64, help="shift each example by up to this many mel bands, about 4 % "
                                                      "in pitch per band (0 = off)")
    mixup_alpha: float = setting(0.0, flag="--mixup", help="mixup with Beta(alpha, alpha) weights (0 = off)",
                                 low=0.0, high=100.0)
    gain_db: float = setting(0.0, help="random gain in [-gain_db, +gain_db] dB, applied to the features (0 = off)",
                             low=0.0, high=60.0)
    mix: Optional[float] = setting(None, low=0.0, high=1.0, help="fraction of training examples summed with another "
                                   "clip, labels united (default: " + ", ".join(f"{v:g} {k}" for k, v in MIX_DEFAULT.items()) + ")")
    mix_db: float = setting(6.0, low=0.0, high=60.0, help="a mixed-in clip's level: random in [-mix_db, +mix_db] dB "
                                                        "relative to the clip it joins")
    mix_clips: int = setting(2, low=2, high=8, help="most clips in one mixed example: it takes 1 to mix_clips - 1 "
                                                  "partners")

    def __post_init__(self):
        _check_settings(self)


@dataclass
class ModelConfig:
    # the dataclass default is the original tutorial's network; the "default" preset, what the CLI runs, picks
    # backbones.DEFAULT_BACKBONE
    backbone: str = setting("resnet18", choices=BACKBONE_NAMES, help="network, with its own front end and "
                            "fine-tuning recipe (list them: audioclf backbones)")
    # after training it records what was used ("imagenet", "audioset" or "none")
    pretrained: Literal["auto", "imagenet", "audioset", "none"] = setting(
        "auto", help="auto: the backbone's pretrained weights when they can be had (--weights, torch hub cache "
                     "or download), else from scratch; none: from scratch")
    weights_path: Optional[str] = setting(None, flag="--weights", help="local copy of the backbone's official "
                                          "weights (e.g. mn04_as_mAP_432.pt); implies its pretrained weights")
    dropout: float = setting(0.2, help="dropout before the final linear layer", low=0.0, high=0.99)
    normalization: Literal["band", "global"] = setting(
        "band", help="ResNet-18's input standardisation from the train split: per mel band, or one mean and std")
    pooling: Literal["mean", "attention"] = setting(
        "mean", help="how the clip's score comes from its time steps: mean (average the trunk's map over time, "
                     "then classify) or attention (classify each time step, then weigh the steps per class: a "
                     "short sound among others keeps its score, and detect's frame tracks are what was trained)")

    def __post_init__(self):
        _check_settings(self)
        kind = BACKBONES[self.backbone].pretrained_on
        if self.pretrained not in ("auto", "none", kind):
            raise AudioclfError(f"pretrained={self.pretrained!r} does not exist for backbone={self.backbone!r}; "
                                f"choose auto, none or {kind}")


@dataclass
class DataConfig:
    root: str = setting("", yaml_only="the DATA argument of train and cv sets it",
                        help="folder, CSV manifest, or dataset root")
    format: Literal["folder", "csv", "esc50", "urbansound8k", "webdataset"] = setting(
        "folder", help="dataset layout (the CLI's default: csv when DATA is a .csv file, webdataset when it is a "
                       ".tar or a pattern of them, else folder)")
    esc10: bool = setting(False, help="ESC-50 only: keep the ESC-10 subset")
    val_fold: Optional[int] = setting(None, help="hold out this fold for validation")
    test_fold: Optional[int] = setting(None, help="hold out this fold for the final test (never seen in training)")
    val_split: float = setting(0.2, help="validation fraction when no val_fold is given (group-aware)",
                               low=0.0, high=0.9, low_open=True)
    cache_dir: Optional[str] = setting(None, help="feature cache folder (default: $AUDIOCLF_CACHE or "
                                                  "~/.cache/audioclf)")
    strict: bool = setting(False, help="stop at the first unreadable clip instead of skipping it")
    balance: Literal["none", "weights", "sampler"] = setting("none", help="class-imbalance handling")
    num_workers: Optional[int] = setting(None, help="decoding processes for the feature cache (default: auto)")

    def __post_init__(self):
        _check_settings(self)
        if self.val_fold is not None and self.val_fold == self.test_fold:
            raise AudioclfError(f"val_fold and test_fold are both {self.val_fold}: they must differ")


@dataclass
class TrainConfig:
    # multilabel: one sigmoid per class (tags; several or none per clip); multiclass: one softmax, one class
    task: Literal["multiclass", "multilabel"] = setting("multiclass", help="multiclass (one class per clip, "
                                                        "softmax) or multilabel (any number of tags, sigmoids; "
                                                        f"its defaults: {_recipe_text('multilabel')})")
    epochs: int = setting(30, help="training epochs", low=1, high=100000)
    batch_size: int = setting(16, help="examples per optimiser step", low=1, high=65536)
    lr: Optional[float] = setting(None, low=0.0, high=10.0, low_open=True, help="peak learning rate (default: "
                                  "the backbone's; ResNet-18: 1e-4 with ImageNet weights, 1e-3 from scratch)")
    weight_decay: float = setting(1e-3, help="AdamW weight decay", low=0.0, high=10.0)
    patience: int = setting(15, help="epochs without a better validation loss before stopping (0 = never stop "
                                     "early)", low=0, high=100000)
    scheduler: Literal["plateau", "cosine", "onecycle"] = setting("cosine", help="learning-rate schedule")
    warmup_epochs: int = setting(2, help="epochs of linear warmup before the cosine schedule", low=0, high=100000)
    label_smoothing: float = setting(0.1, help="label smoothing of the cross-entropy", low=0.0, high=0.99)
    # sound event detection from clips labelled as a whole (tasks.py): the frame targets are made, not given
    frame_loss: float = setting(0.0, low=0.0, high=100.0, help="weight of a loss on each time step's outputs "
                                "(multilabel, --pooling attention): a clip's label holds over its active part, "
                                "the mix places each clip at a random time, so detect learns onsets and "
                                "offsets from clips labelled as a whole (0 = off)")
    grad_clip: float = setting(0.0, help="largest gradient norm (0 = off)", low=0.0, high=1e6)
    # numpy's and scikit-learn's seeds are 32-bit
    seed: int = setting(42, help="seed of every random draw: splits, initialisation, augmentation", low=0,
                        high=2**32 - 1)
    device: str = setting("auto", help=DEVICES)
    amp: bool = setting(True, help="mixed precision: bf16/fp16 on CUDA, bf16 on CPUs that compute it natively")
    quiet: bool = setting(False, help="no progress bars")
    logger: Literal["csv", "tensorboard", "mlflow"] = setting(
        "csv", help="where the metrics go besides RUN_DIR/metrics.csv: csv (nowhere else), tensorboard "
                    "(RUN_DIR/tensorboard) or mlflow (RUN_DIR/mlruns, or MLFLOW_TRACKING_URI)")
    # after training, on the best model's validation clips (trust.py): the share of known clips the
    # "unknown" rule keeps, and its score: the default is the one the open-set benchmark chose on its training
    # folds (docs/trust.md). A saved model keeps the rule it was fitted with, whatever the default.
    keep_known: float = setting(0.95, low=0.0, high=1.0, low_open=True, help="share of known validation clips "
                                "the unknown rule keeps; below its threshold an input is answered 'unknown'")
    reject_score: Literal["msp", "energy", "embedding", "knn", "mahalanobis", "energy+mahalanobis"] = setting(
        "energy+mahalanobis", help="score of the unknown rule: maximum calibrated probability (msp), energy, "
                                   "cosine similarity to the nearest class mean (embedding) or to the nearest "
                                   "training clip (knn), Mahalanobis distance to the nearest class mean under the "
                                   "training clips' covariance (mahalanobis), or energy+mahalanobis: their sum, "
                                   "each standardised on the validation clips")
    # the same seed gives the same model on CUDA too, at some speed; CPU runs are reproducible without it
    deterministic: bool = setting(False, help="deterministic kernels (torch.use_deterministic_algorithms, cuDNN "
                                              "without autotuning)")

    def __post_init__(self):
        _check_settings(self)
        check_device(self.device)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "default"

    def __post_init__(self):
        # a section built, then changed, must still hold allowed values (never NaN or infinite)
        for name in SECTIONS:
            _check_settings(getattr(self, name))
        if self.augment.mix and self.train.task != "multilabel":  # a multiclass target holds one class
            raise AudioclfError(f"augment.mix={self.augment.mix!r} sums two clips, labels united: use --task multilabel")
        if self.train.frame_loss and (self.train.task != "multilabel" or self.model.pooling != "attention"):
            raise AudioclfError(f"train.frame_loss={self.train.frame_loss!r} trains the outputs of each time step "
                                "against the clips' active parts: use --task multilabel --pooling attention")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return from_dict(cls, d)

    @classmethod
    def from_saved(cls, d: dict) -> "RunConfig":
        """A config stored with a model or run: a setting that an older audioclf did not write yet takes
        the value that version behaved with (not today's default), so old models predict as trained. A
        setting since removed is dropped where it was off, and refused where it was on."""
        d = {**d, **{sec: {**before, **d.get(sec, {})} for sec, before in _BEFORE_THE_SETTING.items()}}
        d["model"] = {k: v for k, v in d["model"].items() if k != "arch"}  # always "resnet18", now `backbone`
        d["preset"] = PRESET_ALIASES.get(d.get("preset"), d.get("preset", "default"))
        return from_dict(cls, _without_removed_settings(d))

    def save_yaml(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# The config sections, by their name in RunConfig and in a YAML file
SECTIONS: dict[str, type] = {name: tp for name, tp in typing.get_type_hints(RunConfig).items() if name != "preset"}
name_sections(SECTIONS)
_SECTION_NAMES = tuple(SECTIONS)

# How audioclf behaved before each of these settings existed (see RunConfig.from_saved)
_BEFORE_THE_SETTING = {
    "features": {"peak_normalize": False},
    "augment": {"time_mask_fraction": 1.0, "time_shift": 0.0, "time_stretch": 0.0, "freq_shift": 0},
    "train": {"frame_loss": 0.0},
    "model": {"backbone": "resnet18", "pooling": "mean"},
}

# Settings (and values) that were measured, did not help and were removed, with the value that meant "off":
# a saved config holding that value loads without the setting; any other value would be ignored by this
# code, so the model would predict with other features or another network than it was trained with.
_REMOVED = {
    ("features", "mel_gain"): 1.0,  # features were log1p(mel_gain * mel power)
    ("model", "stem_pool"): True,  # False dropped ResNet's max-pool after the stem
}
_REMOVED_VALUES = {("model", "normalization"): ("clip",)}  # each clip's own mean per band over time


def _without_removed_settings(d: dict) -> dict:
    """``d`` (a saved config) without the removed settings left at their "off" value; refused if one was on."""
    out = dict(d)
    for (sec, key), off in _REMOVED.items():
        values = out.get(sec)
        if isinstance(values, dict) and key in values:  # a section of the wrong type is from_dict's to report
            if values[key] != off:
                _refuse_removed(f"{sec}.{key}={values[key]!r}", f"{key}={off!r}")
            out[sec] = {k: v for k, v in values.items() if k != key}
    for (sec, key), gone in _REMOVED_VALUES.items():
        values = out.get(sec)
        if isinstance(values, dict) and values.get(key) in gone:
            _refuse_removed(f"{sec}.{key}={values[key]!r}", f"another {key}")
    return out


def _refuse_removed(what: str, instead: str) -> None:
    raise AudioclfError(f"the model was trained with {what}, a setting this audioclf ({__version__}) removed (it "
                        f"was measured and did not help), so it cannot be rebuilt as trained; load it with the "
                        f"audioclf version that trained it, or retrain it with {instead}")


# Named recipes: overrides applied on top of the defaults, before a YAML file and flags.
PRESETS: dict[str, dict] = {
    "default": {"model": {"backbone": DEFAULT_BACKBONE}},
    # The original tutorial's notebook: plateau schedule, lr 1e-4, batch 16, 25 epochs, patience 5, one mask of
    # each kind.
    "tutorial": {
        "features": {"peak_normalize": False},
        "train": {"lr": 1e-4, "batch_size": 16, "epochs": 25, "patience": 5, "scheduler": "plateau",
                  "warmup_epochs": 0, "label_smoothing": 0.0},
        "augment": {"freq_mask_width": 15, "time_mask_width": 25, "n_freq_masks": 1, "n_time_masks": 1,
                    "time_mask_fraction": 1.0, "time_shift": 0.0, "time_stretch": 0.0, "freq_shift": 0,
                    "mixup_alpha": 0.0, "gain_db": 0.0},
        "model": {"backbone": "resnet18", "dropout": 0.0},
    },
}
# Old names of presets, still accepted with a warning
PRESET_ALIASES = {"seed": "tutorial"}


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def from_dict(cls, d: dict, _where: str = ""):
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(d, dict):
        raise AudioclfError(f"config section {_where or cls.__name__!r} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise AudioclfError(f"unknown config key(s) {', '.join(_where + k for k in unknown)}; "
                            f"allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in d.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{_where}{key}.")
            continue
        if not _type_ok(value, tp):
            raise AudioclfError(f"config key {_where}{key}={value!r} has the wrong type: expected {tp}")
        kwargs[key] = float(value) if tp is float and isinstance(value, int) else value
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    """Recursive dict update; ``override`` wins."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path) -> dict:
    path = Path(path)
    d = read_yaml(path)
    if d is not None and not isinstance(d, dict):
        raise AudioclfError(f"config file {path} must hold a mapping of sections (data:, train:, ...), "
                            f"not a {type(d).__name__}")
    d = d or {}
    # checked here, not in from_dict: merging the flags' sections over a list would silently replace it
    for key, value in list(d.items()):
        if key in _SECTION_NAMES and value is None:
            del d[key]  # "train:" with nothing under it
        elif key in _SECTION_NAMES and not isinstance(value, dict):
            raise AudioclfError(f"config file {path}: section {key}: must be a mapping of settings "
                                f"(key: value lines), not {value!r}")
    return d


def resolve(preset: Optional[str] = "default", yaml_path=None, overrides: Optional[dict] = None,
            base: Optional[dict] = None) -> RunConfig:
    """Defaults < the backbone's front end and recipe < preset < YAML file < explicit overrides (flags).

    A ``base`` (the saved config of a run, for --resume) replaces the first three; ``preset=None`` then
    keeps the base's preset. A pretrained backbone's front end is not negotiable: a preset, YAML key or
    flag that changes it is refused, unless ``model.pretrained`` is ``none`` (then the backbone trains
    from scratch on any front end).
    """
    user = merge(load_yaml(yaml_path) if yaml_path else {}, overrides or {})
    if base is None:
        preset = preset or "default"
        if preset in PRESET_ALIASES:
            log.warning("preset %r is deprecated: it is called %r now", preset, PRESET_ALIASES[preset])
            preset = PRESET_ALIASES[preset]
        if preset not in PRESETS:
            raise AudioclfError(f"Unknown preset={preset!r}; choose one of {', '.join(PRESETS)}")
        user = merge(PRESETS[preset], user)
        model = user.get("model")
        name = model.get("backbone", ModelConfig.backbone) if isinstance(model, dict) else ModelConfig.backbone
        _check_choice("backbone", name, BACKBONE_NAMES)
        b = BACKBONES[name]
        base = merge(RunConfig().to_dict(), merge(merge({"features": dict(b.front_end)}, b.recipe), _task_recipe(user)))
    d = merge(base, user)
    if preset is not None:
        d["preset"] = preset
    feats, asked, model = d.get("features"), user.get("features"), d.get("model")
    if isinstance(feats, dict) and isinstance(asked, dict) and isinstance(model, dict) and model.get("pretrained") == "none" \
            and "sample_rate" in asked and "f_max" not in asked and (feats.get("f_max") or 0) > asked["sample_rate"] / 2:
        feats["f_max"] = None  # from scratch at a lower rate than the front end's: its mels go up to Nyquist
    _check_front_end(d)
    return RunConfig.from_dict(d)


def _task_recipe(user: dict) -> dict:
    """The task's part of :data:`TASK_RECIPES`, for the task ``user`` (preset, YAML, flags) asks for."""
    train, model = user.get("train"), user.get("model")
    recipe = TASK_RECIPES.get(train.get("task") if isinstance(train, dict) else None, {})
    if isinstance(model, dict) and model.get("pooling", "attention") != "attention" and "train" in recipe:
        # frame targets train the attention's time steps: another pooling, asked for, goes without them
        recipe = {**recipe, "train": {k: v for k, v in recipe["train"].items() if k != "frame_loss"}}
    return recipe


def _check_front_end(d: dict) -> None:
    model, feats = d.get("model"), d.get("features")
    if not isinstance(model, dict) or not isinstance(feats, dict) or model.get("pretrained") == "none":
        return  # a wrong type is reported by from_dict; from scratch, any front end goes
    name = model.get("backbone", ModelConfig.backbone)
    _check_choice("backbone", name, BACKBONE_NAMES)
    front_end = BACKBONES[name].front_end
    clash = [k for k, v in front_end.items() if feats.get(k) != v]
    if clash:
        raise AudioclfError(
            f"{', '.join(f'features.{k}={feats.get(k)!r}' for k in clash)} contradicts the front end "
            f"backbone={name!r} was pretrained with ({', '.join(f'{k}={front_end[k]!r}' for k in clash)}); "
            f"drop the setting, or train from scratch with --pretrained none")
    return RunConfig.from_dict(d)
