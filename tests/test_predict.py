import csv
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from _models import tiny_run  # noqa: F401 (a fixture)
from _serving import clip

import audioclf
from audioclf import predict
from audioclf import windows as windows_module
from audioclf.audio import fix_length
from audioclf.cli import main
from audioclf.config import AudioclfError
from audioclf.demo import synth_clip
from audioclf.features import LogMel


@pytest.fixture(scope="module")
def clf(tiny_run):
    return audioclf.load(tiny_run.run_dir, device="cpu")


def read_csv(path_or_text):
    text = path_or_text if isinstance(path_or_text, str) else path_or_text.read_text()
    return list(csv.DictReader(io.StringIO(text)))


# ---------------------------------------------------------------------------------------------- Python API

def test_api_numpy_waveform_and_torch_tensor(clf, tiny_run):
    assert clf.labels == tiny_run.labels
    tone = clip("tone", 0)
    p = clf.predict_proba(tone)
    assert p.shape == (3,) and p.sum() == pytest.approx(1, abs=1e-5)
    assert clf.predict(tone) == "tone" == clf.labels[p.argmax()]
    np.testing.assert_allclose(clf.predict_proba(torch.from_numpy(tone)), p, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(np.stack([tone, tone]), batch=False), p, atol=1e-6)  # (channels, time)
    # another sample rate is resampled to the training rate
    assert clf.predict(synth_clip("noise", np.random.default_rng(1), 44100, 1.0), sample_rate=44100) == "noise"

    batch = clf.predict_proba([tone, clip("noise", 2), clip("chirp", 3)])
    assert batch.shape == (3, 3)
    np.testing.assert_allclose(batch[0], p, atol=1e-5)
    assert clf.predict([tone, clip("noise", 2)]) == ["tone", "noise"]


def test_two_dimensional_input_says_whether_rows_are_clips_or_channels(clf):
    two = np.stack([clip("tone", 0), clip("noise", 2)])  # two mono clips, or one stereo clip: the same shape
    with pytest.raises(AudioclfError, match=r"ambiguous.*batch=True.*batch=False"):
        clf.predict_proba(two)
    with pytest.raises(AudioclfError, match="ambiguous"):
        clf.embed(torch.from_numpy(two))
    rows = clf.predict_proba(two, batch=True)
    assert rows.shape == (2, 3)
    np.testing.assert_allclose(rows, clf.predict_proba(list(two)), atol=1e-6)
    assert clf.predict(two, batch=True) == ["tone", "noise"]
    np.testing.assert_allclose(clf.predict_proba(two, batch=False), clf.predict_proba(two.mean(axis=0)), atol=1e-6)
    assert clf.embed(torch.from_numpy(two), batch=True).shape[0] == 2
    with pytest.raises(AudioclfError, match=r"batch=True needs .*shape \(\d+,\)"):
        clf.predict_proba(two[0], batch=True)


def test_short_clip_is_padded_exactly_as_in_training(clf):
    wave = clip("chirp", 4, duration_s=0.6)
    f = clf.config.features
    with torch.no_grad():
        x = LogMel(f)(torch.from_numpy(fix_length(wave, f.n_samples))[None])
        expected = torch.softmax(clf.model(x), dim=-1)[0].numpy()
    result = clf.classify(wave)
    np.testing.assert_allclose(result["probs"], expected, atol=1e-5)
    assert result["duration_s"] == pytest.approx(0.6)
    assert [t["label"] for t in result["top_k"]][0] == result["label"]
    assert len(result["top_k"]) == 3 and "windows" not in result


def test_long_waveform_is_the_mean_of_its_windows(clf):
    wave = np.concatenate([clip("tone", 5), clip("tone", 6), clip("noise", 7)])  # 3 s, window 1 s, hop 0.5 s
    result = clf.classify(wave, timeline=True)
    assert [(w["start_s"], w["end_s"]) for w in result["windows"]] == [(0, 1), (0.5, 1.5), (1, 2), (1.5, 2.5), (2, 3)]
    windows = [wave[s:s + 16000] for s in range(0, 32001, 8000)]
    np.testing.assert_allclose(result["probs"], clf.predict_proba(windows).mean(axis=0), atol=1e-5)


