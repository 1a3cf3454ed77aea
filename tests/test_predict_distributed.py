"""``audioclf predict --out DIR``: the rows of ``--out x.csv``, written part by part so that a rerun resumes,
shared among torchrun's processes (two gloo processes on the CPU here), merged to CSV and Parquet."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import tiny_run  # noqa: F401 (a fixture)

from audioclf.cli import main
from audioclf.commands import embed as embed_command
from audioclf.commands import predict as predict_command
from audioclf.commands.parts import META, PartWriter, list_parts, part_path, read_part
from audioclf.commands.predict import timeline_path
from audioclf.commands.tables import is_number
from audioclf.config import AudioclfError
from audioclf.fileio import PARQUET_INSTALL
from audioclf.runtime import process_group

SRC = Path(__file__).resolve().parents[1] / "src"
SUMMARY = re.compile(r"(\d+) classified now, (\d+) skipped as done, (\d+) failed")
FIELDS = ["path", "label", "confidence", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3", "error"]
PART_FIELDS = FIELDS + ["start_s", "end_s", "prob"]  # a part's columns with --timeline


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory) -> Path:
    """13 files: 4 training clips of each class, and one that does not decode (sorted last, so the first
    rank gets it)."""
    folder = tmp_path_factory.mktemp("inputs")
    for label in tiny_run.labels:
        for i in range(4):
            shutil.copy(tiny_run.data_dir / label / f"{label}_{i:03d}.wav", folder)
    (folder / "zz_broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return folder


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(predict_command, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))


def predict(tiny_run, *args) -> int:
    return main(["predict", str(tiny_run.run_dir), *map(str, args), "--quiet", "--device", "cpu", "--batch-size", "4"])


def read_rows(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def summary(text: str) -> tuple[int, int, int]:
    """(classified now, skipped as done, failed) from the last summary line in ``text``."""
    *_, last = SUMMARY.findall(text)
    return tuple(map(int, last))


def assert_close_rows(got: list[list[str]], want: list[list[str]]) -> None:
    """The same rows, numbers within one step of their 4th decimal: windows batched with other files' windows
    (another process, another share) can round the other way."""
    assert len(got) == len(want) and got[0] == want[0]
    numbers = [is_number(f) for f in want[0]]
    for g, w in zip(got[1:], want[1:]):
        assert [c for c, n in zip(g, numbers) if not n] == [c for c, n in zip(w, numbers) if not n]
        assert [c == "" for c in g] == [c == "" for c in w]
        assert [float(c) for c, n in zip(g, numbers) if n and c] == \
               pytest.approx([float(c) for c, n in zip(w, numbers) if n and c], abs=2e-4)


def write_part(folder: Path, run_id: str, records: list[list[list[str]]], fields: list[str], meta: dict,
               torn: str = "") -> Path:
    """A part as an earlier run left it: its options and labels (``meta``), each file's window rows, then its
    own row; then ``torn``, the start of a line that a kill cut short."""
    path = part_path(folder, run_id, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(META + json.dumps(meta) + "\n")
        w = csv.writer(f, lineterminator="\n")
        w.writerow(fields)
        for own, *windows in records:
            w.writerows([*windows, own])
        f.write(torn)
    return path


def records_of(csv_out: Path) -> list[list[list[str]]]:
    """The rows of ``--out x.csv`` (and ``x.timeline.csv`` if there is one) as a part holds them: per file, its
    own row, then its window rows, in the part's columns."""
    header, *rows = read_rows(csv_out)
    windows = read_rows(timeline_path(csv_out))[1:] if timeline_path(csv_out).exists() else []
    if not windows:
        return [[row] for row in rows]
    pad = len(header) - 2  # a window row: path, label, then empty cells to start_s, end_s, prob
    return [[row + ["", "", ""]] + [[w[0], w[3]] + [""] * pad + w[1:3] + w[4:] for w in windows if w[0] == row[0]]
            for row in rows]


# ---------------------------------------------------------------------------------------------- one process

