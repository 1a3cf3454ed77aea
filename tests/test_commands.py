"""The command bodies in ``audioclf.commands``, called as functions with keyword arguments (the CLI tests in
test_predict.py and test_hostile_predict.py go through ``audioclf.cli.main``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from _models import tiny_run  # noqa: F401 (a fixture)
from _serving import clip

from audioclf.cli import main
from audioclf.commands import embed as embed_command
from audioclf.commands.embed import run_embed
from audioclf.commands.predict import collect_paths, run_predict
from audioclf.config import AudioclfError


def test_run_predict_takes_the_options_as_keywords(tiny_run, tmp_path, capsys):
    wave = np.concatenate([clip("tone", 0), clip("noise", 1)])  # 2 s
    sf.write(tmp_path / "two.wav", wave, 16000)
    out = tmp_path / "preds.json"
    assert run_predict(tiny_run.run_dir, [str(tmp_path / "two.wav")], out=str(out), window_s=0.5, hop_s=0.5,
                       timeline=True, top_k=2, device="cpu", quiet=True) == 0
    (item,) = json.loads(out.read_text())
    assert [(w["start_s"], w["end_s"]) for w in item["windows"]] == [(0, 0.5), (0.5, 1), (1, 1.5), (1.5, 2)]
    assert len(item["top_k"]) == 2 and item["error"] is None
    assert capsys.readouterr().out == ""  # with out, nothing on stdout

    assert run_predict(tiny_run.run_dir, [str(tmp_path / "two.wav")], submission=True, device="cpu", quiet=True) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("two.wav,")


def test_run_predict_exit_code_is_1_only_when_every_file_failed(tiny_run, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    assert run_predict(tiny_run.run_dir, [str(tmp_path / "bad.wav")], out=str(tmp_path / "p.csv"), quiet=True) == 1


def test_collect_paths_expands_folders_and_lists(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.wav", "a/y.FLAC", "a/notes.md"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# mine\n\na/x.wav\nelsewhere.wav\n")
    assert collect_paths([tmp_path / "a", tmp_path / "list.txt"]) == [
        tmp_path / "a/x.wav", tmp_path / "a/y.FLAC", tmp_path / "a/x.wav", tmp_path / "elsewhere.wav"]
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(AudioclfError, match="no audio files"):
        collect_paths([tmp_path / "empty.txt"])


@pytest.mark.parametrize("out, says", [("emb.csv", "a .npy or .parquet file"), ("missing/emb.npy", "does not exist")])
def test_run_embed_refuses_an_out_before_the_model_loads(tmp_path, monkeypatch, out, says):
    monkeypatch.setattr(embed_command, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    with pytest.raises(AudioclfError, match=says):
        run_embed("no-model", [str(tmp_path)], out=tmp_path / out)


def test_embed_command_reports_what_it_wrote(tiny_run, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert main(["embed", str(tiny_run.run_dir), str(tiny_run.data_dir / "tone"), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"12 embeddings of dimension 512: {out}"
    assert np.load(out).shape == (12, 512)
    assert len((tmp_path / "emb.paths.txt").read_text().splitlines()) == 12
