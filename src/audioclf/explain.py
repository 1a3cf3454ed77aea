"""Explanations: where in time and frequency a model's evidence for a class lies, drawn over the log-mel.

The map is **occlusion** over the model's own input features: a patch of the log-mel (a few mel bands by a
few frames) is lowered to each band's median over the clip, the patched input goes through the model, and
the drop in the log-probability of the class is that patch's evidence; a pixel gets the mean over the
patches that cover it. Chosen over Grad-CAM on the last convolutional block because

- it needs nothing of the network but its output: the same code explains ResNet-18, every MobileNet and
  any backbone added later, with no per-architecture choice of a "last block";
- its resolution is the patch's (about 1/16 of the mel bands and 1/20 of the window), where Grad-CAM's is
  the last block's: 1/32 of the input, 4 of 128 mel bands for ``mn04_as``, too coarse to tell which
  harmonic or which band carried the evidence;
- it measures what removing a region does to the answer, rather than a gradient, which saturates when the
  model is sure (a score of 0.999 has almost no gradient left);
- the price, one forward pass per patch position (a few hundred, batched), is seconds on a CPU per clip.

Lowering a patch to the band's median (not to silence) removes what stands out of the clip's background
without adding an edge the model never saw: a steady background scores zero, and the map shows the events.
It never raises a patch: a quiet stretch in a loud clip would otherwise be filled with sound, and the model's
reaction to that added sound would be drawn as evidence where there was none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .audio import default_hop, fix_length, load_audio, window_starts
from .errors import AudioclfError
from .features import LogMel
from .model import activation
from .options import PredictOptions

MIN_PROB = 1e-12  # log of a probability: a zero would give -inf


def _window(clf, wave: np.ndarray, label: Optional[str]) -> tuple[int, int, int]:
    """``(start sample, class index, window samples)``: the class (``label``, else the one the model predicts
    for the whole recording, as ``predict`` does) and the window where the model gives it the highest score."""
    f = clf.config.features
    window = f.window_samples(f.duration_s, "duration_s")
    starts = window_starts(len(wave), window, default_hop(window))  # predict's windows
    windows = np.stack([fix_length(wave[s:s + window], window) for s in starts])
    probs = np.asarray(clf.predict_proba(list(windows), f.sample_rate))  # (windows, classes)
    if label is None:
        target = int(probs.mean(axis=0).argmax())
    elif label in clf.labels:
        target = clf.labels.index(label)
    else:
        raise AudioclfError(f"--label {label!r} is not one of the model's classes: {', '.join(clf.labels)}")
    return starts[int(probs[:, target].argmax())], target, window


def occlusion_map(model: torch.nn.Module, features: torch.Tensor, target: int, *, task: str = "multiclass",
                  patch: Optional[tuple[int, int]] = None, batch_size: int = 32) -> tuple[np.ndarray, float]:
    """The occlusion map of class ``target`` on one input.

    Args:
        model (nn.Module): the network, ``(batch, n_mels, frames)`` features -> ``(batch, classes)`` logits.
        features (Tensor): ``(n_mels, frames)`` one window's features, on the model's device.
        target (int): the class to explain.
        task (str, optional): ``multiclass`` or ``multilabel``: softmax or sigmoid scores. (Default: ``"multiclass"``)
        patch (tuple of int, optional): ``(mel bands, frames)`` of a patch; patches overlap by half. (Default:
            1/16 of the bands and 1/20 of the frames, at least 2 of each)
        batch_size (int, optional): patched inputs per forward pass. (Default: ``32``)

    Returns:
        tuple: ``(map, score)``: the ``(n_mels, frames)`` map (the drop in the class's log-probability; > 0 is
        evidence for the class) and the class's score on the whole window.
    """
    n_mels, frames = features.shape
    ph, pw = patch or (max(2, n_mels // 16), max(2, frames // 20))
    ph, pw = min(ph, n_mels), min(pw, frames)
    rows = sorted({*range(0, n_mels - ph + 1, max(1, ph // 2)), n_mels - ph})  # the last patch reaches the edge
    cols = sorted({*range(0, frames - pw + 1, max(1, pw // 2)), frames - pw})
    fill = features.median(dim=1, keepdim=True).values.expand(-1, frames)  # (n_mels, frames): the background
    score = activation(task)

    def log_prob(x: torch.Tensor) -> torch.Tensor:  # (batch, n_mels, frames) -> (batch,)
        return score(model(x))[:, target].clamp_min(MIN_PROB).log()

    positions = [(r, c) for r in rows for c in cols]
    total, count = torch.zeros_like(features), torch.zeros_like(features)
    with torch.inference_mode():
        base = log_prob(features[None])[0]
        for i in range(0, len(positions), batch_size):
            chunk = positions[i:i + batch_size]
            x = features.repeat(len(chunk), 1, 1)
            for k, (r, c) in enumerate(chunk):
                x[k, r:r + ph, c:c + pw] = torch.minimum(x[k, r:r + ph, c:c + pw], fill[r:r + ph, c:c + pw])
            drops = base - log_prob(x)
            for (r, c), d in zip(chunk, drops):
                total[r:r + ph, c:c + pw] += d
                count[r:r + ph, c:c + pw] += 1
    return (total / count.clamp_min(1)).cpu().numpy(), float(base.exp())


def explain(model, path, *, label: Optional[str] = None, device: str = PredictOptions.device,
            batch_size: int = PredictOptions.batch_size) -> dict:
    """Explain a model's answer for one audio file.

    Args:
        model (str, Path or Classifier): a run directory, ``.pt`` checkpoint or safetensors export, or a loaded
            :class:`audioclf.predict.Classifier`.
        path (str or Path): the audio file.
        label (str, optional): the class to explain. (Default: the class the model predicts)
        device (str, optional): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. (Default: ``"auto"``)
        batch_size (int, optional): patched inputs per forward pass. (Default: ``32``)

    A recording longer than the model's window is explained in the window where the class scores highest.

    Returns:
        dict: ``label``, ``score`` (the class's score in that window), ``map`` and ``features`` (both
        ``(n_mels, frames)``), ``start_s`` and ``window_s`` of the window, ``band_hz`` (each mel band's centre
        frequency) and ``path``.
    """
    from .predict import Classifier, load

    clf = model if isinstance(model, Classifier) else load(model, device, batch_size=batch_size)
    f = clf.config.features
    wave = load_audio(path, f.sample_rate)
    start, target, window = _window(clf, wave, label)
    logmel = LogMel(f).to(clf.device)
    x = logmel(torch.from_numpy(fix_length(wave[start:start + window], window)).to(clf.device))
    heat, score = occlusion_map(clf.model, x, target, task=clf.config.train.task, batch_size=batch_size)
    fb = logmel.mel.fb.cpu().numpy()  # (n_mels, n_freq)
    return {"label": clf.labels[target], "score": score, "map": heat, "features": x.cpu().numpy(),
            "start_s": start / f.sample_rate, "window_s": window / f.sample_rate,
            "band_hz": fb.argmax(axis=1) * f.sample_rate / f.n_fft, "path": str(path)}


def plot_explanation(result: dict, out) -> Path:
    """Draw ``result`` (:func:`explain`) as a PNG: the log-mel in grey, the evidence for the class over it in
    colour (drawn where it is positive), the class and its score in the title."""
    from matplotlib.figure import Figure

    x, heat = result["features"], result["map"]
    n_mels = x.shape[0]
    extent = (result["start_s"], result["start_s"] + result["window_s"], 0, n_mels)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(x, origin="lower", aspect="auto", cmap="gray", extent=extent)
    evidence = np.ma.masked_less_equal(heat, 0)
    shown = ax.imshow(evidence, origin="lower", aspect="auto", cmap="inferno", alpha=0.6, extent=extent,
                      vmin=0, vmax=max(float(heat.max()), 1e-6))
    ticks = np.linspace(0, n_mels - 1, 6).round().astype(int)
    ax.set_yticks(ticks + 0.5, [f"{result['band_hz'][t]:.0f}" for t in ticks])
    ax.set(xlabel="time (s)", ylabel="mel band centre (Hz)",
           title=f"{result['label']}: {result['score']:.2f}    {Path(result['path']).name}")
    fig.colorbar(shown, ax=ax, label=f"evidence for {result['label']} (drop in log-probability when occluded)")
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out
