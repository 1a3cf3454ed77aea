"""The backbones audioclf can train: each owns its front end, its pretrained weights and its recipe.

A backbone's ``front_end`` is the :class:`~audioclf.config.FeatureConfig` its pretrained weights expect;
``recipe`` holds the fine-tuning settings chosen by cross-validation (docs/results.md). Both are
applied on top of the config defaults and below a preset, a YAML file and flags (``config.resolve``);
a flag that contradicts a pretrained front end is refused there.

This module is data only, so that config, model and weights can all read it without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

EFFICIENTAT_URL = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"


@dataclass(frozen=True)
class Backbone:
    name: str
    # "resnet" or "mobilenet": the key of model.FAMILIES, the one table of how a family's networks are
    # built, load their pretrained weights and are placed on the device
    family: str
    description: str
    pretrained_on: str  # what ModelConfig.pretrained records when the weights were loaded
    head_classes: int  # classes of the published head: what the pretrained weights were trained to tell apart
    weights_file: str  # the official file name (also its name in the torch hub cache)
    weights_url: str
    sha256: Optional[str] = None  # pinned where it could be established; None = not checked
    width: float = 1.0  # MobileNet width multiplier
    front_end: dict = field(default_factory=dict)  # FeatureConfig fields the pretrained weights expect
    recipe: dict = field(default_factory=dict)  # {section: {field: value}} fine-tuning defaults
    # where no full sha256 is pinned: its first hex digits, as published (torchvision's file names carry 8)
    sha256_prefix: Optional[str] = None
    # the peak learning rate when neither the recipe nor the user sets train.lr: fine-tuning pretrained
    # weights wants a smaller step than training from scratch
    lr_pretrained: float = 1e-4
    lr_scratch: float = 1e-3

    def default_lr(self, pretrained: bool) -> float:
        """The learning rate a run without ``train.lr`` trains with."""
        return self.lr_pretrained if pretrained else self.lr_scratch


# EfficientAT's AugmentMelSTFT in eval mode (its models/preprocess.py): 32 kHz, pre-emphasis 0.97, a
# symmetric Hann window of 800 in a 1024-point FFT, hop 320, 128 Kaldi mel bins from 0 to 15 kHz,
# log(mel + 1e-5), then (x + 4.5) / 5.
_AUDIOSET_FRONT_END = {
    "sample_rate": 32000, "n_fft": 1024, "win_length": 800, "hop_length": 320, "window": "symmetric",
    "preemphasis": 0.97, "n_mels": 128, "f_min": 0.0, "f_max": 15000.0, "mel_scale": "kaldi",
    "compression": "log", "offset": 4.5, "scale": 5.0,
}

# Fine-tuning recipe for the AudioSet MobileNets: EfficientAT's ESC-50 recipe (mixup 0.3, +-12 dB gain,
# time roll) at batch 32 with AdamW, lr 5e-4 and a cosine schedule, cut to 15 epochs to fit 2 CPU cores
# (docs/results.md: measured by 4-fold CV, not tuned further).
# Peak normalisation stays off: the weights were trained on AudioSet's own levels, which the fixed
# (x + 4.5) / 5 assumes. bf16 autocast stays off: on a 2-core CPU with native bf16 the depthwise
# convolutions ran no faster than fp32 alone, and 2.4x slower beside another job (benchmarks/speed.py).
_MN_RECIPE = {
    "features": {"peak_normalize": False},
    "train": {"lr": 5e-4, "batch_size": 32, "epochs": 15, "warmup_epochs": 1, "scheduler": "cosine",
              "weight_decay": 1e-3, "label_smoothing": 0.1, "patience": 0, "amp": False},
    "augment": {"mixup_alpha": 0.3, "gain_db": 12.0, "time_shift": 0.5, "freq_mask_width": 24,
                "time_mask_width": 30, "n_freq_masks": 1, "n_time_masks": 1},
    "model": {"dropout": 0.2},
}

_MN_SIZES = {  # name: (width multiplier, official file)
    "mn04_as": (0.4, "mn04_as_mAP_432.pt"),
    "mn05_as": (0.5, "mn05_as_mAP_443.pt"),
    "mn10_as": (1.0, "mn10_as_mAP_471.pt"),
    "mn20_as": (2.0, "mn20_as_mAP_478.pt"),
    "mn30_as": (3.0, "mn30_as_mAP_482.pt"),
    "mn40_as": (4.0, "mn40_as_mAP_484.pt"),
}
_PINNED_SHA256 = {
    # the official release files; each hash is pinned beside the URL by several unrelated public projects
    # (mn10_as: 19,708,753 bytes, 312 tensors). The other sizes' hashes could not be established offline.
    "mn04_as_mAP_432.pt": "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c",
    "mn10_as_mAP_471.pt": "0bd7dc2443af498c289a2e739f02ebb515d6aa3fd3ab9db539c86123ae368a4e",
}

BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(
        "resnet18", "resnet", "ResNet-18 on log-mels (ImageNet weights or from scratch; the original tutorial's "
        "network)", "imagenet", 1000, "resnet18-f37072fd.pth",
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        sha256_prefix="f37072fd"),  # torchvision's ResNet18_Weights.IMAGENET1K_V1 (a test checks they agree)
    **{name: Backbone(
        name, "mobilenet", f"EfficientAT MobileNet, width {width}, AudioSet-pretrained", "audioset", 527, file,
        EFFICIENTAT_URL + file, _PINNED_SHA256.get(file), width, _AUDIOSET_FRONT_END, _MN_RECIPE)
       for name, (width, file) in _MN_SIZES.items()},
}
BACKBONE_NAMES = tuple(BACKBONES)
# What `audioclf train` uses (the "default" preset): the best by cross-validation whose weights anyone can
# download (docs/results.md). ModelConfig's own default stays the original tutorial's network.
DEFAULT_BACKBONE = "mn04_as"
