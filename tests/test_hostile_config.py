"""Hostile settings (issue 12, sections 2 and 5): every bad number, flag or YAML section ends in a one-line
message naming the value and what is allowed (exit code 2), before any work; nothing silently becomes a
default or another dataset layout."""

import csv

import pytest

from audioclf.cli import build_parser, config_from_args, main
from audioclf.config import AudioclfError, FeatureConfig, ModelConfig, RunConfig, TrainConfig, resolve
from audioclf.model import AudioResNet
from audioclf.predict import Classifier


def _refused(capsys, argv, *texts):
    """``audioclf ARGV`` exits 2 with one line on stderr that holds every one of ``texts``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for text in texts:
        assert text in err, err
    return err


@pytest.mark.parametrize("flag", ["--mixup", "--gain-db", "--label-smoothing", "--lr", "--val-split", "--duration",
                                  "--dropout", "--weight-decay", "--time-shift", "--time-stretch"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_with_a_message(flag, value, synth_dir, tmp_path, capsys):
    err = _refused(capsys, ["train", str(synth_dir), "--out", str(tmp_path / "run"), f"{flag}={value}"],
                   f"={value}", "is not a finite number: it must be")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_non_finite_setting_without_its_own_range_check_is_still_refused():
    t = TrainConfig()
    t.lr = float("nan")  # a section built, then changed: RunConfig checks every number again
    with pytest.raises(AudioclfError, match="lr=nan is not a finite number"):
        RunConfig(train=t)
    with pytest.raises(AudioclfError, match="gain_db=inf is not a finite number: it must be >= 0.0 and <= 60.0"):
        RunConfig.from_dict({"augment": {"gain_db": float("inf")}})


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_is_refused(seed, synth_dir, tmp_path, capsys):
    _refused(capsys, ["train", str(synth_dir), "--out", str(tmp_path / "run"), "--seed", seed],
             f"seed={seed} is out of range")
    assert TrainConfig(seed=0).seed == 0 and TrainConfig(seed=2**32 - 1).seed == 2**32 - 1


def test_a_yaml_section_of_the_wrong_type_is_refused(synth_dir, tmp_path, capsys):
    y = tmp_path / "my.yaml"
    y.write_text("train: [1, 2]\n")
    _refused(capsys, ["train", str(synth_dir), "--out", str(tmp_path / "run"), "--config", str(y)],
             "my.yaml", "section train: must be a mapping", "not [1, 2]")
    with pytest.raises(AudioclfError, match="section features: must be a mapping.*not 80"):
        y.write_text("features: 80\n")
        resolve(yaml_path=y)
    y.write_text("train:\naugment:\n  gain_db: 3\n")  # an empty section means no settings, not an error
    cfg = resolve(yaml_path=y)
    assert cfg.train == resolve().train and cfg.augment.gain_db == 3.0


def _manifest(synth_dir, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([str(p), p.parent.name] for p in sorted(synth_dir.glob("*/*.wav")))
    return path


def test_the_format_is_guessed_from_data_unless_the_yaml_or_a_flag_names_it(synth_dir, tmp_path):
    clips = _manifest(synth_dir, tmp_path / "clips.csv")
    y = tmp_path / "my.yaml"
    y.write_text("train:\n  epochs: 3\n")

    def resolved(*argv):
        return config_from_args(build_parser().parse_args(["train", *map(str, argv), "--out", "x"]))

    cfg = resolved(clips, "--config", y)  # the README's own example
    assert cfg.data.format == "csv" and cfg.train.epochs == 3
    assert resolved(synth_dir, "--config", y).data.format == "folder"
    y.write_text("data:\n  format: folder\n")  # the YAML names it: kept
    assert resolved(clips, "--config", y).data.format == "folder"
    assert resolved(clips, "--config", y, "--format", "csv").data.format == "csv"  # a flag beats the YAML


def test_cv_has_no_fold_flags(synth_dir):
    for flag in ("--val-fold", "--test-fold"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["cv", str(synth_dir), "--out", "x", flag, "1"])
        assert e.value.code == 2
    args = build_parser().parse_args(["cv", str(synth_dir), "--out", "x", "--val-split", "0.3", "--folds", "1"])
    assert config_from_args(args).data.val_split == 0.3


def test_a_duration_too_short_to_predict_is_refused_at_training(synth_dir, tmp_path, capsys):
    _refused(capsys, ["train", str(synth_dir), "--out", str(tmp_path / "run"), "--duration", "0.01"],
             "duration_s=0.01 is too short", "n_fft/2=512")


@pytest.mark.parametrize("duration_s", [0.01, 0.031, 0.032, 0.0325, 0.033, 0.05])
def test_training_and_prediction_apply_one_window_rule(duration_s):
    """A duration FeatureConfig accepts is a window predict accepts, and the other way round."""
    ok = FeatureConfig(sample_rate=16000, duration_s=1.0)
    clf = Classifier(AudioResNet.from_config(ModelConfig(pretrained="none"), 2, ok.n_mels),
                     RunConfig(features=ok), ["a", "b"], device="cpu")
    try:
        clf._window(duration_s, None)
        predict_ok = True
    except AudioclfError:
        predict_ok = False
    try:
        FeatureConfig(sample_rate=16000, duration_s=duration_s)
        train_ok = True
    except AudioclfError:
        train_ok = False
    assert train_ok == predict_ok, (duration_s, train_ok, predict_ok)


def test_deterministic_flag_reaches_the_config(synth_dir):
    args = build_parser().parse_args(["train", str(synth_dir), "--out", "x", "--deterministic"])
    assert config_from_args(args).train.deterministic is True
    assert config_from_args(build_parser().parse_args(["train", str(synth_dir), "--out", "x"])).train.deterministic is False


# ---------------------------------------------------------------------------------------------- issue 21: YAML

_BOMB = b"".join([b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'] + [
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n".encode() for p, n in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("text, says", [
    (b"train:\n  lr: 0.1\xff\n", "is not UTF-8 text: byte 0xff at offset 16"),
    (b"train: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "nested more than 64 deep"),
    (b"".join(b" " * i + f"k{i}:\n".encode() for i in range(10_000)) + b" " * 10_000 + b"v: 1\n", "nested more than 64 deep"),
    (_BOMB, "once its aliases are expanded"),
    (b"train:\n  lr: 0.1\n  lr: 0.2\n", "the key 'lr' appears twice (line 3)"),
    (b"train:\n  lr: 0.1\ntrain:\n  epochs: 2\n", "the key 'train' appears twice (line 3)"),
])
def test_yaml_hostile_config_files_are_one_line_errors(synth_dir, tmp_path, capsys, text, says):
    config = tmp_path / "c.yaml"
    config.write_bytes(text)
    assert len(_BOMB) < 600  # a few hundred bytes that name 9^9 values
    _refused(capsys, ["train", str(synth_dir), "--config", str(config), "--out", str(tmp_path / "run")], str(config), says)
    assert not (tmp_path / "run").exists()

