import argparse
import json
import os
import re

import pytest
import torch

import audioclf
from audioclf.checkpoint import (EXPORT_FORMAT, FORMAT, inference_state, load_checkpoint, load_model,
                                 model_from_checkpoint, resolve_checkpoint, save_checkpoint)
from audioclf.config import AudioclfError, FeatureConfig, ModelConfig, RunConfig
from audioclf.model import AudioResNet

LABELS = ["chirp", "noise", "tone"]


@pytest.fixture(scope="module")
def trained():
    """A model with non-default normalisation statistics and a config that differs from the defaults."""
    torch.manual_seed(0)
    config = RunConfig(features=FeatureConfig(sample_rate=16000, n_mels=32, duration_s=1.0),
                       model=ModelConfig(pretrained="none", dropout=0.1))
    model = AudioResNet(len(LABELS), n_mels=32, dropout=0.1, pooling="mean")
    model.norm.mean.uniform_(1, 2)
    model.norm.std.uniform_(0.5, 3)
    return model.eval(), config


def test_round_trip_through_a_run_dir(tmp_path, trained):
    model, config = trained
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 32, 20)).sum().backward()
    opt.step()
    extra = {"optimizer": opt.state_dict(), "epoch": 3, "best_val_loss": 0.25}
    save_checkpoint(inference_state(model, config, LABELS, extra), tmp_path / "run" / "best.pt")

    # Plain tensors and builtins only: the safe loader reads it.
    raw = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["audioclf_version"] == audioclf.__version__

    ckpt = load_checkpoint(tmp_path / "run")  # a run directory means its best.pt
    assert ckpt["epoch"] == 3 and ckpt["labels"] == LABELS and ckpt["config"] == config.to_dict()
    assert ckpt["optimizer"]["state"]  # the optimizer moments are there

    restored, restored_config, labels = model_from_checkpoint(ckpt)
    assert restored_config == config and labels == LABELS and not restored.training
    assert torch.equal(restored.norm.mean, model.norm.mean)
    x = torch.rand(2, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
    # The architecture comes from the checkpoint: 32 mels, 3 classes.
    assert restored.norm.mean.shape == (32, 1) and restored.backbone.fc[-1].out_features == 3

    m2, c2, l2 = load_model(tmp_path / "run" / "best.pt")
    assert c2 == config and l2 == LABELS


def test_save_is_atomic_when_writing_fails(tmp_path, trained, monkeypatch):
    model, config = trained
    path = tmp_path / "best.pt"
    save_checkpoint(inference_state(model, config, LABELS, {"epoch": 1}), path)
    before = path.read_bytes()
    real_save = torch.save

    def half_write(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(inference_state(model, config, LABELS, {"epoch": 2}), path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no temp file left behind

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst)))
    save_checkpoint(inference_state(model, config, LABELS, {"epoch": 3}), path)
    (src, dst), = replaced
    assert os.path.dirname(src) == os.path.dirname(dst) and src != dst  # temp file in the same folder
    assert load_checkpoint(path)["epoch"] == 3


def test_bare_state_dict_is_refused(tmp_path, trained):
    torch.save(trained[0].state_dict(), tmp_path / "weights.pt")
    with pytest.raises(AudioclfError, match="weights.pt: not an audioclf checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")


def test_future_format_asks_for_an_upgrade(tmp_path, trained):
    state = inference_state(*trained, LABELS)
    torch.save({**state, "format": FORMAT + 1, "audioclf_version": "9.0.0"}, tmp_path / "new.pt")
    with pytest.raises(AudioclfError, match=f"format {FORMAT + 1} was written by audioclf 9.0.0.*Upgrade audioclf"):
        load_checkpoint(tmp_path / "new.pt")


def test_one_version_check_for_checkpoints_and_exports(tmp_path, trained):
    """A checkpoint and a safetensors export from a newer audioclf are refused with the same words."""
    pytest.importorskip("safetensors")
    from audioclf.export import export

    state = inference_state(*trained, LABELS)
    pt = tmp_path / "new.pt"
    torch.save({**state, "format": FORMAT + 1, "audioclf_version": "9.0.0"}, pt)
    save_checkpoint(state, tmp_path / "best.pt")
    folder = tmp_path / "export"
    export(tmp_path / "best.pt", "safetensors", folder)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "format_version": EXPORT_FORMAT + 1,
                                                    "audioclf_version": "9.0.0"}))
    # one template, only the file and the numbers differ
    for path, source, newest in [(pt, pt, FORMAT), (folder, folder / "config.json", EXPORT_FORMAT)]:
        with pytest.raises(AudioclfError) as e:
            load_model(path)
        assert str(e.value) == (f"{source}: format {newest + 1} was written by audioclf 9.0.0; this is audioclf "
                                f"{audioclf.__version__}, which reads formats up to {newest}. "
                                f"Upgrade audioclf to read it.")


@pytest.mark.parametrize("fmt", ["1", 0, 1.0, True, None])
def test_a_format_that_is_not_a_whole_number_is_refused(tmp_path, trained, fmt):
    torch.save({**inference_state(*trained, LABELS), "format": fmt}, tmp_path / "odd.pt")
    with pytest.raises(AudioclfError, match=re.escape(f"odd.pt: format={fmt!r} must be a whole number >= 1")):
        load_checkpoint(tmp_path / "odd.pt")


@pytest.mark.parametrize("content", [b"", b"hello, this is text", os.urandom(512), b"PK\x03\x04cut"])
def test_unreadable_file_is_refused_with_its_name(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(AudioclfError, match="model.pt: not a readable audioclf checkpoint"):
        load_checkpoint(path)


def test_pickled_objects_are_not_loaded(tmp_path, trained):
    state = inference_state(*trained, LABELS)
    torch.save({"format": FORMAT, **state, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(AudioclfError, match=r"pickled.pt: holds Python objects \(argparse.Namespace\)"):
        load_checkpoint(tmp_path / "pickled.pt")


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(AudioclfError, match="no best.pt in this folder"):
        resolve_checkpoint(run)
    (run / "best.pt").write_bytes(b"x")
    (run / "last.pt").write_bytes(b"x")
    assert resolve_checkpoint(run) == run / "best.pt"
    assert resolve_checkpoint(run / "last.pt") == run / "last.pt"
    with pytest.raises(AudioclfError, match="nothing.pt: no such model file or run directory"):
        resolve_checkpoint(tmp_path / "nothing.pt")


def test_inference_state_is_detached_and_on_cpu(trained):
    state = inference_state(*trained, LABELS, {"epoch": 0})
    assert all(not t.requires_grad and t.device.type == "cpu" for t in state["model"].values())
    assert state["config"]["features"]["n_mels"] == 32 and state["epoch"] == 0
    assert set(state) == {"config", "labels", "model", "epoch"}
