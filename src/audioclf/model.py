"""The networks: ResNet-18 and EfficientAT's AudioSet MobileNets on log-mel spectrograms.

``AudioResNet``        (batch, n_mels, frames) log-mel -> (batch, n_classes) logits
``AudioMobileNet``     (batch, n_mels, frames) log-mel -> (batch, n_classes) logits
``FAMILIES``           the one table of what differs between the backbone families: building, pretrained
                       weights, what is fitted before the network goes to its device
``build_network``      a ModelConfig -> one of them (random weights): what checkpoints are read into
``build_model``        the same, with the pretrained weights the config asks for
``place_model``        fitted on the training clips where its family needs it, on its device
``WaveformClassifier`` (batch, samples) waveform -> (batch, n_classes) probabilities, for export/serving

Both networks also have ``embed``: (batch, n_mels, frames) -> (batch, d), the pooled output of the
convolutional trunk, before any classifier layer.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .backbones import BACKBONES
from .config import FeatureConfig, ModelConfig
from .errors import AudioclfError
from .features import LogMel, Normalize
from .mobilenet import AttentionPool, MobileNet

log = logging.getLogger(__name__)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut, named as torchvision's so its state dicts load unchanged."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` architecture, module for module (same state-dict keys, same
    initialisation), with ``in_channels`` input planes and a ``head`` in place of the 1000-way layer.

    Defined here rather than imported because importing torchvision costs 2-3 s of every prediction's
    cold start (it pulls in torch._dynamo); its ImageNet file is fetched by :mod:`audioclf.weights`.
    (batch, in_channels, H, W) -> (batch, outputs of ``head``)
    """

    def __init__(self, head: nn.Module, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = [64, 128, 256, 512]
        for i, (cin, cout) in enumerate(zip([64] + widths[:-1], widths), 1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = head
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, in_channels, H, W) -> (batch, 512, H / 32, W / 32): the last block's output."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pooled(self, fmap: torch.Tensor) -> torch.Tensor:
        """The last block's map -> (batch, 512): its average."""
        return torch.flatten(self.avgpool(fmap), 1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, in_channels, H, W) -> (batch, 512) pooled features, before ``head``."""
        return self.pooled(self.feature_map(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))


class AudioResNet(nn.Module):
    """ResNet-18 adapted to 1-channel log-mel input.

    Args:
        n_classes (int): Output classes.
        n_mels (int): Mel bands of the input, sizes the normalisation buffers.
        dropout (float): Dropout probability before the final linear layer.
        pooling (str): ``mean`` or ``attention`` over time (``ModelConfig.pooling``).
    """

    def __init__(self, n_classes: int, n_mels: int, dropout: float, pooling: str):
        super().__init__()
        if n_classes < 2:
            raise AudioclfError(f"n_classes={n_classes}: a classifier needs at least 2 classes")
        self.norm = Normalize(n_mels)
        self.backbone = ResNet18(nn.Sequential(nn.Dropout(dropout), nn.Linear(512, n_classes)), in_channels=1)
        self.pool = AttentionPool(512, n_classes) if pooling == "attention" else None
        # the scratch recipe was tuned with the stem at PyTorch's default init (it used to replace
        # torchvision's RGB stem after torchvision's init ran): keep it so
        self.backbone.conv1.reset_parameters()

    @classmethod
    def from_config(cls, config: ModelConfig, n_classes: int, n_mels: int) -> "AudioResNet":
        """The network ``config`` describes, with random weights (see :func:`build_network`)."""
        return cls(n_classes, n_mels, config.dropout, config.pooling)

    def fit_input(self, frames: Iterable[torch.Tensor], config: ModelConfig) -> None:
        """Fit the input standardisation on the training clips' ``(n_mels, frames)`` log-mels, per band or
        global as ``config.normalization`` says."""
        self.norm.fit(frames, per_band=config.normalization != "global")

    def load_imagenet(self, state_dict: dict) -> "AudioResNet":
        """Load ImageNet weights: the RGB stem is summed over colour (a grey image gives the same
        activations as before), the 1000-way head is dropped."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        if "conv1.weight" not in sd or sd["conv1.weight"].shape[1:] != (3, 7, 7):
            raise AudioclfError("the weights are not a torchvision ResNet-18 state dict (conv1.weight of shape "
                                "(64, 3, 7, 7) missing)")
        sd["conv1.weight"] = sd["conv1.weight"].sum(dim=1, keepdim=True)
        missing, unexpected = self.backbone.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise AudioclfError(f"the weights do not fit ResNet-18: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) log-mel -> (batch, 512) pooled trunk features."""
        return self.backbone.trunk(self.norm(x).unsqueeze(1))

    def forward(self, x: torch.Tensor, steps: bool = False):
        """(batch, n_mels, frames) log-mel -> (batch, n_classes) logits; with ``steps`` (attention pooling),
        also each time step's, ``(batch, frames / 32, n_classes)``."""
        if self.pool is None:
            return self.backbone(self.norm(x).unsqueeze(1))
        h = self._steps(self._map(x))
        step_logits = self.backbone.fc(h)
        logits = self.pool(h, step_logits)
        return (logits, step_logits) if steps else logits

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> (batch, 512, n_mels / 32, frames / 32): the last block's map."""
        return self.backbone.feature_map(self.norm(x).unsqueeze(1))

    @staticmethod
    def _steps(fmap: torch.Tensor) -> torch.Tensor:
        """The last block's map -> (batch, frames / 32, 512): its time steps, averaged over mel."""
        return fmap.mean(2).transpose(1, 2)

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), embed(x))`` from one pass of the trunk (the unknown rule's scores need both)."""
        fmap = self._map(x)
        emb = self.backbone.pooled(fmap)
        if self.pool is None:
            return self.backbone.fc(emb), emb
        h = self._steps(fmap)
        return self.pool(h, self.backbone.fc(h)), emb

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) log-mel -> (batch, frames / 32, n_classes): the head on each time step of
        the last block's map (averaged over mel); with mean pooling their mean over time is ``forward``'s."""
        return self.backbone.fc(self._steps(self._map(x)))


class AudioMobileNet(nn.Module):
    """An EfficientAT MobileNet (``mn04_as`` ... ``mn40_as``) with a new last layer for our classes.

    Its input is already normalised by the backbone's fixed front end (``FeatureConfig.offset/scale``),
    so unlike :class:`AudioResNet` it fits no statistics.

    Args:
        n_classes (int): Output classes.
        width (float): Width multiplier of the backbone (0.4 for ``mn04_as``).
        dropout (float): Dropout probability before the last layer.
        pooling (str): ``mean`` or ``attention`` over time (``ModelConfig.pooling``).
    """

    def __init__(self, n_classes: int, width: float, dropout: float, pooling: str):
        super().__init__()
        if n_classes < 2:
            raise AudioclfError(f"n_classes={n_classes}: a classifier needs at least 2 classes")
        self.net = MobileNet(width, n_classes, dropout=dropout, pooling=pooling)

    @classmethod
    def from_config(cls, config: ModelConfig, n_classes: int, n_mels: int) -> "AudioMobileNet":
        """The network ``config`` describes, with random weights (see :func:`build_network`); its input
        width is the front end's, fixed by the backbone, so ``n_mels`` is not needed."""
        return cls(n_classes, BACKBONES[config.backbone].width, config.dropout, config.pooling)

    def load_pretrained(self, state_dict: dict, name: str, *, keep_head: bool = False) -> "AudioMobileNet":
        """Load the official AudioSet weights of backbone ``name``: every tensor but the 527-class last
        layer, which our classes replace (with ``keep_head``, that layer too: AudioSet tagging). Any other
        missing, extra or misshapen tensor is an error."""
        ours = self.net.state_dict()
        # the last layer and the attention over time are ours to train (AudioSet's network averages)
        head = {k for k in ours if k.startswith("pool.")} | \
            (set() if keep_head else {k for k in ours if k.startswith("classifier.5.")})
        missing = sorted(set(ours) - set(state_dict) - head)
        unexpected = sorted(set(state_dict) - set(ours))
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(ours[k].shape)}" for k in set(ours) & set(state_dict) - head
                  if state_dict[k].shape != ours[k].shape]
        if missing or unexpected or shapes:
            raise AudioclfError(f"the weights are not {name}'s: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                                f"other shapes {shapes[:3]}")
        self.net.load_state_dict({k: v for k, v in state_dict.items() if k not in head}, strict=False)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) features -> (batch, 6 x last block's channels) pooled trunk features."""
        return self.net.embed(x.unsqueeze(1))

    def forward(self, x: torch.Tensor, steps: bool = False):
        """(batch, n_mels, frames) features -> (batch, n_classes) logits (and with ``steps``, each time
        step's: :meth:`MobileNet.forward`)."""
        return self.net(x.unsqueeze(1), steps)

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), embed(x))`` from one pass of the trunk (the unknown rule's scores need both)."""
        return self.net.logits_and_embedding(x.unsqueeze(1))

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) features -> (batch, frames / 32, n_classes) frame-level logits."""
        return self.net.frame_logits(x.unsqueeze(1))


@dataclass(frozen=True)
class Family:
    """What differs between the networks of one backbone family (``Backbone.family``)."""

    # (config, n_classes, n_mels) -> the network, with random weights
    build: Callable[[ModelConfig, int, int], nn.Module]
    # (network, the official state dict, backbone name) -> the network with those weights
    load_pretrained: Callable[[nn.Module, dict, str], nn.Module]
    # (network, training clips' (n_mels, frames) features, config): what is fitted to the data before the
    # network goes to its device
    fit_input: Callable[[nn.Module, Iterable[torch.Tensor], ModelConfig], None]


def _fits_nothing(model: nn.Module, frames: Iterable[torch.Tensor], config: ModelConfig) -> None:
    """The MobileNets' front end normalises with fixed numbers (``FeatureConfig.offset/scale``)."""


