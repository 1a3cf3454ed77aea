"""``audioclf predict`` against hostile input: an --out that is an input or cannot be written, file names
that are not UTF-8, stdin, URLs, unreadable files."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import soundfile as sf
from _models import tiny_run  # noqa: F401 (a fixture)
from _serving import clip

import audioclf
from audioclf import predict
from audioclf.cli import main
from audioclf.commands import predict as predict_command
from audioclf.config import AudioclfError

NOBODY = 65534


@pytest.fixture(scope="module")
def clf(tiny_run):
    return audioclf.load(tiny_run.run_dir, device="cpu")


@pytest.fixture
def tone_wav(tiny_run) -> Path:
    return tiny_run.data_dir / "tone" / "tone_000.wav"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if predict gets as far as loading the model."""
    monkeypatch.setattr(predict_command, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------------------------------------- --out

def test_out_that_is_an_input_is_refused_and_the_input_kept(tiny_run, tmp_path, tone_wav, capsys, no_model):
    audio = tmp_path / "clip.csv"  # audio under a name --out accepts
    audio.write_bytes(tone_wav.read_bytes())
    before = audio.read_bytes()
    assert main(["predict", str(tiny_run.run_dir), str(audio), "--out", str(audio)]) == 2
    one_line_error(capsys, f"--out {audio} is also an input")
    # the same file by another name: a relative path, a symlink, a path inside a list file
    link = tmp_path / "link.csv"
    link.symlink_to(audio)
    listing = tmp_path / "files.txt"
    listing.write_text("clip.csv\n")
    for args in (["clip.csv", "--out", str(audio)], [str(audio), "--out", str(link)], [str(listing), "--out", str(audio)]):
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert main(["predict", str(tiny_run.run_dir), *args]) == 2
        finally:
            os.chdir(cwd)
        one_line_error(capsys, "is also an input")
    assert audio.read_bytes() == before


@pytest.mark.parametrize("where, says", [("/nonexistent/x.csv", "the folder /nonexistent does not exist"),
                                         ("{tmp}/afile/x.csv", "does not exist (it is a file)"),
                                         ("{tmp}/folder.csv", "is a folder")])
def test_out_that_cannot_be_written_is_one_line_before_the_model_loads(tiny_run, tmp_path, tone_wav, capsys, no_model,
                                                                       where, says):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.csv").mkdir()
    out = where.format(tmp=tmp_path)
    assert main(["predict", str(tiny_run.run_dir), str(tone_wav), "--out", out]) == 2
    one_line_error(capsys, out, says)


def test_out_is_written_atomically(tiny_run, tmp_path, tone_wav, monkeypatch):
    out = tmp_path / "preds.csv"
    out.write_text("previous results\n")

    def broken(*a, **k):
        yield {"path": str(tone_wav), "error": None, "label": "tone", "confidence": 1.0, "top_k": []}
        raise KeyboardInterrupt

    monkeypatch.setattr(predict.Classifier, "classify_files", broken)
    assert main(["predict", str(tiny_run.run_dir), str(tone_wav), "--out", str(out), "--quiet"]) == 130
    assert out.read_text() == "previous results\n"  # not a half-written file
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]


# ---------------------------------------------------------------------------------------------- odd names

@pytest.mark.parametrize("suffix", [".csv", ".json", ""])
def test_a_name_that_is_not_utf8_keeps_every_row(tiny_run, tmp_path, tone_wav, capsys, caplog, suffix):
    folder = tmp_path / "in"
    folder.mkdir()
    odd = Path(os.fsdecode(bytes(folder) + b"/caf\xe9.wav"))  # Latin-1 bytes: not UTF-8
    odd.write_bytes(tone_wav.read_bytes())
    (folder / "good.wav").write_bytes(tone_wav.read_bytes())
    out = tmp_path / f"preds{suffix}"
    assert main(["predict", str(tiny_run.run_dir), str(folder), "--quiet", *(["--out", str(out)] if suffix else [])]) == 0
    text = out.read_text(encoding="utf-8") if suffix else capsys.readouterr().out
    rows = json.loads(text) if suffix == ".json" else rows_of(text)
    assert len(rows) == 2
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert set(by_name) == {"caf\\xe9.wav", "good.wav"}
    assert by_name["good.wav"]["label"] == "tone"
    assert by_name["caf\\xe9.wav"]["label"] == "tone" or by_name["caf\\xe9.wav"]["error"]  # classified, or said why
    assert "not valid UTF-8" in caplog.text