def test_probabilities_and_embeddings_are_window_means_for_arrays_and_files_alike(clf, tmp_path):
    wave = np.concatenate([clip("tone", 8), clip("noise", 9), clip("chirp", 10)[:4000]])  # 2.25 s: 4 windows of 1 s
    windows = [wave[s:s + 16000] for s in (0, 8000, 16000, 20000)]
    path = tmp_path / "long.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    short = tmp_path / "short.wav"
    sf.write(short, clip("tone", 11), 16000, subtype="FLOAT")

    probs = clf.predict_proba([wave, path, short])
    np.testing.assert_allclose(probs[0], clf.predict_proba(windows).mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-5)
    np.testing.assert_allclose([r["probs"] for r in clf.classify_files([path, short], quiet=True)], probs[1:], atol=1e-5)

    emb = clf.embed([wave, path, short])
    assert emb.shape == (3, 512) and not np.allclose(emb[0], emb[2])
    np.testing.assert_allclose(emb[0], clf.embed(windows).mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(emb[1], emb[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(clf.embed_files([path, short], quiet=True), emb[1:], rtol=1e-4, atol=1e-4)

    assert clf.predict_proba([]).shape == (0, 3) and clf.embed([]).shape == (0, 0)


def test_api_rejects_bad_input_with_a_clear_message(clf, tmp_path):
    with pytest.raises(AudioclfError, match="looks like \\(time, channels\\)"):
        clf.predict(np.zeros((16000, 2), np.float32))
    with pytest.raises(AudioclfError, match="int16"):
        clf.predict(np.zeros(16000, np.int16))
    with pytest.raises(AudioclfError, match="missing.wav"):
        clf.predict(tmp_path / "missing.wav")
    with pytest.raises(AudioclfError, match="top_k"):
        clf.classify(clip("tone", 0), top_k=0)


# ---------------------------------------------------------------------------------------------- sliding windows on a long file

def test_timeline_of_a_60_second_file_shows_the_class_change(clf, tiny_run, tmp_path, monkeypatch):
    def clips(kind):  # the class's training clips, repeated to 30 s
        files = sorted((tiny_run.data_dir / kind).glob("*.wav"))
        return [sf.read(files[i % len(files)], dtype="float32")[0] for i in range(30)]

    path = tmp_path / "long.wav"
    sf.write(path, np.concatenate(clips("tone") + clips("noise")), 16000)
    # a long file is streamed, never decoded whole
    monkeypatch.setattr(windows_module, "load_audio", lambda *a: pytest.fail("a long file was decoded whole"))

    result = clf.classify(path, timeline=True)
    windows = result["windows"]
    assert result["duration_s"] == pytest.approx(60)
    assert len(windows) == 119 and windows[-1]["end_s"] == pytest.approx(60)
    assert change_point(windows) == pytest.approx(30, abs=1)
    assert np.mean([w["label"] == "tone" for w in windows if w["end_s"] <= 30]) >= 0.9
    assert np.mean([w["label"] == "noise" for w in windows if w["start_s"] >= 30]) >= 0.9

    out = tmp_path / "long.csv"
    assert main(["predict", str(tiny_run.run_dir), str(path), "--timeline", "--out", str(out), "--quiet"]) == 0
    (row,) = read_csv(out)  # the per-file table: one row for the file, as without --timeline
    assert list(row) == ["path", "label", "confidence", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3",
                         "error"]
    rows = read_csv(tmp_path / "long.timeline.csv")  # the timeline: a table of its own
    assert list(rows[0]) == ["path", "start_s", "end_s", "label", "prob"] and {r["path"] for r in rows} == {str(path)}
    window_rows = [{"start_s": float(r["start_s"]), "end_s": float(r["end_s"]), "label": r["label"]} for r in rows]
    assert len(window_rows) == 119 and change_point(window_rows) == pytest.approx(30, abs=1)
    assert [float(r["prob"]) for r in rows] == pytest.approx([w["confidence"] for w in windows], abs=1e-4)


def change_point(windows) -> float:
    """The time t that best splits the timeline into "tone" before and "noise" after."""
    def errors(t):
        return sum((w["label"] != "tone") if (w["start_s"] + w["end_s"]) / 2 < t else (w["label"] != "noise")
                   for w in windows)
    return min((w["start_s"] for w in windows), key=errors)


# ---------------------------------------------------------------------------------------------- CLI

def test_predict_files_and_folders_to_csv(tiny_run, tmp_path):
    out = tmp_path / "preds.csv"
    one = tiny_run.data_dir / "tone" / "tone_000.wav"
    assert main(["predict", str(tiny_run.run_dir), str(tiny_run.data_dir / "noise"), str(one),
                 "--out", str(out), "--top-k", "2", "--batch-size", "5", "--quiet"]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "label", "confidence", "label_1", "prob_1", "label_2", "prob_2", "error"]
    assert len(rows) == 13 and rows[-1]["path"] == str(one)
    assert sum(r["label"] == "noise" for r in rows[:12]) >= 11 and rows[-1]["label"] == "tone"
    for r in rows:
        assert r["label_1"] == r["label"] and r["prob_1"] == r["confidence"] and r["label_2"] not in ("", r["label"])
        assert float(r["prob_1"]) >= float(r["prob_2"]) and r["error"] == ""
    assert not (tmp_path / "preds.timeline.csv").exists()


def test_probs_gives_one_column_per_class_in_label_order(tiny_run, clf, tmp_path, capsys):
    files = sorted((tiny_run.data_dir / "chirp").glob("*.wav"))[:3]
    assert main(["predict", str(tiny_run.run_dir), *map(str, files), "--probs", "--top-k", "1", "--quiet"]) == 0
    rows = read_csv(capsys.readouterr().out)
    assert list(rows[0]) == ["path", "label", "confidence", "label_1", "prob_1", "p_chirp", "p_noise", "p_tone", "error"]
    for r, f in zip(rows, files):
        probs = [float(r[f"p_{c}"]) for c in tiny_run.labels]
        assert probs == pytest.approx(clf.predict_proba(str(f)).tolist(), abs=1e-4) and sum(probs) == pytest.approx(1, abs=1e-3)
        assert r["label"] == tiny_run.labels[int(np.argmax(probs))]


def test_timeline_on_stdout_is_the_timeline_table(tiny_run, capsys):
    one = tiny_run.data_dir / "tone" / "tone_000.wav"
    assert main(["predict", str(tiny_run.run_dir), str(one), "--timeline", "--window", "0.5", "--quiet"]) == 0
    rows = read_csv(capsys.readouterr().out)
    assert [list(r.values()) for r in rows] == [[str(one), "0.000", "0.500", rows[0]["label"], rows[0]["prob"]],
                                                [str(one), "0.250", "0.750", rows[1]["label"], rows[1]["prob"]],
                                                [str(one), "0.500", "1.000", rows[2]["label"], rows[2]["prob"]]]


def test_predict_csv_to_stdout_from_a_list_file(tiny_run, tmp_path, capsys):
    listing = tmp_path / "files.txt"
    listing.write_text(f"# clips\n{tiny_run.data_dir / 'chirp' / 'chirp_001.wav'}\n\n{tiny_run.data_dir / 'tone'}\n")
    assert main(["predict", str(tiny_run.run_dir), str(listing), "--quiet"]) == 0
    rows = read_csv(capsys.readouterr().out)
    assert len(rows) == 13 and rows[0]["label"] == "chirp"


def test_predict_json_has_the_full_probability_vector(tiny_run, tmp_path):
    out = tmp_path / "preds.json"
    assert main(["predict", str(tiny_run.run_dir), str(tiny_run.data_dir / "chirp"), "--out", str(out),
                 "--timeline", "--quiet"]) == 0
    items = json.loads(out.read_text())
    assert len(items) == 12
    for item in items:
        assert set(item) == {"path", "label", "confidence", "probs", "top_k", "duration_s", "error", "windows"}
        assert list(item["probs"]) == tiny_run.labels and sum(item["probs"].values()) == pytest.approx(1, abs=1e-4)
        assert item["confidence"] == max(item["probs"].values()) and item["error"] is None
        assert item["windows"] == [{"start_s": 0.0, "end_s": pytest.approx(1.0), "label": item["label"],
                                    "confidence": pytest.approx(item["confidence"])}]


def test_submission_format(tiny_run, tmp_path):
    out = tmp_path / "submission.csv"
    assert main(["predict", str(tiny_run.run_dir), str(tiny_run.data_dir), "--submission", "--out", str(out),
                 "--quiet"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "ID,Class" and len(lines) == 37
    assert "tone_003.wav,tone" in lines
    assert all(line.split(",")[1] in tiny_run.labels for line in lines[1:])


def test_unreadable_files_get_error_rows_and_the_run_goes_on(tiny_run, tmp_path, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.wav").write_bytes(b"this is not audio" * 50)
    (bad / "empty.wav").write_bytes(b"")
    good = tiny_run.data_dir / "tone" / "tone_002.wav"
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_run.run_dir), str(good), str(bad), str(tmp_path / "missing.wav"),
                 "--out", str(out), "--quiet"]) == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in read_csv(out)}
    assert rows["tone_002.wav"]["label"] == "tone" and rows["tone_002.wav"]["error"] == ""
    assert "empty" in rows["empty.wav"]["error"] and rows["empty.wav"]["label"] == ""
    assert "garbage.wav" in rows["garbage.wav"]["error"]
    assert "no such audio file" in rows["missing.wav"]["error"]
    assert "garbage.wav" in caplog.text

    # every file failed: exit code 1, the rows are still written
    assert main(["predict", str(tiny_run.run_dir), str(bad), "--out", str(out), "--quiet"]) == 1
    assert len(read_csv(out)) == 2


def test_predict_cli_refuses_bad_options(tiny_run, tmp_path, capsys):
    assert main(["predict", str(tiny_run.run_dir), str(tiny_run.data_dir), "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["predict", str(tiny_run.run_dir), str(tiny_run.data_dir), "--submission",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert main(["predict", str(tiny_run.run_dir), str(tmp_path)]) == 2  # no audio files
    assert "no audio files" in capsys.readouterr().err
