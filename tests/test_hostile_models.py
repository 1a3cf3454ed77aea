"""Saved models whose parts disagree: a checkpoint or safetensors export whose config, labels and weights
do not belong together is refused with a one-line message, never used; a run directory and an export in
one folder are never confused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from audioclf.checkpoint import CHECKPOINT_BOUND_KEY, _config_digest, load_model
from audioclf.cli import main
from audioclf.config import AudioclfError
from audioclf.export import export

from _serving import LABELS, clip, model_path, safetensors_dir, wav_bytes  # noqa: F401 (fixtures)


def tampered(model_path: Path, tmp_path: Path, change, rebind: bool = True) -> Path:
    """A copy of the checkpoint with ``change(ckpt_dict)`` applied; with ``rebind``, its config digest made
    again, as someone who knew the format would, so that the checks behind it are reached."""
    ckpt = torch.load(model_path, weights_only=True)
    change(ckpt)
    if rebind:
        ckpt[CHECKPOINT_BOUND_KEY] = _config_digest(ckpt)
    path = tmp_path / "tampered.pt"
    torch.save(ckpt, path)
    return path


def copy_export(safetensors_dir: Path, tmp_path: Path, change_meta=None) -> Path:
    out = tmp_path / "export"
    shutil.copytree(safetensors_dir, out)
    if change_meta:
        meta = json.loads((out / "config.json").read_text())
        change_meta(meta)
        (out / "config.json").write_text(json.dumps(meta))
    return out


def refused(path, *fragments):
    with pytest.raises(AudioclfError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------- checkpoints

def test_labels_that_do_not_fit_the_head_are_refused(model_path, tmp_path, capsys):
    path = tampered(model_path, tmp_path, lambda c: c.update(labels=LABELS[:3]))
    refused(path, str(path), "3 labels", "(5, 512) in the weights, (3, 512) for the config")
    wav = tmp_path / "clip.wav"
    wav.write_bytes(wav_bytes(clip("tone")))
    assert main(["predict", str(path), str(wav)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 labels" in err and "Traceback" not in err


def test_n_mels_that_do_not_fit_the_normalisation_are_refused(model_path, tmp_path):
    path = tampered(model_path, tmp_path, lambda c: c["config"]["features"].update(n_mels=64))
    refused(path, "n_mels=64", "norm.mean is (80, 1) in the weights, (64, 1) for the config")


@pytest.mark.parametrize("change, says", [
    (lambda c: c["model"].pop("norm.std"), "norm.std is missing"),
    (lambda c: c["model"].update({"extra.weight": torch.zeros(2)}), "extra.weight is not in the network"),
    (lambda c: c["model"].update({"norm.std": 3}), "norm.std is int in the weights"),
    (lambda c: c.update(model=[1, 2]), "the weights must be a state dict"),
    (lambda c: c.update(labels="chirp"), "labels must be a list"),
    (lambda c: c.update(labels=["a", "a", "a", "a", "a"]), "labels must be a list of at least 2 distinct"),
    (lambda c: c.update(config=[1, 2]), "its config must be a mapping"),
    (lambda c: c["config"]["features"].update(sample_rate="fast"), "its config is not valid"),
    (lambda c: c.pop("labels"), "no labels"),
])
def test_a_tampered_checkpoint_is_refused_with_one_line(model_path, tmp_path, change, says):
    path = tampered(model_path, tmp_path, change)
    refused(path, str(path), says)


# ---------------------------------------------------------------------------------------------- safetensors

def test_an_export_binds_its_weights_and_config(safetensors_dir, model_path):
    meta = json.loads((safetensors_dir / "config.json").read_text())
    assert len(meta["weights_sha256"]) == 64 and meta["format_version"] == 2
    model, config, labels = load_model(safetensors_dir)
    assert labels == LABELS and config.features.sample_rate == 16000


@pytest.mark.parametrize("change, says", [
    (lambda m: m["config"]["features"].update(sample_rate=22050),
     "features.sample_rate=22050 in config.json, 16000 in the weights"),
    (lambda m: m.update(labels=[*LABELS[:4], "dog"]), "labels="),
    (lambda m: m.pop("weights_sha256"), "weights_sha256 is missing"),
    (lambda m: m.pop("config"), "it must hold format, config and labels"),
    (lambda m: m.update(format_version="2"), "format_version='2' must be a whole number"),
    (lambda m: m.update(format="onnx"), "format='onnx', expected 'safetensors'"),
])
def test_an_edited_export_config_is_refused(safetensors_dir, tmp_path, change, says):
    refused(copy_export(safetensors_dir, tmp_path, change), says)


def test_replaced_weights_are_refused(safetensors_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = copy_export(safetensors_dir, tmp_path)
    torch.manual_seed(1)  # other weights of the same shapes: only the binding can tell
    weights = load_file(out / "model.safetensors")
    save_file({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()},
              out / "model.safetensors")
    refused(out, "sha256", "changed or replaced after export")
    wav = tmp_path / "clip.wav"
    wav.write_bytes(wav_bytes(clip("tone")))
    assert main(["predict", str(out), str(wav)]) == 2
    assert "changed or replaced" in capsys.readouterr().err


def test_an_older_export_without_binding_still_gets_its_shapes_checked(safetensors_dir, tmp_path):
    def older(meta):
        meta.update(format_version=1, labels=LABELS[:3])
        meta.pop("weights_sha256")

    refused(copy_export(safetensors_dir, tmp_path, older), "3 labels", "(5, 512) in the weights")


# ---------------------------------------------------------------------------------------------- which model

def test_an_export_in_a_run_directory_does_not_shadow_best_pt(model_path, safetensors_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model_path.parent, run)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(safetensors_dir / name, run / name)
    refused(run, "holds both best.pt", str(run / "best.pt"), str(run / "model.safetensors"))
    assert load_model(run / "best.pt")[2] == LABELS
    assert load_model(run / "model.safetensors")[2] == LABELS  # the export, named by its file
    with pytest.raises(AudioclfError, match="holds best.pt, a training run"):
        export(model_path, "safetensors", model_path.parent)
    assert not (model_path.parent / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- issue 21

def test_checkpoint_config_is_bound_to_the_weights(model_path, tmp_path):
    """An edited best.pt config (16 kHz -> 44.1 kHz) is refused, as an edited export's is."""
    for change in (lambda c: c["config"]["features"].update(sample_rate=44100), lambda c: c["labels"].reverse()):
        path = tampered(model_path, tmp_path, change, rebind=False)
        refused(path, str(path), "its config or labels were changed after it was saved")
    assert load_model(tampered(model_path, tmp_path, lambda c: None, rebind=False))[2] == LABELS