# ---------------------------------------------------------------------------------------------- stdin, URLs

class _Stdin(io.TextIOWrapper):
    def __init__(self, data: bytes, tty: bool = False):
        super().__init__(io.BytesIO(data))
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("arg, fmt", [("-", "WAV"), ("/dev/stdin", "FLAC")])
def test_audio_from_stdin(tiny_run, tmp_path, monkeypatch, arg, fmt):
    buf = io.BytesIO()
    sf.write(buf, clip("tone"), 16000, format=fmt)
    monkeypatch.setattr("sys.stdin", _Stdin(buf.getvalue()))
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_run.run_dir), arg, "--out", str(out), "--quiet"]) == 0
    (row,) = rows_of(out.read_text())
    assert row["path"] == arg and row["label"] == "tone" and row["error"] == ""


def test_stdin_problems_are_one_line(tiny_run, tmp_path, tone_wav, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Stdin(b"", tty=True))
    assert main(["predict", str(tiny_run.run_dir), "-"]) == 2
    one_line_error(capsys, "stdin is a terminal")
    monkeypatch.setattr("sys.stdin", _Stdin(b""))
    assert main(["predict", str(tiny_run.run_dir), "-", "/dev/stdin"]) == 2
    one_line_error(capsys, "can be read once")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_run.run_dir), "-", str(tone_wav), "--out", str(out), "--quiet"]) == 0
    rows = rows_of(out.read_text())
    assert rows[0]["path"] == "-" and "empty" in rows[0]["error"] and "audioclf-stdin" not in rows[0]["error"]
    assert rows[1]["label"] == "tone"


@pytest.mark.parametrize("url", ["http://example.com/a.wav", "https://example.com/b.flac", "s3://bucket/c.wav"])
def test_urls_are_not_supported(tiny_run, tmp_path, capsys, no_model, url):
    assert main(["predict", str(tiny_run.run_dir), url]) == 2
    one_line_error(capsys, url, "URLs are not supported")
    listing = tmp_path / "files.txt"
    listing.write_text(f"# inputs\n{url}\n")
    assert main(["predict", str(tiny_run.run_dir), str(listing)]) == 2
    one_line_error(capsys, url, f"line 2 of {listing}", "URLs are not supported")


# ---------------------------------------------------------------------------------------------- permissions

@contextmanager
def unreadable(path: Path):
    """``path`` with no read permission; as root (who reads anything) also run as nobody meanwhile."""
    path.chmod(0)
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(NOBODY)
    try:
        yield path
    finally:
        if as_root:
            os.seteuid(0)
        path.chmod(0o644)


def test_a_file_without_read_permission_is_reported_as_such(clf, tone_wav):
    with tempfile.TemporaryDirectory() as tmp:  # in the system temp folder, which nobody may traverse
        folder = Path(tmp)
        folder.chmod(0o755)
        path = folder / "locked.wav"
        path.write_bytes(tone_wav.read_bytes())
        with unreadable(path):
            (result,) = clf.classify_files([path])
            with pytest.raises(AudioclfError, match="permission denied"):
                clf.classify(path)
        assert "permission denied" in result["error"] and "locked.wav" in result["error"]
        assert clf.classify(path)["label"] == "tone"  # readable again


# ---------------------------------------------------------------------------------------------- issue 21

def test_poor_messages_truncated_wav_is_an_error_for_that_file(tiny_run, tmp_path, capsys):
    full = (tiny_run.data_dir / "tone" / "tone_000.wav").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full[:3000])  # the header still declares a whole second
    aiff = tmp_path / "cut.aiff"
    sf.write(aiff, clip("tone"), 16000)
    aiff.write_bytes(aiff.read_bytes()[:5000])
    assert main(["predict", str(tiny_run.run_dir), str(cut), str(aiff), "--quiet"]) == 1
    rows = rows_of(capsys.readouterr().out)
    assert all(r["error"].startswith(f"{r['path']}: truncated: its header declares") for r in rows), rows