@pytest.mark.parametrize("timeline", [False, True])
def test_folder_out_gives_the_rows_of_a_csv_out(tiny_run, inputs, tmp_path, timeline):
    flags = ["--timeline"] if timeline else []
    assert predict(tiny_run, inputs, "--out", tmp_path / "x.csv", *flags) == 0
    assert predict(tiny_run, inputs, "--out", tmp_path / "new" / "out", *flags) == 0  # a new name: made
    want = read_rows(tmp_path / "x.csv")
    assert read_rows(tmp_path / "new" / "out" / "predictions.csv") == want and len(want) == 14 and want[0] == FIELDS
    assert (tmp_path / "x.timeline.csv").exists() == timeline == (tmp_path / "new" / "out" / "timeline.csv").exists()
    if timeline:
        windows = read_rows(tmp_path / "x.timeline.csv")
        assert read_rows(tmp_path / "new" / "out" / "timeline.csv") == windows and len(windows) == 13  # the broken one has none
    ((run, part),) = list_parts(tmp_path / "new" / "out")
    records = list(read_part(part, PART_FIELDS if timeline else FIELDS))
    assert records == records_of(tmp_path / "x.csv")


def test_a_rerun_skips_what_is_done_errors_included_unless_retried(tiny_run, inputs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="audioclf")
    out = tmp_path / "out"
    out.mkdir()  # an existing folder
    assert predict(tiny_run, inputs, "--out", out) == 0
    assert summary(caplog.text) == (13, 0, 1)
    first = read_rows(out / "predictions.csv")
    assert "zz_broken.wav" in first[-1][0] and first[-1][-1]

    caplog.clear()
    assert predict(tiny_run, inputs, "--out", out) == 0
    assert summary(caplog.text) == (0, 13, 1)
    assert len(list_parts(out)) == 1  # nothing classified, no new part

    caplog.clear()
    assert predict(tiny_run, inputs, "--out", out, "--retry-errors") == 0
    assert summary(caplog.text) == (1, 12, 1)
    assert read_rows(out / "predictions.csv") == first  # one row per input: the retried file's latest wins
    run, newest = list_parts(out)[-1]
    assert [rec[0][0] for rec in read_part(newest, FIELDS)] == [first[-1][0]]


def test_a_killed_run_resumes_with_the_files_it_did_not_finish(tiny_run, inputs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="audioclf")
    assert predict(tiny_run, inputs, "--out", tmp_path / "x.csv", "--timeline") == 0
    records = records_of(tmp_path / "x.csv")
    out = tmp_path / "out"
    # five files done; the sixth's window rows written, its own row cut mid-line
    six_own, *six_windows = records[5]
    torn = "".join(f"{','.join(w)}\n" for w in six_windows) + ",".join(six_own)[:25]
    meta = {"model": str(tiny_run.run_dir.resolve()), "top_k": 3, "window_s": None, "hop_s": None, "timeline": True,
            "probs": False, "labels": tiny_run.labels}
    write_part(out, "20000101T000000000000Z", records[:5], PART_FIELDS, meta, torn=torn)

    assert predict(tiny_run, inputs, "--out", out, "--timeline") == 0
    assert summary(caplog.text) == (8, 5, 1)
    assert_close_rows(read_rows(out / "predictions.csv"), read_rows(tmp_path / "x.csv"))
    assert_close_rows(read_rows(out / "timeline.csv"), read_rows(tmp_path / "x.timeline.csv"))
    run, newest = list_parts(out)[-1]
    assert [rec[0][0] for rec in read_part(newest, PART_FIELDS)] == [rec[0][0] for rec in records[5:]]


