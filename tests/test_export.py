"""Export: a safetensors folder loads back to identical predictions; ONNX matches PyTorch in onnxruntime."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import audioclf
from audioclf import export as export_module
from audioclf.checkpoint import load_model, load_safetensors
from audioclf.cli import main as cli_main
from audioclf.config import AudioclfError
from audioclf.export import export
from audioclf.fileio import FILE_MODE
from audioclf.features import LogMel
from audioclf.model import WaveformClassifier

from _serving import LABELS, SAMPLE_RATE, clip, model_path, safetensors_dir  # noqa: F401 (fixtures)

KINDS = ["tone", "noise", "chirp", "clicks"]


@pytest.fixture(scope="module")
def onnx_dir(model_path, tmp_path_factory) -> Path:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    out = tmp_path_factory.mktemp("onnx")
    assert export(model_path, "onnx", out) == out / "model.onnx"
    return out


def test_safetensors_folder_holds_weights_and_config(safetensors_dir, model_path):
    from safetensors.torch import load_file

    model, config, labels = load_model(model_path)
    weights = load_file(safetensors_dir / "model.safetensors")  # no pickle involved
    assert set(weights) == set(model.state_dict()) and {"norm.mean", "norm.std"} <= set(weights)
    meta = json.loads((safetensors_dir / "config.json").read_text())
    assert meta["format"] == "safetensors" and meta["labels"] == LABELS
    assert meta["audioclf_version"] == audioclf.__version__ and meta["config"] == config.to_dict()
    # the weights are as readable as config.json: the umask's mode, not the 0600 safetensors creates
    modes = {(safetensors_dir / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes == {FILE_MODE} and FILE_MODE & 0o044  # readable by others under the usual umask (022)


def test_safetensors_loads_to_identical_predictions(safetensors_dir, model_path):
    original, exported = load_model(model_path), load_model(safetensors_dir)
    assert exported[1] == original[1] and exported[2] == original[2]
    for (k, a), (k2, b) in zip(original[0].state_dict().items(), exported[0].state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not exported[0].training

    clf_pt, clf_st = audioclf.load(model_path, device="cpu"), audioclf.load(safetensors_dir, device="cpu")
    waves = [clip(kind, seed=i) for i, kind in enumerate(KINDS)] + [clip("warble", duration_s=3.0)]
    np.testing.assert_array_equal(clf_pt.predict_proba(waves), clf_st.predict_proba(waves))


def onnx_probs(onnx_dir: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x})[0]


def test_onnx_whole_graph_matches_pytorch(onnx_dir, model_path):
    meta = json.loads((onnx_dir / "config.json").read_text())
    model, config, labels = load_model(model_path)
    assert meta["format"] == "onnx" and meta["labels"] == labels and meta["opset"] >= 17
    # With torch >= 2.6 the dynamo exporter handles torch.stft, so the whole graph exports.
    assert meta["input"] == "waveform" and meta["input_shape"] == ["batch", config.features.n_samples]

    waves = np.stack([clip(kind, seed=i) for i, kind in enumerate(KINDS)])  # dynamic batch of 4
    got = onnx_probs(onnx_dir, waves)
    with torch.no_grad():
        want = WaveformClassifier(config.features, model)(torch.from_numpy(waves)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    clf = audioclf.load(model_path, device="cpu")  # and the Python API, clip by clip
    np.testing.assert_allclose(got, clf.predict_proba(list(waves), SAMPLE_RATE), atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_probs(onnx_dir, waves[:1]), want[:1], atol=1e-4, rtol=0)


def test_onnx_falls_back_to_logmel(model_path, tmp_path, monkeypatch, caplog):
    """When the waveform graph cannot be exported, log-mel -> probabilities is, with the feature config."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)

    class NoStft(WaveformClassifier):
        def forward(self, wave):
            raise RuntimeError("STFT is not supported")

    monkeypatch.setattr(export_module, "WaveformClassifier", NoStft)
    with caplog.at_level(logging.WARNING, logger="audioclf.export"):
        export(model_path, "onnx", tmp_path)
    assert "log-mel" in caplog.text
    meta = json.loads((tmp_path / "config.json").read_text())
    model, config, _ = load_model(model_path)
    f = config.features
    assert meta["input"] == "logmel" and meta["input_shape"] == ["batch", f.n_mels, f.n_frames]
    assert meta["config"]["features"] == config.to_dict()["features"]

    waves = torch.from_numpy(np.stack([clip(kind, seed=i) for i, kind in enumerate(KINDS[:3])]))
    with torch.no_grad():
        logmel = LogMel(f)(waves)
        want = torch.softmax(model(logmel), dim=-1).numpy()
    np.testing.assert_allclose(onnx_probs(tmp_path, logmel.numpy()), want, atol=1e-4, rtol=0)


