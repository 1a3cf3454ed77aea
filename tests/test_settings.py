"""Each setting is declared once (issue 13): the dataclass field carries its default, help, flag and allowed
values; the train and cv flags, their choices and the overrides are generated from it; settings that were
removed are dropped from old saved configs at their "off" value and refused at any other."""

import argparse
import inspect
import typing

import pytest
import torch

from audioclf.augment import RandomFrequencyShift, RandomGain, RandomTimeShift, RandomTimeStretch, TimeMasking
from audioclf.checkpoint import inference_state, load_model, save_checkpoint
from audioclf.cli import build_parser, config_from_args, main
from audioclf.config import (SECTIONS, AudioclfError, FeatureConfig, ModelConfig, RunConfig, resolve, setting,
                             settings)
from audioclf.features import MelScale, Normalize, Spectrogram, kaldi_mel_filterbank, mel_filterbank
from audioclf.mobilenet import MobileNet
from audioclf.model import AudioMobileNet, AudioResNet, build_network

ALL = [s for cls in SECTIONS.values() for s in settings(cls)]


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _option(command: str, flag: str) -> argparse.Action:
    return _subparser(command)._option_string_actions[flag]


def _train(*argv) -> RunConfig:
    return config_from_args(build_parser().parse_args(["train", "data/", "--out", "x", *map(str, argv)]))


# ------------------------------------------------------------------------------------- the declarations

def test_every_setting_has_a_train_flag_or_a_reason_to_be_yaml_only():
    assert len(ALL) > 50  # every section was read
    for s in ALL:
        assert s.help.strip(), s.name
        if s.flag is None:
            assert s.yaml_only and len(s.yaml_only) > 10, f"{s.section}.{s.name}: no flag and no reason"
            continue
        action = _option("train", s.flag)
        assert action.dest == s.name, s.flag


def test_setting_names_are_unique_across_sections():
    # the flags' destinations are the bare names: two sections with one name would share a flag
    names = [s.name for s in ALL]
    assert len(names) == len(set(names))


def test_the_generated_choices_are_the_literal():
    hints = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    literal = [s for s in ALL if typing.get_origin(hints[s.section][s.name]) is typing.Literal]
    assert {s.name for s in literal} >= {"format", "balance", "window", "pretrained", "normalization", "scheduler"}
    for s in literal:
        assert s.choices == typing.get_args(hints[s.section][s.name])
        if s.flag:
            assert tuple(_option("train", s.flag).choices) == s.choices
    assert tuple(_option("train", "--backbone").choices) == settings(ModelConfig)[0].choices
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "data/", "--out", "x", "--scheduler", "step"])


def test_a_setting_has_a_flag_or_a_reason_not_both():
    with pytest.raises(TypeError, match="not both"):
        setting(1, help="h", flag="--x", yaml_only="because")


def test_declared_ranges_and_choices_are_checked_with_the_value_and_what_is_allowed():
    with pytest.raises(AudioclfError, match=r"time_stretch=1\.5 is out of range: it must be <= 1\.0"):
        resolve(overrides={"augment": {"time_stretch": 1.5}})
    with pytest.raises(AudioclfError, match=r"Unsupported normalization='clip'; choose one of 'band', 'global'"):
        ModelConfig(normalization="clip")
    with pytest.raises(AudioclfError, match=r"Unsupported window='hamming'; choose one of 'periodic', 'symmetric'"):
        FeatureConfig(window="hamming")


# ------------------------------------------------------------------------------------------ the flags

@pytest.mark.parametrize("argv, section, name, value", [
    (["--time-stretch", "0.2"], "augment", "time_stretch", 0.2),
    (["--mixup", "0.4"], "augment", "mixup_alpha", 0.4),
    (["--freq-mask", "7"], "augment", "freq_mask_width", 7),
    (["--time-mask", "9"], "augment", "time_mask_width", 9),
    (["--n-time-masks", "3"], "augment", "n_time_masks", 3),
    (["--duration", "2.5"], "features", "duration_s", 2.5),
    (["--backbone", "resnet18", "--n-mels", "64"], "features", "n_mels", 64),
    (["--backbone", "resnet18", "--no-peak-normalize"], "features", "peak_normalize", False),
    (["--no-pretrained"], "model", "pretrained", "none"),
    (["--backbone", "resnet18", "--pretrained", "imagenet"], "model", "pretrained", "imagenet"),
    (["--weights", "w.pt"], "model", "weights_path", "w.pt"),
    (["--normalization", "global"], "model", "normalization", "global"),
    (["--backbone", "resnet18", "--no-amp"], "train", "amp", False),
    (["--amp"], "train", "amp", True),  # the MobileNets' recipe turns it off
    (["--quiet"], "train", "quiet", True),
    (["--deterministic"], "train", "deterministic", True),
    (["--grad-clip", "1.5"], "train", "grad_clip", 1.5),
    (["--scheduler", "onecycle"], "train", "scheduler", "onecycle"),
    (["--esc10"], "data", "esc10", True),
    (["--strict"], "data", "strict", True),
    (["--cache-dir", "/tmp/c"], "data", "cache_dir", "/tmp/c"),
    (["--num-workers", "3"], "data", "num_workers", 3),
    (["--val-fold", "2", "--test-fold", "3"], "data", "test_fold", 3),
])
def test_a_flag_reaches_its_setting(argv, section, name, value):
    cfg = _train(*argv)
    assert getattr(getattr(cfg, section), name) == value
    without = _train("--backbone", "resnet18") if "resnet18" in argv else _train()
    assert getattr(getattr(without, section), name) != value  # not the default by chance