def test_checkpoint_truncated_last_pt_on_resume_says_so(model_path, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = model_path.read_bytes()
    (run / "last.pt").write_bytes(data[:len(data) // 2])
    assert main(["train", str(tmp_path), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt: not a readable audioclf checkpoint: truncated or damaged" in err, err
    assert "Errno" not in err


def test_checkpoint_malicious_pickle_message_never_suggests_an_unsafe_load(tmp_path, capsys):
    import os as os_module

    class Payload:
        def __reduce__(self):
            return os_module.system, ("true",)

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "config": {}, "labels": [], "model": Payload()}, path)
    from audioclf.fileio import torch_load  # what weights.load_state_dict reads with, past the hash check

    for load in (lambda: load_model(path), lambda: torch_load(path, "weights file")):
        with pytest.raises(AudioclfError) as e:
            load()
        message = str(e.value)
        assert "weights_only" not in message and "\n" not in message, message
        assert "holds Python objects (posix.system)" in message and "could run code" in message, message


def test_checkpoint_weights_given_a_folder_or_another_backbones_file(tmp_path, monkeypatch):
    from dataclasses import replace

    from audioclf import backbones, weights
    from audioclf.fileio import sha256

    with pytest.raises(AudioclfError, match=r"--weights .*: a folder; give the weights file itself \(mn04_as"):
        weights.weights_file("mn04_as", str(tmp_path))
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(1)}, other)
    # the file stands for mn10_as's official weights: its digest is the one pinned for mn10_as
    monkeypatch.setitem(backbones.BACKBONES, "mn10_as", replace(backbones.BACKBONES["mn10_as"], sha256=sha256(other)))
    monkeypatch.setattr(weights, "BACKBONES", backbones.BACKBONES)
    with pytest.raises(AudioclfError) as e:
        weights.weights_file("mn04_as", str(other))
    assert "the official weights of mn10_as, not of mn04_as; give --backbone mn10_as" in str(e.value)
    torch.save({"w": torch.ones(1)}, other)
    with pytest.raises(AudioclfError) as e:
        weights.weights_file("mn04_as", str(other))
    assert "another model's weights, or a damaged copy" in str(e.value) and "delete" not in str(e.value).lower()


def test_checkpoint_predict_on_an_onnx_export_says_what_to_do(tmp_path, capsys):
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "config.json").write_text(json.dumps({"format": "onnx", "config": {}, "labels": []}))
    wav = tmp_path / "a.wav"
    wav.write_bytes(wav_bytes(clip("tone")))
    assert main(["predict", str(folder), str(wav)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an ONNX export, which audioclf does not run" in err and "onnxruntime" in err, err