def test_export_refusals(model_path, safetensors_dir, tmp_path):
    with pytest.raises(AudioclfError, match="format='tflite'"):
        export(model_path, "tflite", tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((safetensors_dir / "model.safetensors").read_bytes())
    with pytest.raises(AudioclfError, match="config.json"):
        load_model(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(AudioclfError, match="not valid JSON"):
        load_model(broken)
    meta = json.loads((safetensors_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(AudioclfError, match="Upgrade audioclf"):
        load_safetensors(broken)
    (broken / "config.json").write_text(json.dumps(meta))
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AudioclfError, match="not a readable safetensors file"):
        load_model(broken)


def test_cli_export_from_an_export(safetensors_dir, tmp_path, capsys):
    """An exported folder is itself a model path: the CLI exports it again, to the same weights."""
    from safetensors.torch import load_file

    assert cli_main(["export", str(safetensors_dir), "--out-format", "safetensors", "--out", str(tmp_path)]) == 0
    assert str(tmp_path / "model.safetensors") in capsys.readouterr().out
    again, first = load_file(tmp_path / "model.safetensors"), load_file(safetensors_dir / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_onnx_int8_is_smaller_and_close_to_fp32(onnx_dir, model_path, tmp_path, capsys):
    assert cli_main(["export", str(model_path), "--out-format", "onnx", "--quantize", "int8", "--out", str(tmp_path)]) == 0
    assert "exported onnx int8" in capsys.readouterr().out
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["quantize"] == "int8" and meta["input"] == "waveform" and 0 < meta["quantize_max_abs_diff"] < 0.1
    assert (tmp_path / "model.onnx").stat().st_size < 0.4 * (onnx_dir / "model.onnx").stat().st_size  # 4x fewer bytes a weight

    waves = np.stack([clip(kind, seed=i) for i, kind in enumerate(KINDS)])
    fp32, int8 = onnx_probs(onnx_dir, waves), onnx_probs(tmp_path, waves)
    np.testing.assert_allclose(int8.sum(axis=1), 1, atol=1e-4)
    assert 0 < np.abs(int8 - fp32).max() < 0.1  # quantized (not a copy), and still the same model
    assert not list(tmp_path.glob("*.fp32")) and not list(tmp_path.glob(".*tmp*"))  # no intermediate left behind
    import onnx

    nodes = onnx.load(str(tmp_path / "model.onnx")).graph.node
    front_end = [n.op_type for n in nodes if "logmel.mel.fb" in n.input]
    assert "ConvInteger" in {n.op_type for n in nodes} and front_end == ["MatMul"]  # the network quantized, not the mel filterbank


def test_quantize_is_for_onnx_only(model_path, tmp_path):
    with pytest.raises(AudioclfError, match="quantize=int8 is for ONNX"):
        export(model_path, "safetensors", tmp_path, quantize="int8")
    with pytest.raises(AudioclfError, match="quantize='int4'"):
        export(model_path, "onnx", tmp_path, quantize="int4")
