"""audioclf: train, evaluate and serve audio classifiers (log-mel spectrograms + ResNet-18)."""

__version__ = "0.1.0"

from .config import AudioclfError  # noqa: E402


def load(model, device: str = "auto"):
    """Load a trained model (run directory, ``.pt`` checkpoint or exported safetensors folder) for
    inference; see :class:`audioclf.predict.Classifier`."""
    from .predict import load as _load

    return _load(model, device)