def test_flags_not_given_leave_the_config_as_resolved():
    assert _train() == resolve(overrides={"data": {"root": "data/", "format": "folder"}})


def test_a_weights_file_excludes_another_pretrained_choice(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "data/", "--out", "x", "--weights", "w.pt", "--no-pretrained"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert _train("--weights", "w.pt").model.pretrained == "auto"  # a given file is loaded or refused


def test_a_flag_value_out_of_range_is_refused_with_its_setting_name(synth_dir, tmp_path, capsys):
    assert main(["train", str(synth_dir), "--out", str(tmp_path / "run"), "--time-mask-fraction", "2"]) == 2
    assert "time_mask_fraction=2.0 is out of range: it must be <= 1.0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_yaml_keys_are_still_refused(synth_dir, tmp_path, capsys):
    y = tmp_path / "my.yaml"
    y.write_text("features:\n  mel_gain: 2.0\n")  # a removed setting is an unknown key in a user's file
    assert main(["train", str(synth_dir), "--out", str(tmp_path / "run"), "--config", str(y)]) == 2
    assert "unknown config key(s) features.mel_gain" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- cv

@pytest.mark.parametrize("flag", ["--test-fold", "--val-fold"])
def test_cv_refuses_fold_flags_saying_it_picks_them_itself(flag, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["cv", "data/", "--out", "x", flag, "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"cv chooses each fold's test and validation folds itself, so it has no {flag}" in err
    assert "--folds" in err
    assert flag not in _subparser("cv").format_help()  # and cv's help does not offer it


def test_cv_takes_every_other_setting_and_its_folds():
    args = build_parser().parse_args(["cv", "data/", "--out", "x", "--folds", "1", "3", "--time-stretch", "0.1",
                                      "--no-pretrained"])
    cfg = config_from_args(args)
    assert args.folds == [1, 3] and cfg.augment.time_stretch == 0.1 and cfg.model.pretrained == "none"
    assert cfg.data.val_fold is None and cfg.data.test_fold is None


# --------------------------------------------------------------------------------- removed settings

def _saved(**extra) -> dict:
    d = RunConfig(features=FeatureConfig(sample_rate=16000, n_mels=32, duration_s=1.0),
                  model=ModelConfig(pretrained="none")).to_dict()
    for key, value in extra.items():
        section, name = key.split("__")
        d[section][name] = value
    return d


def test_a_removed_setting_at_its_off_value_is_dropped_from_a_saved_config():
    d = _saved(features__mel_gain=1.0, model__stem_pool=True)
    assert RunConfig.from_saved(d) == RunConfig.from_saved(_saved())


@pytest.mark.parametrize("key, value, text", [
    ("features__mel_gain", 1e4, "features.mel_gain=10000.0"),
    ("model__stem_pool", False, "model.stem_pool=False"),
    ("model__normalization", "clip", "model.normalization='clip'"),
])
def test_a_removed_setting_that_was_on_is_refused_with_a_clear_message(key, value, text):
    with pytest.raises(AudioclfError) as e:
        RunConfig.from_saved(_saved(**{key: value}))
    msg = str(e.value)
    assert f"the model was trained with {text}, a setting this audioclf" in msg and "removed" in msg
    assert "the audioclf version that trained it" in msg and "retrain" in msg


def test_old_checkpoints_load_or_are_refused_naming_the_file(tmp_path):
    torch.manual_seed(0)
    model = AudioResNet.from_config(ModelConfig(), 3, 32).eval()
    state = inference_state(model, RunConfig.from_saved(_saved()), ["a", "b", "c"])
    old = {**state, "config": _saved(features__mel_gain=1.0, model__stem_pool=True)}
    save_checkpoint(old, tmp_path / "old.pt")
    restored, config, _ = load_model(tmp_path / "old.pt")
    x = torch.rand(2, 32, 40)
    torch.testing.assert_close(restored(x), model(x))
    assert "mel_gain" not in config.to_dict()["features"]
    save_checkpoint({**state, "config": _saved(model__stem_pool=False)}, tmp_path / "nopool.pt")
    with pytest.raises(AudioclfError, match=r"nopool\.pt.*model\.stem_pool=False.*removed"):
        load_model(tmp_path / "nopool.pt")


# ------------------------------------------------------------------------- defaults in the config only

@pytest.mark.parametrize("fn, allowed", [
    (Spectrogram, set()), (MelScale, set()), (mel_filterbank, set()), (kaldi_mel_filterbank, set()),
    (Normalize, set()), (AudioResNet, set()), (AudioMobileNet, set()), (build_network, set()),
    (MobileNet, {"n_classes"}),  # 527: the published AudioSet head, not a setting
    (TimeMasking, {"generator", "max_fraction"}),  # max_fraction 1 = no cap (frequency masks have none)
    (RandomTimeShift, {"generator"}), (RandomTimeStretch, {"generator"}), (RandomFrequencyShift, {"generator"}),
    (RandomGain, {"generator", "features"}),
])
def test_feature_and_model_modules_repeat_no_setting_default(fn, allowed):
    params = inspect.signature(fn).parameters
    assert {n for n, p in params.items() if p.default is not inspect.Parameter.empty} <= allowed