def test_a_rerun_with_other_options_is_refused(tiny_run, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict(tiny_run, inputs / "tone_000.wav", "--out", out) == 0
    capsys.readouterr()
    assert predict(tiny_run, inputs / "tone_000.wav", "--out", out, "--top-k", "2") == 2
    err = capsys.readouterr().err
    assert "top_k=2 (the parts have 3)" in err and "another --out folder" in err


def test_options_the_classifier_refuses_are_not_kept_for_the_rerun(tiny_run, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict(tiny_run, inputs / "tone_000.wav", "--out", out, "--top-k", "0") == 2
    assert "top_k=0" in capsys.readouterr().err
    assert not (out / "options.json").exists() and list_parts(out) == []
    assert predict(tiny_run, inputs / "tone_000.wav", "--out", out) == 0


# ---------------------------------------------------------------------------------------------- part files

def test_part_reader_leaves_out_a_torn_tail(tmp_path):
    fields = PART_FIELDS
    path = tmp_path / "part.csv"
    with PartWriter(path, fields) as part:
        part.write([{"path": "a\r.wav", "label": "x", "start_s": "0.000", "end_s": "1.000", "prob": "0.5000"},
                    {"path": "a\r.wav", "label": "x", "confidence": "0.5000", "label_1": "x", "prob_1": "0.5000"}])
        part.write([{"path": "b.wav", "error": "b.wav: broken\non two lines"}])
    whole = path.read_bytes()
    assert [[r[0] for r in rec] for rec in read_part(path, fields)] == [["a\r.wav", "a\r.wav"], ["b.wav"]]
    for tail in ('c.wav,y,0.9', '"c\n.wav",y', 'd.wav,,,,"d: cut\n'):  # cut mid-line, in quotes, after a quoted newline
        path.write_bytes(whole + tail.encode())
        assert [rec[0][0] for rec in read_part(path, fields)] == ["a\r.wav", "b.wav"]
    path.write_bytes(whole + ",".join(["c.wav"] + [""] * 8 + ["an error", "", "", ""]).encode() + b"\n")  # whole: it counts
    assert [rec[0][0] for rec in read_part(path, fields)] == ["a\r.wav", "b.wav", "c.wav"]
    with pytest.raises(AudioclfError, match="other options"):
        list(read_part(path, FIELDS))


def test_part_writer_syncs_every_chunk_and_on_close(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    part = PartWriter(tmp_path / "part.csv", FIELDS, chunk_rows=3, chunk_s=3600)
    part.write([{"path": "a.wav"}, {"path": "a.wav"}])
    assert synced == []
    part.write([{"path": "b.wav"}])
    assert len(synced) == 1
    part.write([{"path": "c.wav"}])
    part.close()
    assert len(synced) == 2 and len(read_rows(tmp_path / "part.csv")) == 5
    timed = PartWriter(tmp_path / "timed.csv", FIELDS, chunk_rows=1000, chunk_s=0)
    timed.write([{"path": "a.wav"}])
    assert len(synced) == 3
    timed.close()


# ---------------------------------------------------------------------------------------------- Parquet

def test_parquet_holds_the_csv_rows(tiny_run, inputs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    assert predict(tiny_run, inputs, "--out", tmp_path / "x.csv", "--timeline") == 0
    assert predict(tiny_run, inputs, "--out", tmp_path / "x.parquet", "--timeline") == 0
    assert predict(tiny_run, inputs, "--out", tmp_path / "out", "--timeline", "--out-format", "both") == 0
    for table_name, csv_path in (("predictions", tmp_path / "x.csv"), ("timeline", tmp_path / "x.timeline.csv")):
        header, *rows = read_rows(csv_path)
        want = [{k: (float(v) if is_number(k) else v) if v else None for k, v in zip(header, row)} for row in rows]
        for path in (tmp_path / f"x{'.timeline' * (table_name == 'timeline')}.parquet",
                     tmp_path / "out" / f"{table_name}.parquet"):
            table = pq.read_table(path)
            assert table.column_names == header and table.to_pylist() == want
            assert {str(table.schema.field(f).type) for f in header if is_number(f)} == {"double"}
        assert read_rows(tmp_path / "out" / f"{table_name}.csv") == [header, *rows]


def test_parquet_without_pyarrow_names_the_extra(tiny_run, inputs, tmp_path, monkeypatch, capsys, no_model):
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    monkeypatch.setattr(embed_command, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    for args in (["predict", "--out", tmp_path / "x.parquet"], ["predict", "--out", tmp_path / "out", "--out-format", "both"],
                 ["embed", "--out", tmp_path / "emb.parquet"]):
        assert main([args[0], str(tiny_run.run_dir), str(inputs), *map(str, args[1:])]) == 2
        assert PARQUET_INSTALL in capsys.readouterr().err


def test_embed_writes_parquet_with_pyarrow(tiny_run, inputs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "emb.parquet"
    assert main(["embed", str(tiny_run.run_dir), str(inputs / "tone_000.wav"), str(inputs / "noise_001.wav"),
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    table = pq.read_table(out).to_pydict()
    assert table["path"] == [str(inputs / "tone_000.wav"), str(inputs / "noise_001.wav")]
    assert [len(e) for e in table["embedding"]] == [512, 512]


# ---------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("out", ["x.csv", None])
def test_torchrun_with_one_output_file_is_refused(tiny_run, inputs, tmp_path, monkeypatch, capsys, no_model, out):
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert main(["predict", str(tiny_run.run_dir), str(inputs), *(["--out", str(tmp_path / out)] if out else [])]) == 2
    err = capsys.readouterr().err
    assert "under torchrun (2 processes)" in err and "give --out DIR" in err
    assert (str(tmp_path / out) if out else "stdout") in err


@pytest.mark.parametrize("args, says", [
    (["--out", "{tmp}/afile"], "is a file"),
    (["--out", "{tmp}/out", "--submission"], "--submission writes one CSV file"),
    (["--out", "{tmp}/x.csv", "--out-format", "parquet"], "--out-format and --retry-errors are for --out DIR"),
    (["--out", "{tmp}/x.csv", "--retry-errors"], "--out-format and --retry-errors are for --out DIR"),
    (["--out", "{tmp}/x.parquet", "--submission"], "--submission writes CSV"),
    (["--out", "{tmp}/x.v2"], "or a folder (an existing one, or a new name without a suffix)"),
])
def test_folder_out_options_that_cannot_work_are_refused(tiny_run, inputs, tmp_path, capsys, no_model, args, says):
    (tmp_path / "afile").write_text("x")
    assert main(["predict", str(tiny_run.run_dir), str(inputs), *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_process_without_a_gpu_of_its_own_is_refused(monkeypatch):
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(AudioclfError, match="process 1 of this node has no GPU of its own"):
        with process_group(torch.device("cuda")):
            pytest.fail("the group was joined")


# ---------------------------------------------------------------------------------------------- torchrun

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tiny_run, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "audioclf", "predict", str(tiny_run.run_dir), *map(str, args),
           "--quiet", "--device", "cpu", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_gloo_processes_give_the_rows_of_one_process(tiny_run, inputs, tmp_path):
    assert predict(tiny_run, inputs, "--out", tmp_path / "x.csv", "--timeline") == 0
    want = read_rows(tmp_path / "x.csv")
    out = tmp_path / "out"

    r = torchrun(tiny_run, inputs, "--out", out, "--timeline")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 of 2: classifying 7 of 13 file(s)" in r.stderr
    assert "rank 1 of 2" not in r.stderr  # rank 0 speaks for the job; the parts below show rank 1's share
    assert summary(r.stderr) == (13, 0, 1)
    assert_close_rows(read_rows(out / "predictions.csv"), want)
    assert_close_rows(read_rows(out / "timeline.csv"), read_rows(tmp_path / "x.timeline.csv"))
    names = [[rec[0][0] for rec in read_part(path, PART_FIELDS)] for _, path in list_parts(out)]
    everyone = [row[0] for row in want[1:]]
    assert names == [everyone[0::2], everyone[1::2]]  # every second file each, one part per process

    # the failed file again: the first process takes it, the second has none and must still reach the barrier
    r = torchrun(tiny_run, inputs, "--out", out, "--timeline", "--retry-errors")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 of 2: classifying 1 of 13 file(s); 12 done before" in r.stderr  # rank 1: none, and no hang
    assert summary(r.stderr) == (1, 12, 1)
    assert_close_rows(read_rows(out / "predictions.csv"), want)


@pytest.mark.slow
def test_torchrun_reports_our_message_as_the_root_cause(tiny_run, inputs, tmp_path):
    r = torchrun(tiny_run, inputs, "--out", tmp_path / "x.csv")
    assert r.returncode != 0
    report = r.stderr[r.stderr.index("Root Cause"):]  # torchrun's own failure report, after the processes'
    assert "give --out DIR" in report and "To enable traceback" not in report
