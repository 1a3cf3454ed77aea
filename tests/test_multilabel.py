"""Multilabel (tagging): the labels column, multi-hot targets, the loss, mixup and mix, thresholds, and a
multilabel model through train, evaluate, predict, export and audioclf.load."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import audioclf
from audioclf.augment import active_power, from_power, mix, mixup, to_power
from audioclf.config import DataConfig, FeatureConfig, resolve
from audioclf.errors import AudioclfError
from audioclf.data import read_csv, write_folds
from audioclf.evaluate import evaluate
from audioclf.export import export
from audioclf.tasks import class_balance, mix_fraction, n_correct, smoothed_bce, start_at_priors

from conftest import SYNTH_CLASSES, SYNTH_SAMPLE_RATE


def _manifest(tmp_path, rows, header="path,labels"):
    for name, _ in rows:
        sf.write(tmp_path / name, np.zeros(1600, np.float32), 16000)
    path = tmp_path / "tags.csv"
    path.write_text(header + "\n" + "".join(f"{name},{labels}\n" for name, labels in rows))
    return path


# ------------------------------------------------------------------------------------------ data

def test_a_labels_column_holds_several_classes_or_none(tmp_path):
    path = _manifest(tmp_path, [("a.wav", "dog;rain"), ("b.wav", " rain ; rain"), ("c.wav", ""), ("d.wav", "cat"),
                                ("e.wav", "cat;dog"), ("f.wav", "rain"), ("g.wav", ""), ("h.wav", "cat")])
    cs = read_csv(path)
    assert cs.classes == ["cat", "dog", "rain"] and cs.multilabel
    by_name = {c.path.rsplit("/", 1)[-1]: c for c in cs.clips}
    assert by_name["a.wav"].targets == (1, 2) and by_name["b.wav"].targets == (2,)
    assert by_name["c.wav"].targets == () and by_name["c.wav"].label == -1  # no target sound
    # folds written for cross-validation keep the tags
    again = read_csv(write_folds(cs, tmp_path / "folds.csv", n_folds=2, seed=0))
    assert again.multilabel and sorted(c.targets for c in again.clips) == sorted(c.targets for c in cs.clips)


def test_a_single_label_dataset_is_not_multilabel_and_its_targets_are_its_label(synth_dir):
    from audioclf.data import read_folder

    cs = read_folder(synth_dir)
    assert not cs.multilabel and all(c.targets == (c.label,) for c in cs.clips)


def test_a_manifest_needs_label_or_labels(tmp_path):
    path = _manifest(tmp_path, [("a.wav", "dog")], header="path,class")
    with pytest.raises(AudioclfError, match=r"missing column\(s\) label or labels"):
        read_csv(path)


def test_webdataset_samples_carry_their_labels(tmp_path):
    pytest.importorskip("webdataset")
    from audioclf.webdata import read_webdataset, write_shards

    cs = read_csv(_manifest(tmp_path, [("a.wav", "dog;rain"), ("b.wav", ""), ("c.wav", "cat")]))
    write_shards(cs, tmp_path / "shards", quiet=True)
    back = read_webdataset(tmp_path / "shards")
    assert back.classes == cs.classes and back.multilabel
    assert sorted(c.targets for c in back.clips) == sorted(c.targets for c in cs.clips)


# ------------------------------------------------------------------------------------------ loss and augmentation

def test_smoothed_bce_pulls_targets_towards_one_half():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 1.0]])
    eps = 0.2
    p = torch.sigmoid(logits)
    t = torch.tensor([[0.9, 0.1, 0.9]])  # 1 - eps/2 and eps/2
    manual = -(t * p.log() + (1 - t) * (1 - p).log()).sum(1).mean()  # summed over classes, as cross-entropy's scale
    assert smoothed_bce(logits, target, label_smoothing=eps).item() == pytest.approx(manual.item(), rel=1e-6)
    # the smoothed loss is smallest where each sigmoid equals its smoothed target, not at 0 or 1
    best = torch.logit(t)
    assert smoothed_bce(best, target, label_smoothing=eps) < smoothed_bce(best * 3, target, label_smoothing=eps)
    # a class weight scales its column
    w = torch.tensor([1.0, 0.0, 0.0])
    assert smoothed_bce(logits, target, weight=w).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1]).item(), rel=1e-6)


def test_mixup_mixes_label_vectors_with_the_features_weight():
    from audioclf.augment import _beta

    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1).expand(6, 2, 3).clone()  # example i holds i
    y = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    mx, target = mixup(x, y, 3, alpha=0.4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws: the weights, then the partners
    lam = _beta(0.4, 6, g)
    lam, perm = torch.maximum(lam, 1 - lam), torch.randperm(6, generator=g)
    assert torch.allclose(mx[:, 0, 0], lam * torch.arange(6) + (1 - lam) * perm, atol=1e-5)
    assert torch.allclose(target, lam[:, None] * y + (1 - lam[:, None]) * y[perm], atol=1e-6)
    assert not torch.equal(target, y)


def test_mix_sums_powers_and_unites_labels():
    f = FeatureConfig(sample_rate=16000, n_mels=8, compression="log", offset=4.5, scale=5.0)

    def loudness(features):
        return active_power(to_power(features[None], f)).item()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 8, 10, generator=g) * 0.3
    y = torch.nn.functional.one_hot(torch.arange(8) % 5, 5).float()
    mx, my, _ = mix(x, y, 1.0, 6.0, f, torch.Generator().manual_seed(1))
    assert not torch.equal(mx, x)
    for i in range(8):
        partners = [j for j in range(8) if j != i and torch.equal(my[i], torch.maximum(y[i], y[j]))]
        assert partners, "each mixed clip holds its own classes and its partner's"
        # the power added is the partner's, scaled to the clip's loudness within +-6 dB
        added = to_power(mx[i], f) - to_power(x[i], f)
        ratios = [(added / to_power(x[j], f)).median().item() for j in partners]
        assert any(10 ** -0.6 - 1e-3 <= r * (loudness(x[j]) / loudness(x[i])) <= 10 ** 0.6 + 1e-3 and torch.allclose(
            from_power(to_power(x[i], f) + r * to_power(x[j], f), f), mx[i], atol=1e-3) for r, j in zip(ratios, partners))
    # a fraction of 0 changes nothing; the same generator seed gives the same mix
    assert mix(x, y, 0.0, 6.0, f, g)[0] is x
    a = mix(x, y, 0.5, 6.0, f, torch.Generator().manual_seed(3))[:2]
    b = mix(x, y, 0.5, 6.0, f, torch.Generator().manual_seed(3))[:2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    changed = (a[0] != x).flatten(1).any(1)
    assert torch.equal(changed, (a[1] != y).any(1) | changed) and 0 < changed.sum() < 8


def test_mix_sets_the_partner_to_the_clip_loudness_whatever_the_recorded_levels():
    # recorded levels 40 dB apart: scaled from its own level, the quiet clip would be inaudible yet labelled
    f = FeatureConfig(sample_rate=16000, n_mels=8, compression="log", offset=4.5, scale=5.0)
    loud = torch.full((8, 40), 1.0)
    quiet = torch.zeros(8, 40)
    quiet[:, :4] = 1e-4  # a short sound, then silence, which must not count towards its loudness
    x = from_power(torch.stack([loud, quiet]), f)
    y = torch.eye(2)
    for seed in range(5):
        mx, my, _ = mix(x, y, 1.0, 6.0, f, torch.Generator().manual_seed(seed))
        assert torch.equal(my, torch.ones(2, 2))
        # the partner's active part lands within +-6 dB of the clip's loudness
        relative = active_power(to_power(mx, f) - to_power(x, f)) / active_power(to_power(x, f))
        assert ((relative >= 10 ** -0.6 - 1e-3) & (relative <= 10 ** 0.6 + 1e-3)).all(), relative
    assert active_power(to_power(x, f))[1].item() == pytest.approx(1e-4 * 8, rel=1e-3)


def test_mix_of_up_to_three_clips_sums_each_partner_once():
    f = FeatureConfig(sample_rate=16000, n_mels=8, compression="log", offset=4.5, scale=5.0)
    power = torch.zeros(6, 8, 6)
    for k in range(6):
        power[k, :, k] = 10.0 ** (-k / 2)  # each clip sounds in its own frame, at its own recorded level
    x, y = from_power(power, f), torch.eye(6)
    sizes = set()
    for seed in range(10):
        mx, my, _ = mix(x, y, 1.0, 6.0, f, torch.Generator().manual_seed(seed), max_clips=3)
        mixed = to_power(mx, f)
        for i in range(6):
            heard = (mixed[i, 0] > 1e-5).nonzero().squeeze(1).tolist()  # the clips whose frame sounds in the sum
            assert heard == my[i].nonzero().squeeze(1).tolist() and i in heard
            sizes.add(len(heard))
            for j in heard:  # each partner at the clip's loudness within +-6 dB
                ratio = mixed[i, 0, j] / power[i, 0, i]
                assert j == i or 10 ** -0.6 - 1e-3 <= ratio <= 10 ** 0.6 + 1e-3
    assert sizes == {2, 3}
    assert mix(x, y, 1.0, 6.0, f, torch.Generator().manual_seed(0), max_clips=3)[1].sum(1).max() <= 3


def test_a_multilabel_head_starts_at_the_class_priors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    first = model[0].bias.detach().clone()
    targets = torch.zeros(20, 3, dtype=torch.bool)
    targets[:10, 0], targets[:5, 1] = True, True  # shares 1/2, 1/4 and none
    start_at_priors(model, targets)
    assert torch.allclose(torch.sigmoid(model[2].bias), torch.tensor([0.5, 0.25, 1e-3]), atol=1e-6)
    assert torch.equal(model[0].bias, first)  # a hidden layer of the same width is left alone

    from audioclf.model import build_network
    from audioclf.config import ModelConfig

    for backbone in ("mn04_as", "resnet18"):  # the attention over time weighs steps; the classifier scores
        net = build_network(ModelConfig(backbone=backbone, pretrained="none", pooling="attention"), 3, 64)
        start_at_priors(net, targets)
        pool, last = (net.pool, net.backbone.fc[1]) if backbone == "resnet18" else (net.net.pool, net.net.classifier[5])
        assert torch.equal(pool.attention.bias, torch.zeros(3))
        assert torch.allclose(torch.sigmoid(last.bias), torch.tensor([0.5, 0.25, 1e-3]), atol=1e-6)


def test_mix_is_on_by_default_for_multilabel_only():
    assert mix_fraction(resolve(overrides={"train": {"task": "multilabel"}})) == 0.5
    assert mix_fraction(resolve()) == 0.0
    assert mix_fraction(resolve(overrides={"train": {"task": "multilabel"}, "augment": {"mix": 0.0}})) == 0.0
    with pytest.raises(AudioclfError, match=r"augment.mix=0.3 sums two clips, labels united: use --task multilabel"):
        resolve(overrides={"augment": {"mix": 0.3}})


def test_class_balance_and_accuracy_of_multi_hot_targets():
    targets = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    weights, _ = class_balance(targets, "weights", torch.device("cpu"))
    assert torch.allclose(weights, torch.tensor([5 / 9, 5 / 3, 5 / 3]))  # 5 positives over 3 classes x counts 3, 1, 1
    _, per_clip = class_balance(targets, "sampler", torch.device("cpu"))
    assert torch.allclose(per_clip, torch.tensor([1 / 3, 1 / 3, 1.0, 1.0, 1.0]))  # rarest class; the empty clip alone
    logits = torch.tensor([[2.0, -1.0], [1.0, 1.0], [-1.0, -2.0]])
    assert n_correct(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])) == 2
    assert n_correct(logits, torch.tensor([0, 0, 1])) == 2  # integer labels: the argmax (a tie goes to the first)


# ------------------------------------------------------------------------------------------ a multilabel model

@pytest.fixture(scope="module")
def tag_run(tmp_path_factory, synth_dir):
    """A small multilabel model trained on single-label clips (with mix), and a CSV of mixtures."""
    from audioclf.train import fit

    root = tmp_path_factory.mktemp("tags")
    cfg = resolve(overrides={"features": {"sample_rate": SYNTH_SAMPLE_RATE, "duration_s": 1.0},
                             "model": {"backbone": "resnet18", "pretrained": "none"},
                             "data": {"root": str(synth_dir), "format": "folder", "val_split": 0.25,
                                      "cache_dir": str(root / "cache")},  # before the per-test environment
                             "train": {"task": "multilabel", "epochs": 4, "batch_size": 8, "lr": 1e-3, "patience": 0,
                                       "quiet": True, "seed": 3}})
    fit(cfg, root / "run")
    rng = np.random.default_rng(0)
    files = {c: sorted((synth_dir / c).glob("*.wav")) for c in SYNTH_CLASSES}
    rows = []
    for i in range(12):
        classes = sorted(rng.choice(SYNTH_CLASSES, size=1 + i % 2, replace=False).tolist())
        wave = sum(sf.read(files[c][int(rng.integers(len(files[c])))], dtype="float32")[0] for c in classes)
        sf.write(root / f"mix{i}.wav", 0.5 * wave, SYNTH_SAMPLE_RATE)
        rows.append((f"mix{i}.wav", ";".join(classes)))
    (root / "mix.csv").write_text("path,labels\n" + "".join(f"{p},{l}\n" for p, l in rows))
    return root


@pytest.mark.slow
def test_training_saves_thresholds_and_evaluate_scores_tags(tag_run):
    best = torch.load(tag_run / "run" / "best.pt", weights_only=True)
    assert len(best["thresholds"]) == 3 and all(0 <= t <= 1 for t in best["thresholds"])
    assert best["config"]["train"]["task"] == "multilabel"
    header = (tag_run / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "val_map" in header

    m = evaluate(tag_run / "run", DataConfig(root=str(tag_run / "mix.csv"), format="csv"),
                          out_dir=tag_run / "e", quiet=True)
    saved = json.loads((tag_run / "e" / "metrics.json").read_text())
    assert {"mAP", "micro_f1", "macro_f1", "per_class"} <= set(saved) and saved["n_clips"] == 12
    assert saved["mAP"] == pytest.approx(m["mAP"]) and 0 <= saved["mAP"] <= 1
    assert saved["per_class"]["tone"]["threshold"] == pytest.approx(best["thresholds"][SYNTH_CLASSES.index("tone")])
    with open(tag_run / "e" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true", "predicted", *SYNTH_CLASSES] and len(rows) == 12
    assert all(0 <= float(r[c]) <= 1 for r in rows for c in SYNTH_CLASSES)
    assert (tag_run / "e" / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "AP" in (tag_run / "e" / "report.txt").read_text()


@pytest.mark.slow
def test_a_labels_cell_naming_an_unknown_class_is_refused(tag_run, tmp_path):
    path = _manifest(tmp_path, [("a.wav", "tone;whale song"), ("b.wav", "noise")])
    with pytest.raises(AudioclfError, match=r"class\(es\) whale song are not among the model's classes"):
        evaluate(tag_run / "run", DataConfig(root=str(path), format="csv"), out_dir=tmp_path / "e", quiet=True)


@pytest.mark.slow
def test_predict_lists_every_tag_above_its_threshold(tag_run):
    clf = audioclf.load(tag_run / "run")
    assert clf.multilabel
    probs = clf.predict_proba(str(tag_run / "mix1.wav"))
    r = clf.classify(str(tag_run / "mix1.wav"))
    expected = [clf.labels[i] for i in np.argsort(-probs, kind="stable") if probs[i] >= clf.thresholds[i]]
    assert [t["label"] for t in r["tags"]] == expected
    assert r["probs"] == pytest.approx(probs.tolist(), abs=1e-6)
    clf.thresholds = np.zeros(3)  # every class reaches a threshold of 0
    assert len(clf.classify(str(tag_run / "mix1.wav"))["tags"]) == 3


@pytest.mark.slow
def test_exports_keep_sigmoids_and_thresholds(tag_run, tmp_path):
    pytest.importorskip("safetensors")
    best = torch.load(tag_run / "run" / "best.pt", weights_only=True)
    out = export(tag_run / "run", "safetensors", tmp_path / "st")
    assert json.loads((tmp_path / "st" / "config.json").read_text())["thresholds"] == best["thresholds"]
    clf = audioclf.load(out.parent)
    assert clf.multilabel and list(clf.thresholds) == best["thresholds"]
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = export(tag_run / "run", "onnx", tmp_path / "onnx")
    meta = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert meta["thresholds"] == best["thresholds"]
    wave = sf.read(tag_run / "mix1.wav", dtype="float32")[0][None]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if meta["input"] == "waveform":
        got = session.run(None, {"waveform": wave})[0][0]
        assert got == pytest.approx(audioclf.load(tag_run / "run").predict_proba(wave[0]), abs=1e-3)
        assert abs(got.sum() - 1) > 1e-3  # sigmoids, not a softmax


@pytest.mark.slow
def test_predict_command_writes_the_tags(tag_run, tmp_path):
    from audioclf.commands.predict import run_predict

    clf = audioclf.load(tag_run / "run")
    # a mixture the small model tags (not every one reaches its thresholds after 4 epochs)
    tagged = [(p, r["tags"]) for p in sorted(tag_run.glob("mix*.wav")) if (r := clf.classify(str(p)))["tags"]]
    assert tagged
    path, tags = tagged[0]
    assert run_predict(tag_run / "run", [str(path)], out=str(tmp_path / "p.csv"), probs=True, quiet=True) == 0
    with open(tmp_path / "p.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["tags"] == ";".join(t["label"] for t in tags)
    assert [float(row[f"p_{t['label']}"]) for t in tags] == pytest.approx([t["prob"] for t in tags], abs=1e-4)
    assert run_predict(tag_run / "run", [str(path)], out=str(tmp_path / "p.json"), quiet=True) == 0
    (item,) = json.loads((tmp_path / "p.json").read_text())
    assert [t["label"] for t in item["tags"]] == [t["label"] for t in tags]


@pytest.mark.shared_data
def test_esc50_trains_as_multilabel_with_one_tag_per_clip(esc50_root, tmp_path):
    from audioclf.data import load_clips
    from audioclf.store import FeatureBank

    cs = load_clips(DataConfig(root=str(esc50_root), format="esc50", esc10=True))
    assert not cs.multilabel and len(cs.classes) == 10
    clips = cs.clips[:6]
    sub = type(cs)(clips, cs.classes)
    f = FeatureConfig(sample_rate=8000, duration_s=1.0, n_mels=32, n_fft=256, hop_length=128, win_length=256)
    bank = FeatureBank.build(sub, f, cache_dir=tmp_path, num_workers=0, quiet=True)
    x, y = bank.batch(torch.arange(6), multi_hot=True)
    assert y.shape == (6, 10) and torch.equal(y.argmax(1), torch.tensor([c.label for c in clips]))
    assert torch.equal(y.sum(1), torch.ones(6))  # one tag each
    assert torch.equal(bank.batch(torch.arange(6))[1], torch.tensor([c.label for c in clips]))


def test_mix_with_frame_targets_moves_each_label_with_its_sound():
    f = FeatureConfig(sample_rate=16000, n_mels=8, compression="log", offset=4.5, scale=5.0)
    power = torch.full((6, 8, 60), 1e-7)
    for k in range(6):
        power[k, :, 10 + k:20 + k] = 1.0  # clip k sounds for 10 frames
    x, y = from_power(power, f), torch.eye(6)
    for seed in range(5):
        mx, my, frames = mix(x, y, 0.5, 0.0, f, torch.Generator().manual_seed(seed), max_clips=3, frame_targets=True)
        assert frames.shape == (6, 60, 6)
        assert torch.equal(frames.amax(1), my)  # a clip's classes are those present at some frame
        loud = to_power(mx, f).sum(1) > 1e-3  # (clips, frames) where something sounds
        for i in range(6):
            present = frames[i].amax(1) > 0
            assert torch.equal(loud[i] & ~present, torch.zeros_like(present))  # no sound without its label
            for c in my[i].nonzero().squeeze(1).tolist():
                assert 10 <= frames[i, :, c].sum() <= 14  # each class over its clip's 10 frames, give or take smoothing
    # without frame targets nothing is rolled and no third output is made
    assert mix(x, y, 0.0, 6.0, f, torch.Generator().manual_seed(0))[2] is None


def test_frame_loss_needs_a_multilabel_model_with_attention_pooling():
    for asked in ({"train": {"frame_loss": 1.0}},
                  {"train": {"task": "multilabel", "frame_loss": 1.0}, "model": {"pooling": "mean"}}):
        with pytest.raises(AudioclfError, match="--task multilabel --pooling attention"):
            resolve(overrides=asked)
    c = resolve(overrides={"train": {"task": "multilabel", "frame_loss": 1.0}, "model": {"pooling": "attention"}})
    from audioclf.tasks import training_augment

    assert training_augment(c).time_shift == 0 and training_augment(c).time_stretch == 0  # the mix rolls instead


def test_multilabel_brings_its_recipe_under_presets_yaml_and_flags(tmp_path):
    def got(c):
        return c.model.pooling, c.train.frame_loss, c.augment.mix_clips, c.train.epochs

    multiclass = resolve()
    assert got(multiclass) == ("mean", 0.0, 2, 15)  # mn04_as's recipe, untouched by the tagger's
    assert got(resolve(overrides={"train": {"task": "multilabel"}})) == ("attention", 1.0, 3, 60)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train:\n  task: multilabel\n  epochs: 20\n")
    assert got(resolve(yaml_path=yaml, overrides={"augment": {"mix_clips": 2}})) == ("attention", 1.0, 2, 20)
    # another pooling, asked for, goes without frame targets rather than failing on the task's default
    assert got(resolve(overrides={"train": {"task": "multilabel"}, "model": {"pooling": "mean"}})) == ("mean", 0.0, 3, 60)
    assert resolve(preset="tutorial", overrides={"train": {"task": "multilabel"}}).train.epochs == 25  # presets win


def test_frame_objective_scores_the_steps_against_pooled_frame_targets():
    from audioclf.tasks import frame_objective, with_frames

    clip = torch.zeros(1, 2)
    frames = torch.zeros(1, 8, 2)
    frames[0, 4:6, 0] = 1.0  # class 0 sounds in the second half of step 1 of 2 (of 4 frames each)
    target = with_frames(torch.tensor([[1.0, 0.0]]), frames)
    right, wrong = torch.tensor([[[-9.0, -9.0], [9.0, -9.0]]]), torch.tensor([[[9.0, -9.0], [-9.0, -9.0]]])
    loss = frame_objective(lambda logits, t: smoothed_bce(logits, t), 1.0)
    assert loss((clip, right), target).item() == pytest.approx(2 * np.log(2), abs=1e-3)  # the clip's part only
    assert (loss((clip, wrong), target) - loss((clip, right), target)).item() == pytest.approx(9.0, abs=1e-3)


@pytest.mark.slow
def test_a_model_trained_with_frame_loss_detects_and_predicts(synth_dir, tmp_path):
    from audioclf.train import fit

    cfg = resolve(overrides={"features": {"sample_rate": SYNTH_SAMPLE_RATE, "duration_s": 1.0},
                             "model": {"backbone": "resnet18", "pretrained": "none", "pooling": "attention"},
                             "data": {"root": str(synth_dir), "format": "folder", "val_split": 0.25},
                             "train": {"task": "multilabel", "epochs": 2, "batch_size": 8, "lr": 1e-3,
                                       "patience": 0, "quiet": True, "seed": 3, "frame_loss": 1.0}})
    fit(cfg, tmp_path / "run")
    model = audioclf.load(tmp_path / "run")
    assert model.config.model.pooling == "attention" and model.config.train.frame_loss == 1.0
    clip = sorted((synth_dir / SYNTH_CLASSES[0]).glob("*.wav"))[0]
    assert model.predict_proba(clip).shape[-1] == len(SYNTH_CLASSES)
    from audioclf.commands.detect import load_detector
    from audioclf.events import DetectConfig, probability_track

    duration, track = probability_track(load_detector(str(tmp_path / "run")), str(clip), DetectConfig())
    assert track.shape[1] == len(SYNTH_CLASSES) and ((track >= 0) & (track <= 1)).all()
