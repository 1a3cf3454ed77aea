"""audioclf: train, evaluate and serve audio classifiers (log-mel spectrograms + ResNet-18)."""

__version__ = "0.1.0"

from .config import AudioclfError  # noqa: E402
