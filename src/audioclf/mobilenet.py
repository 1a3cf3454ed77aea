"""EfficientAT's AudioSet MobileNets ("MN", Schmid et al., ICASSP 2023), written for audioclf.

One MobileNetV3-large layout with a width multiplier: ``mn04_as`` is width 0.4, ``mn10_as`` width 1.0, and
so on. Module names follow the published state dicts (``features.0.0.weight`` ... ``classifier.5.bias``),
so the official files load with ``strict=True``: a missing or misshapen tensor is an error, never a
silently random layer.

``MobileNet``: (batch, 1, n_mels, frames) -> (batch, n_classes) logits
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# MobileNetV3-large, as EfficientAT uses it: (kernel, expanded, out, squeeze-excitation, hard-swish, stride)
# at width 1.0. The input channels of a block are the output channels of the one before; the stem has 16.
_LAYOUT = [
    (3, 16, 16, False, False, 1),
    (3, 64, 24, False, False, 2),
    (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2),
    (5, 120, 40, True, False, 1),
    (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2),
    (3, 200, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 480, 112, True, True, 1),
    (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2),
    (5, 960, 160, True, True, 1),
    (5, 960, 160, True, True, 1),
]
_STEM, _HIDDEN = 16, 1280  # stem channels and the head's hidden width, at width 1.0


def channels(c: float, divisor: int = 8) -> int:
    """Round ``c`` channels to a multiple of ``divisor``, never more than 10 % below ``c`` (MobileNet's rule)."""
    rounded = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * c else rounded


def _bn(c: int) -> nn.BatchNorm2d:
    # the pretrained statistics were learned with these settings (TensorFlow's MobileNet defaults)
    return nn.BatchNorm2d(c, eps=0.001, momentum=0.01)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: Optional[type] = None) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> activation; indices 0, 1, 2 as in the published state dicts."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), _bn(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class ChannelSE(nn.Module):
    """Squeeze-and-excitation over channels: the mean over (mel, time) gates each channel by a sigmoid.

    Args:
        c (int): Channels.
        squeeze (int): Channels of the bottleneck.
    """

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Linear(c, squeeze)
        self.fc2 = nn.Linear(squeeze, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, c, f, t) -> same shape."""
        s = torch.relu(self.fc1(x.mean((2, 3))))
        return x * torch.sigmoid(self.fc2(s))[:, :, None, None]


class _SEHolder(nn.Module):
    """EfficientAT wraps its one channel SE in a list of concurrent SE layers; the wrapper keeps the keys
    (``conc_se_layers.0.fc1.weight``) so the official files load unchanged."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.conc_se_layers = nn.ModuleList([ChannelSE(c, squeeze)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conc_se_layers[0](x)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (k x k, stride) -> optional SE -> project (1x1), with a shortcut when the
    shape is kept."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hswish: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers = [] if expanded == cin else [_conv_bn(cin, expanded, 1, act=act)]
        layers.append(_conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(_SEHolder(expanded, channels(expanded // 4)))
        layers.append(_conv_bn(expanded, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class AttentionPool(nn.Module):
    """Per-class attention over time steps (PANNs' decision-level attention): each class weighs the steps
    by a softmax of its own attention logits and averages its step logits with those weights, so a sound
    filling a fifth of the clip is not diluted by the other four fifths, as a plain average would dilute it.

    Args:
        d (int): Width of the step features the attention reads.
        n_classes (int): Output classes.

    Shapes: ``(batch, steps, d)`` features and ``(batch, steps, n_classes)`` step logits in,
    ``(batch, n_classes)`` clip logits out.
    """

    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.attention = nn.Linear(d, n_classes)
        nn.init.zeros_(self.attention.weight)  # uniform weights to start: the plain average of the steps
        nn.init.zeros_(self.attention.bias)

    def forward(self, h: torch.Tensor, step_logits: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.attention(h), dim=1)
        return (weights * step_logits).sum(1)


class MobileNet(nn.Module):
    """EfficientAT's MN: a MobileNetV3-large trunk over a 1-channel log-mel image and an MLP head.

    Args:
        width (float): Width multiplier (0.4 for ``mn04_as``, 1.0 for ``mn10_as``, ...).
        n_classes (int, optional): Outputs of the last layer. (Default: ``527``, AudioSet's classes: the
            published weights' head)
        dropout (float): Dropout probability before the last layer (``ModelConfig.dropout``).
        pooling (str): ``mean`` (the published network: the head on the map's average) or ``attention`` (the
            head on each time step, then :class:`AttentionPool`) (``ModelConfig.pooling``).
    """

    def __init__(self, width: float, n_classes: int = 527, *, dropout: float, pooling: str):
        super().__init__()
        cin = channels(_STEM * width)
        layers = [_conv_bn(1, cin, 3, 2, act=nn.Hardswish)]
        for kernel, expanded, cout, se, hswish, stride in _LAYOUT:
            cout = channels(cout * width)
            layers.append(InvertedResidual(cin, kernel, channels(expanded * width), cout, se, hswish, stride))
            cin = cout
        self.n_features = 6 * cin  # width of the pooled trunk output: the embedding
        layers.append(_conv_bn(cin, self.n_features, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        hidden = channels(_HIDDEN * width)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(self.n_features, hidden), nn.Hardswish(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        self.pool = AttentionPool(hidden, n_classes) if pooling == "attention" else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def replace_head(self, n_classes: int) -> "MobileNet":
        """A new, randomly initialised last layer with ``n_classes`` outputs; everything else is kept."""
        old = self.classifier[5]
        self.classifier[5] = nn.Linear(old.in_features, n_classes)
        if self.pool is not None:
            self.pool = AttentionPool(old.in_features, n_classes)
        nn.init.normal_(self.classifier[5].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[5].bias)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, n_mels, frames) -> (batch, n_features): the trunk's output averaged over mel and time."""
        return self.features(x).mean((2, 3))

    def _steps(self, trunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's map (``features``) -> the head's hidden layer and its logits at each time step of the
        map (averaged over mel): (batch, frames / 32, hidden), (batch, frames / 32, n_classes)."""
        hidden = self.classifier[2:5](trunk.mean(2).transpose(1, 2))  # Linear, Hardswish, Dropout
        return hidden, self.classifier[5](hidden)

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), embed(x))`` from one pass of the trunk (the unknown rule's scores need both)."""
        trunk = self.features(x)
        emb = trunk.mean((2, 3))
        return (self.classifier[2:](emb) if self.pool is None else self.pool(*self._steps(trunk))), emb

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, n_mels, frames) -> (batch, frames / 32, n_classes): the head applied to each time step
        of the trunk's map instead of to its average over time; sound event detection's frame-level output."""
        return self._steps(self.features(x))[1]

    def forward(self, x: torch.Tensor, steps: bool = False):
        """(batch, 1, n_mels, frames) -> (batch, n_classes) logits; with ``steps`` (attention pooling), also
        each time step's, ``(batch, frames / 32, n_classes)``."""
        if self.pool is None:
            return self.classifier(self.features(x))
        hidden, step_logits = self._steps(self.features(x))
        logits = self.pool(hidden, step_logits)
        return (logits, step_logits) if steps else logits