# The one place a backbone family decides anything: every other module goes through this table.
FAMILIES: dict[str, Family] = {
    "resnet": Family(AudioResNet.from_config, lambda net, sd, name: net.load_imagenet(sd), AudioResNet.fit_input),
    "mobilenet": Family(AudioMobileNet.from_config, AudioMobileNet.load_pretrained, _fits_nothing),
}


def family(config: ModelConfig) -> Family:
    """The family of ``config.backbone``."""
    return FAMILIES[BACKBONES[config.backbone].family]


def build_network(config: ModelConfig, n_classes: int, n_mels: int) -> nn.Module:
    """The network ``config`` describes, with random weights: the one place a ModelConfig becomes a model
    (training, checkpoints and exports all come through here)."""
    return family(config).build(config, n_classes, n_mels)


def build_model(config: ModelConfig, n_classes: int, n_mels: int) -> tuple[nn.Module, bool]:
    """Build the network and load its pretrained weights as ``config`` asks.

    Returns the model and whether pretrained weights were loaded. With ``pretrained="auto"`` the weights
    are used when they can be had, and otherwise the network trains from scratch (a warning says why).
    """
    from .weights import load_state_dict  # downloads: only training needs it

    model = build_network(config, n_classes, n_mels)
    if config.pretrained == "none" and not config.weights_path:
        return model, False
    try:
        family(config).load_pretrained(model, load_state_dict(config.backbone, config.weights_path), config.backbone)
    except AudioclfError as e:
        if config.pretrained != "auto" or config.weights_path:
            raise
        log.warning("%s -- training %s from scratch instead", e, config.backbone)
        return model, False
    return model, True


