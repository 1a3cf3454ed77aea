"""Hostile outputs (issue 21): every command that writes refuses, before its work and in one line, an output
it cannot write; no command writes over one of its inputs; CSV cells cannot become spreadsheet formulas."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from _models import tiny_run  # noqa: F401 (a fixture)
from test_hostile_predict import one_line_error

import audioclf.evaluate as evaluate_module
import audioclf.export as export_module
import audioclf.webdata as webdata_module
from audioclf.checkpoint import save_checkpoint
from audioclf.cli import main
from audioclf.commands import embed as embed_command
from audioclf.commands import predict as predict_command
from audioclf.config import AudioclfError
from audioclf.rundir import write_predictions


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as its work: loading the model, or reading the clips."""
    def fail(*a, **k):
        pytest.fail("the work began before the output was checked")

    for module, name in ((predict_command, "load"), (embed_command, "load"), (evaluate_module, "load"),
                         (export_module, "load_model"), (webdata_module, "_check_clips")):
        monkeypatch.setattr(module, name, fail)


# (where, what the message says): an output folder that cannot be made or written in
FOLDERS = [("{file}", "is a file"), ("{file}/sub", "is a file, so nothing can be written under it"),
           ("/proc/audioclf-out", "cannot write in the folder /proc")]
# the same for an output file
FILES = [("{file}/x.{ext}", "(it is a file)"), ("/proc/x.{ext}", "cannot write in the folder /proc"),
         ("{folder}", "is a folder")]


def _command(name: str, run, data, wav, out: str) -> list[str]:
    return {"shard": ["shard", str(data), "--out", out],
            "export": ["export", str(run), "--out-format", "safetensors", "--out", out],
            "evaluate": ["evaluate", str(run), str(data), "--out", out],
            "predict-dir": ["predict", str(run), str(wav), "--out", out],
            "predict": ["predict", str(run), str(wav), "--out", out],
            "embed": ["embed", str(run), str(wav), "--out", out]}[name]


@pytest.mark.parametrize("command, kind", [("shard", FOLDERS), ("export", FOLDERS), ("evaluate", FOLDERS),
                                           ("predict-dir", FOLDERS), ("predict", FILES), ("embed", FILES)])
def test_outputs_that_cannot_be_written(tiny_run, tmp_path, capsys, no_work, command, kind):
    ext = "npy" if command == "embed" else "csv"
    (tmp_path / "afile").write_text("x")
    (tmp_path / f"folder.{ext}").mkdir()
    wav = tiny_run.data_dir / "tone" / "tone_000.wav"
    for where, says in kind:
        out = where.format(file=tmp_path / "afile", folder=tmp_path / f"folder.{ext}", ext=ext)
        assert main(_command(command, tiny_run.run_dir, tiny_run.data_dir, wav, out)) == 2, out
        one_line_error(capsys, out, says)


def test_outputs_that_cannot_be_written_check_output_itself(tmp_path):
    from audioclf.fileio import check_output

    (tmp_path / "afile").write_text("x")
    assert check_output(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not made
    assert not list(tmp_path.glob(".audioclf-probe-*"))  # the probe is gone
    with pytest.raises(AudioclfError, match="is also an input"):
        check_output(tmp_path / "afile", inputs=[tmp_path / "." / "afile"])


# ------------------------------------------------------------------------------------------ data loss

def test_data_loss_embed_never_writes_over_its_list_of_paths(tiny_run, tmp_path, capsys, no_work):
    listing = tmp_path / "my.paths.txt"
    listing.write_text(f"{tiny_run.data_dir / 'tone' / 'tone_000.wav'}\n")
    before = listing.read_bytes()
    assert main(["embed", str(tiny_run.run_dir), str(listing), "--out", str(tmp_path / "my.npy")]) == 2
    one_line_error(capsys, "my.paths.txt", "is also an input")
    assert listing.read_bytes() == before


def test_data_loss_export_never_writes_over_the_export_it_reads(tiny_run, tmp_path, capsys):
    pytest.importorskip("safetensors")
    first = tmp_path / "exp"
    assert main(["export", str(tiny_run.run_dir), "--out-format", "safetensors", "--out", str(first)]) == 0
    capsys.readouterr()
    before = (first / "model.safetensors").read_bytes()
    assert main(["export", str(first), "--out-format", "safetensors", "--out", str(first)]) == 2
    one_line_error(capsys, "is also an input")
    assert (first / "model.safetensors").read_bytes() == before


# ------------------------------------------------------------------------------------------ formulas

FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+1", "@SUM(A1)"]


def test_poor_messages_csv_formula_injection_cells(tmp_path):
    from audioclf.fileio import csv_cell

    assert [csv_cell(v) for v in FORMULAS] == ["'" + v for v in FORMULAS]
    assert [csv_cell(v) for v in ("-0.5", "tone", "", 3)] == ["-0.5", "tone", "", 3]  # numbers stay numbers
    out = tmp_path / "p.csv"
    write_predictions(out, [("-x.wav", FORMULAS[0], FORMULAS[1], 0.5)])
    row = next(csv.DictReader(out.open()))
    assert row["path"] == "'-x.wav" and row["true"] == "'" + FORMULAS[0] and row["predicted"] == "'" + FORMULAS[1]


def test_poor_messages_csv_formula_injection_predict(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run.run_dir / "best.pt", weights_only=True)
    ckpt["labels"] = FORMULAS
    model = tmp_path / "formulas.pt"
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "audioclf_version")}, model)
    wav = tiny_run.data_dir / "tone" / "tone_000.wav"
    for out in (tmp_path / "x.csv", tmp_path / "dir"):
        assert main(["predict", str(model), str(wav), "--out", str(out), "--quiet"]) == 0
        text = (out if out.suffix else out / "predictions.csv").read_text()
        row = next(csv.DictReader(io.StringIO(text)))
        assert row["label"].startswith("'") and row["label"][1:] in FORMULAS, text
        assert not any(cell.startswith(("=", "+", "@")) for line in csv.reader(io.StringIO(text)) for cell in line)