def test_non_finite_features_are_an_error_for_that_file_cli_and_api(tiny_run, tmp_path, capsys):
    import numpy as np
    import torch

    from audioclf.checkpoint import save_checkpoint

    ckpt = torch.load(tiny_run.run_dir / "best.pt", weights_only=True)
    ckpt["config"]["features"]["peak_normalize"] = False  # as trained without it: the samples reach the features
    model = tmp_path / "loud.pt"
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "audioclf_version")}, model)
    huge = np.full(16000, 1e30, np.float32)
    huge[::2] *= -1
    path = tmp_path / "huge.wav"
    sf.write(path, huge, 16000, subtype="FLOAT")
    tone_wav = tiny_run.data_dir / "tone" / "tone_000.wav"
    assert main(["predict", str(model), str(path), str(tone_wav), "--quiet"]) == 0
    cap = capsys.readouterr()
    bad, good = rows_of(cap.out)
    assert "its features or the model's output are not finite" in bad["error"] and not bad["confidence"]
    assert good["label"] == "tone" and not good["error"]
    clf = audioclf.load(model, device="cpu")
    with pytest.raises(AudioclfError, match="its features or the model's output are not finite"):
        clf.classify(path)
    with pytest.raises(AudioclfError, match="its features or the model's output are not finite"):
        clf.predict_proba(huge, 16000)


def test_embed_of_a_missing_file_is_an_error_not_a_nan_row(tiny_run, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    tone_wav = tiny_run.data_dir / "tone" / "tone_000.wav"
    assert main(["embed", str(tiny_run.run_dir), str(tone_wav), str(tmp_path / "missing.wav"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 input(s) are not files, e.g." in err and "missing.wav" in err, err
    assert not out.exists()


def test_undecodable_names_differing_only_in_their_bytes_stay_distinct(tiny_run, tmp_path, capsys, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="audioclf")
    folder = tmp_path / "in"
    folder.mkdir()
    names = [b"a\xff.wav", b"a\xfe.wav", b"a\\xff.wav", b"a\\\xff.wav"]  # the last two print alike unless escaped
    for name in names:
        shutil.copy(tiny_run.data_dir / "tone" / "tone_000.wav", os.fsencode(folder) + b"/" + name)
    out = tmp_path / "out"
    assert main(["predict", str(tiny_run.run_dir), str(folder), "--out", str(out), "--quiet"]) == 0
    rows = rows_of((out / "predictions.csv").read_text())
    assert len({r["path"] for r in rows}) == len(rows) == 4, rows
    assert "4 classified now" in caplog.text
    assert main(["predict", str(tiny_run.run_dir), str(folder), "--quiet"]) == 0
    assert len({r["path"] for r in rows_of(capsys.readouterr().out)}) == 4


def test_silently_wrong_parts_carry_their_options_and_are_checked_on_merge(tiny_run, tmp_path, capsys):
    wav = tiny_run.data_dir / "tone" / "tone_000.wav"
    out = tmp_path / "out"
    assert main(["predict", str(tiny_run.run_dir), str(wav), "--out", str(out), "--quiet"]) == 0
    (out / "options.json").unlink()  # the folder's record is gone: each part still knows its options
    assert main(["predict", str(tiny_run.run_dir), str(wav), "--out", str(out), "--quiet", "--top-k", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with other options: top_k=2 (the part has 3)" in err, err
    part = next((out / "parts").glob("part-*.csv"))
    part.write_text(part.read_text().replace(',"tone",', ',"=evil",'))  # a label that is not a model class
    assert main(["predict", str(tiny_run.run_dir), str(wav), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has the label '=evil', not one of the model's classes" in err, err
    part.write_text("".join(part.read_text().splitlines(keepends=True)[1:]))  # a part with no options at all
    assert main(["predict", str(tiny_run.run_dir), str(wav), "--out", str(out), "--quiet"]) == 2
    assert "holds no record of the options it was made with" in capsys.readouterr().err


def test_poor_messages_torchrun_reports_our_message_as_the_root_cause(tiny_run, tmp_path, tone_wav, monkeypatch, capsys,
                                                                      no_model):
    # torchrun names in TORCHELASTIC_ERROR_FILE where its failure report reads a process's root cause from;
    # tests/test_predict_distributed.py runs the real torchrun
    error_file = tmp_path / "error.json"
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_ERROR_FILE": str(error_file)}.items():
        monkeypatch.setenv(k, v)
    assert main(["predict", str(tiny_run.run_dir), str(tone_wav), "--out", str(tmp_path / "x.csv")]) == 2
    one_line_error(capsys, "give --out DIR")
    message = json.loads(error_file.read_text())["message"]
    assert "give --out DIR" in message["message"] and message["extraInfo"]["py_callstack"] == message["message"]
