"""audioclf: train, evaluate, serve and export audio classifiers (log-mel spectrograms; AudioSet-pretrained
MobileNets or ResNet-18)."""

from ._version import __version__
from .errors import AudioclfError
from .options import PredictOptions

__all__ = ["AudioclfError", "__version__", "load"]


def load(model, device: str = PredictOptions.device, *, reject: bool = PredictOptions.reject):
    """Load a trained model (run directory, ``.pt`` checkpoint or exported safetensors folder), or an
    AudioSet backbone's name (``"mn04_as"``) for AudioSet's 527 tags without training, for inference; see
    :class:`audioclf.predict.Classifier`. ``reject=False``: never answer ``"unknown"``."""
    from .predict import load as _load

    return _load(model, device, reject=reject)
