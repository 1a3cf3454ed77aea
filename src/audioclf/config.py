"""Configuration: one dataclass per stage, nested in :class:`RunConfig`.

The resolved ``RunConfig`` is written to the run directory before training starts and stored in every
checkpoint. At inference time the saved :class:`FeatureConfig` is the only source of feature settings,
so training and prediction can never disagree about how audio becomes a spectrogram.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .backbones import BACKBONE_NAMES, BACKBONES, DEFAULT_BACKBONE


class AudioclfError(ValueError):
    """The one error type of audioclf: its message says what was wrong and what is allowed."""


def _check_range(name: str, value, low=None, high=None, *, low_open=False):
    if value is None:
        return
    # NaN compares False with every bound, so it would pass the checks below: refuse it (and inf) first
    if isinstance(value, float) and not math.isfinite(value):
        allowed = " and ".join(f"{op} {b}" for op, b in ((">" if low_open else ">=", low), ("<=", high)) if b is not None)
        raise AudioclfError(f"{name}={value!r} is not a finite number: it must be {allowed or 'finite'}")
    if low is not None and (value < low or (low_open and value == low)):
        op = ">" if low_open else ">="
        raise AudioclfError(f"{name}={value!r} is out of range: it must be {op} {low}")
    if high is not None and value > high:
        raise AudioclfError(f"{name}={value!r} is out of range: it must be <= {high}")


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise AudioclfError(f"Unsupported {name}={value!r}; choose one of {', '.join(map(repr, choices))}")


@dataclass
class FeatureConfig:
    """How audio becomes model input. Saved with every model; inference reads only this copy."""

    sample_rate: int = 22050  # Hz, every clip is resampled to this
    duration_s: float = 5.0  # seconds of audio per example (crop or zero-pad)
    n_mels: int = 80  # mel bands
    n_fft: int = 1024  # samples per FFT
    hop_length: int = 256  # samples between frames
    win_length: int = 1024  # samples in the Hann window
    f_min: float = 0.0  # Hz, lowest mel filter edge
    f_max: Optional[float] = None  # Hz, highest mel filter edge; None = sample_rate / 2
    # scale each clip (each window, at inference) to a peak of 1 before the STFT: recordings made at
    # different levels (FSDD's speakers are 20 dB apart) then look alike to the model
    peak_normalize: bool = True
    # features are log1p(mel_gain * mel power): log1p is linear below 1 / mel_gain and logarithmic above,
    # so the gain sets how much of the quiet dynamic range the log reaches (1 = the seed's plain log1p)
    mel_gain: float = 1.0
    # The settings below exist so that a pretrained backbone's own front end is one FeatureConfig
    # (backbones.py); their defaults are the seed's librosa features.
    window: Literal["periodic", "symmetric"] = "periodic"  # Hann window kind
    preemphasis: float = 0.0  # y[t] = x[t] - preemphasis * x[t-1] before the STFT; 0 = off
    mel_scale: Literal["slaney", "kaldi"] = "slaney"  # librosa's area-normalised filters, or Kaldi's
    compression: Literal["log1p", "log"] = "log1p"  # log1p(mel_gain * mel), or log(mel + 1e-5)
    offset: float = 0.0  # features are (compressed + offset) / scale: a fixed normalisation
    scale: float = 1.0

    def __post_init__(self):
        _check_range("sample_rate", self.sample_rate, 1000, 384000)
        _check_range("mel_gain", self.mel_gain, 0.0, 1e12, low_open=True)
        _check_choice("window", self.window, ("periodic", "symmetric"))
        _check_choice("mel_scale", self.mel_scale, ("slaney", "kaldi"))
        _check_choice("compression", self.compression, ("log1p", "log"))
        _check_range("preemphasis", self.preemphasis, 0.0, 0.999)
        _check_range("offset", self.offset, -1e6, 1e6)
        _check_range("scale", self.scale, 0.0, 1e6, low_open=True)
        _check_range("duration_s", self.duration_s, 0.0, 3600.0, low_open=True)
        _check_range("n_mels", self.n_mels, 8, 512)
        _check_range("n_fft", self.n_fft, 16, 65536)
        _check_range("hop_length", self.hop_length, 1, self.n_fft)
        _check_range("win_length", self.win_length, 1, self.n_fft)
        _check_range("f_min", self.f_min, 0.0, self.sample_rate / 2)
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


@dataclass
class AugmentConfig:
    """Training-only augmentation. SpecAugment widths are upper bounds: each mask draws its width."""

    freq_mask_width: int = 15  # mel bands, widest frequency mask
    time_mask_width: int = 25  # frames, widest time mask
    n_freq_masks: int = 2
    n_time_masks: int = 2
    # a time mask covers at most this fraction of the frames (SpecAugment's p): 25 frames would blank
    # a spoken digit in a 1-s clip, while 5-s clips (431 frames) are unaffected
    time_mask_fraction: float = 0.1
    time_shift: float = 0.5  # roll each example in time by up to this fraction of its frames
    time_stretch: float = 0.0  # stretch each example in time by a factor up to 1 + this (or its inverse)
    freq_shift: int = 0  # shift each example by up to this many mel bands (about 4 % in pitch per band)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing; 0 turns mixup off
    gain_db: float = 0.0  # random gain in [-gain_db, +gain_db], applied in the log-mel domain

    def __post_init__(self):
        for name in ("freq_mask_width", "time_mask_width", "n_freq_masks", "n_time_masks"):
            _check_range(name, getattr(self, name), 0, 10000)
        _check_range("time_mask_fraction", self.time_mask_fraction, 0.0, 1.0)
        _check_range("time_shift", self.time_shift, 0.0, 1.0)
        _check_range("time_stretch", self.time_stretch, 0.0, 1.0)
        _check_range("freq_shift", self.freq_shift, 0, 64)
        _check_range("mixup_alpha", self.mixup_alpha, 0.0, 100.0)
        _check_range("gain_db", self.gain_db, 0.0, 60.0)


@dataclass
class ModelConfig:
    # the network; it brings its own front end and fine-tuning recipe (backbones.py, `audioclf backbones`)
    # (the dataclass default is the seed's network; the "default" preset, what the CLI runs, picks
    # backbones.DEFAULT_BACKBONE)
    backbone: Literal["resnet18", "mn04_as", "mn05_as", "mn10_as", "mn20_as", "mn30_as", "mn40_as"] = "resnet18"
    # "auto": the backbone's pretrained weights when they can be had (--weights, torch hub cache or download),
    # else from scratch; after training it records what was used ("imagenet", "audioset" or "none").
    pretrained: Literal["auto", "imagenet", "audioset", "none"] = "auto"
    weights_path: Optional[str] = None  # local state dict of the backbone's official weights; implies pretrained
    dropout: float = 0.2  # before the final linear layer
    # per-mel-band or one mean/std from the train split; "clip": each clip's own mean per band over time is
    # subtracted (cepstral mean normalisation: a fixed microphone or voice colouring goes), then the band's std
    normalization: Literal["band", "global", "clip"] = "band"
    # ResNet's 3x3 max-pool after the stem; without it every layer sees 2x the mel and time resolution
    # (4x the compute): 80 mel bands are a small image next to ImageNet's 224 pixels
    stem_pool: bool = True

    def __post_init__(self):
        _check_choice("backbone", self.backbone, BACKBONE_NAMES)
        _check_choice("pretrained", self.pretrained, ("auto", "imagenet", "audioset", "none"))
        kind = BACKBONES[self.backbone].pretrained_on
        if self.pretrained not in ("auto", "none", kind):
            raise AudioclfError(f"pretrained={self.pretrained!r} does not exist for backbone={self.backbone!r}; "
                                f"choose auto, none or {kind}")
        _check_choice("normalization", self.normalization, ("band", "global", "clip"))
        _check_range("dropout", self.dropout, 0.0, 0.99)


@dataclass
class DataConfig:
    root: str = ""  # folder, CSV manifest, or dataset root
    format: Literal["folder", "csv", "esc50", "urbansound8k"] = "folder"
    esc10: bool = False  # ESC-50 only: keep the ESC-10 subset
    val_fold: Optional[int] = None  # hold out this fold for validation
    test_fold: Optional[int] = None  # hold out this fold for testing (never seen in training)
    val_split: float = 0.2  # fraction for validation when val_fold is not given (group-aware)
    cache_dir: Optional[str] = None  # feature cache; None = $AUDIOCLF_CACHE or ~/.cache/audioclf
    strict: bool = False  # fail on the first unreadable clip instead of skipping it
    balance: Literal["none", "weights", "sampler"] = "none"
    num_workers: Optional[int] = None  # decoding processes for the cache build; None = auto

    def __post_init__(self):
        _check_choice("format", self.format, ("folder", "csv", "esc50", "urbansound8k"))
        _check_choice("balance", self.balance, ("none", "weights", "sampler"))
        _check_range("val_split", self.val_split, 0.0, 0.9, low_open=True)
        if self.val_fold is not None and self.val_fold == self.test_fold:
            raise AudioclfError(f"val_fold and test_fold are both {self.val_fold}: they must differ")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: Optional[float] = None  # None = recipe default (1e-4 with ImageNet weights, 1e-3 from scratch)
    weight_decay: float = 1e-3
    patience: int = 15  # epochs without a better validation loss before stopping; 0 = never stop early
    scheduler: Literal["plateau", "cosine", "onecycle"] = "cosine"
    warmup_epochs: int = 2  # linear warmup before cosine
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    seed: int = 42
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = True  # mixed precision: bf16/fp16 on CUDA, bf16 on CPUs that compute it natively
    quiet: bool = False
    # deterministic kernels (torch.use_deterministic_algorithms, cuDNN without autotuning): the same seed
    # gives the same model on CUDA too, at some speed; CPU runs are reproducible without it
    deterministic: bool = False

    def __post_init__(self):
        _check_range("epochs", self.epochs, 1, 100000)
        _check_range("batch_size", self.batch_size, 1, 65536)
        _check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        _check_range("patience", self.patience, 0, 100000)
        _check_range("warmup_epochs", self.warmup_epochs, 0, 100000)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 0.99)
        _check_range("grad_clip", self.grad_clip, 0.0, 1e6)
        _check_range("seed", self.seed, 0, 2**32 - 1)  # numpy's and scikit-learn's seeds are 32-bit
        _check_choice("scheduler", self.scheduler, ("plateau", "cosine", "onecycle"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise AudioclfError(f"Unsupported device={self.device!r}; choose auto, cpu, cuda or cuda:N")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "default"

    def __post_init__(self):
        # a float setting without a range check (or added later) must still never be NaN or infinite
        for section in (getattr(self, name) for name in _SECTION_NAMES):
            for f in dataclasses.fields(section):
                _check_range(f.name, getattr(section, f.name))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return from_dict(cls, d)

    @classmethod
    def from_saved(cls, d: dict) -> "RunConfig":
        """A config stored with a model or run: a setting that an older audioclf did not write yet takes
        the value that version behaved with (not today's default), so old models predict as trained."""
        d = {**d, **{sec: {**before, **d.get(sec, {})} for sec, before in _BEFORE_THE_SETTING.items()}}
        d["model"] = {k: v for k, v in d["model"].items() if k != "arch"}  # always "resnet18", now `backbone`
        return from_dict(cls, d)

    def save_yaml(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTION_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "preset")

# How audioclf behaved before each of these settings existed (see RunConfig.from_saved)
_BEFORE_THE_SETTING = {
    "features": {"peak_normalize": False, "mel_gain": 1.0},
    "augment": {"time_mask_fraction": 1.0, "time_shift": 0.0, "time_stretch": 0.0, "freq_shift": 0},
    "model": {"stem_pool": True, "backbone": "resnet18"},
}


# Named recipes: overrides applied on top of the defaults, before a YAML file and flags.
PRESETS: dict[str, dict] = {
    "default": {"model": {"backbone": DEFAULT_BACKBONE}},
    # The seed notebook: plateau schedule, lr 1e-4, batch 16, 25 epochs, patience 5, one mask of each kind.
    "seed": {
        "features": {"peak_normalize": False, "mel_gain": 1.0},
        "train": {"lr": 1e-4, "batch_size": 16, "epochs": 25, "patience": 5, "scheduler": "plateau",
                  "warmup_epochs": 0, "label_smoothing": 0.0},
        "augment": {"freq_mask_width": 15, "time_mask_width": 25, "n_freq_masks": 1, "n_time_masks": 1,
                    "time_mask_fraction": 1.0, "time_shift": 0.0, "time_stretch": 0.0, "freq_shift": 0,
                    "mixup_alpha": 0.0, "gain_db": 0.0},
        "model": {"backbone": "resnet18", "dropout": 0.0},
    },
}


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
    try:
        d = yaml.safe_load(path.read_text())
    except OSError as e:
        raise AudioclfError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise AudioclfError(f"config file {path} is not valid YAML: {e}") from None
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
        if preset not in PRESETS:
            raise AudioclfError(f"Unknown preset={preset!r}; choose one of {', '.join(PRESETS)}")
        user = merge(PRESETS[preset], user)
        model = user.get("model")
        name = model.get("backbone", ModelConfig.backbone) if isinstance(model, dict) else ModelConfig.backbone
        _check_choice("backbone", name, BACKBONE_NAMES)
        b = BACKBONES[name]
        base = merge(RunConfig().to_dict(), merge({"features": dict(b.front_end)}, b.recipe))
    d = merge(base, user)
    if preset is not None:
        d["preset"] = preset
    feats, asked, model = d.get("features"), user.get("features"), d.get("model")
    if isinstance(feats, dict) and isinstance(asked, dict) and isinstance(model, dict) and model.get("pretrained") == "none" \
            and "sample_rate" in asked and "f_max" not in asked and (feats.get("f_max") or 0) > asked["sample_rate"] / 2:
        feats["f_max"] = None  # from scratch at a lower rate than the front end's: its mels go up to Nyquist
    _check_front_end(d)
    return RunConfig.from_dict(d)


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