def place_model(model: nn.Module, config: ModelConfig, train_frames: Iterable[torch.Tensor],
                device: torch.device) -> nn.Module:
    """Fit what ``model``'s family fits on the training clips' features ``train_frames`` (only ResNet-18's
    input standardisation; the iterable is not read otherwise), then move it to ``device`` in
    channels-last, what cuDNN and oneDNN convolve fastest (1.2-1.3x on CPU)."""
    family(config).fit_input(model, train_frames, config)
    model.to(device)
    return model.to(memory_format=torch.channels_last)


def activation(task: str):
    """The function from logits to probabilities of a ``train.task``: softmax over classes for
    ``multiclass``, an independent sigmoid per class for ``multilabel``."""
    if task == "multilabel":
        return torch.sigmoid
    return functools.partial(torch.softmax, dim=-1)


class WaveformClassifier(nn.Module):
    """Waveform in, class probabilities out: LogMel -> the network -> softmax (or sigmoids).

    Args:
        features (FeatureConfig): the feature settings the model was trained with.
        model (nn.Module): a trained network (:func:`build_network`).
        task (str, optional): ``multiclass`` (softmax) or ``multilabel`` (sigmoids). (Default: ``"multiclass"``)
        temperature (float, optional): divides the logits first: the model's calibration (``trust.py``),
            a constant of an exported graph. (Default: ``1.0``)
    """

    def __init__(self, features: FeatureConfig, model: nn.Module, task: str = "multiclass", temperature: float = 1.0):
        super().__init__()
        self.logmel = LogMel(features)
        self.model = model
        self.task = task
        self.temperature = float(temperature)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, samples) at ``features.sample_rate`` -> (batch, n_classes) probabilities."""
        return activation(self.task)(self.model(self.logmel(wave)) / self.temperature)

    def frames(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, steps, n_classes) probabilities of each time step of the network's
        last feature map (its ``frame_logits``; a step is 32 spectrogram frames)."""
        return activation(self.task)(self.model.frame_logits(self.logmel(wave)) / self.temperature)
