import csv
import json
import shutil

import numpy as np
import pytest
from _models import tiny_run  # noqa: F401 (a fixture)

from audioclf.cli import main
from audioclf.config import AudioclfError, DataConfig
from audioclf.evaluate import evaluate, plot_confusion_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        return im.size


def test_evaluate_writes_metrics_predictions_plot_and_report(tiny_run, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(tiny_run.run_dir, DataConfig(root=str(tiny_run.data_dir)), out_dir=out, device="cpu", quiet=True)

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "top3_accuracy", "n_clips", "per_class", "confusion_matrix", "labels"):
        assert saved[key] == m[key]
    assert m["n_clips"] == 36 and m["labels"] == tiny_run.labels and m["skipped"] == []
    # a 40-step model on clips it saw: well above chance (0.33), though not always perfect
    assert m["accuracy"] >= 0.75 and m["macro_f1"] >= 0.7 and m["top3_accuracy"] == 1.0
    assert set(m["per_class"]["tone"]) == {"precision", "recall", "f1", "support"}
    assert m["per_class"]["tone"]["support"] == 12
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 36 and cm.trace() == round(m["accuracy"] * 36)

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true", "predicted", "confidence", "correct"] and len(rows) == 36
    assert sum(int(r["correct"]) for r in rows) == cm.trace()
    assert all((r["true"] == r["predicted"]) == (r["correct"] == "1") for r in rows)

    width, height = read_png(out / "confusion_matrix.png")
    assert 400 <= width <= 3000 and 400 <= height <= 3000

    report = (out / "report.txt").read_text()
    assert report == m["report"] and "accuracy" in report and "macro avg" in report and "chirp" in report


def test_evaluate_cli_default_out_dir_and_fold(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    manifest = tmp_path / "data.csv"
    clips = sorted(tiny_run.data_dir.glob("*/*.wav"))
    manifest.write_text("path,label,fold\n" + "".join(f"{p},{p.parent.name},{i % 2 + 1}\n" for i, p in enumerate(clips)))

    assert main(["evaluate", str(run), str(manifest), "--fold", "2", "--device", "cpu", "--quiet"]) == 0
    assert "fold 2" in capsys.readouterr().out
    assert json.loads((run / "eval" / "metrics.json").read_text())["n_clips"] == 18

    assert main(["evaluate", str(run / "best.pt"), str(manifest), "--fold", "7", "--quiet"]) == 2
    assert "fold=7 has no clips; folds in this dataset: [1, 2]" in capsys.readouterr().err


def test_unknown_dataset_class_is_an_error_listing_both(tiny_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_run.data_dir, data)
    shutil.copytree(data / "tone", data / "whistle")
    with pytest.raises(AudioclfError, match="whistle.*model classes: chirp, noise, tone.*dataset classes: chirp"):
        evaluate(tiny_run.run_dir, DataConfig(root=str(data)), out_dir=tmp_path / "eval", quiet=True)


def test_unreadable_clips_are_skipped_and_listed(tiny_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_run.data_dir, data)
    (data / "noise" / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    m = evaluate(tiny_run.run_dir, DataConfig(root=str(data)), out_dir=tmp_path / "eval", quiet=True)
    assert m["n_clips"] == 36
    assert len(m["skipped"]) == 1 and m["skipped"][0]["path"].endswith("broken.wav") and m["skipped"][0]["reason"]
    assert "1 skipped" in m["report"]


def test_confusion_plot_grows_with_the_number_of_classes(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {}
    for n in (3, 50):
        path = tmp_path / f"cm{n}.png"
        plot_confusion_matrix(rng.integers(0, 5, (n, n)), [f"class_name_{i}" for i in range(n)], path)
        sizes[n] = read_png(path)
    assert sizes[50][0] > 2 * sizes[3][0] and sizes[50][0] <= 3000
