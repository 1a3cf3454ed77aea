import pytest
import yaml

from audioclf.config import (AudioclfError, AugmentConfig, DataConfig, FeatureConfig, ModelConfig, RunConfig,
                             TrainConfig, from_dict, resolve)


# ------------------------------------------------------------------------------------------- from_dict

def test_from_dict_refuses_unknown_key_and_names_it():
    with pytest.raises(AudioclfError, match=r"train\.epoch\b.*allowed:.*epochs"):
        RunConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(AudioclfError, match="unknown config key.*optimizer"):
        RunConfig.from_dict({"optimizer": "adam"})


@pytest.mark.parametrize("section, key, value", [
    ("train", "epochs", "3"),
    ("train", "lr", True),
    ("train", "epochs", 3.0),
    ("train", "amp", "yes"),
    ("features", "sample_rate", 22050.0),
    ("model", "pretrained", "yes"),
    ("data", "format", "parquet"),
])
def test_from_dict_refuses_wrong_types(section, key, value):
    with pytest.raises(AudioclfError, match=f"{section}.{key}=.*wrong type"):
        RunConfig.from_dict({section: {key: value}})


def test_from_dict_refuses_a_section_that_is_not_a_mapping():
    with pytest.raises(AudioclfError, match="must be a mapping"):
        RunConfig.from_dict({"train": [1, 2]})


def test_int_is_accepted_for_float():
    c = RunConfig.from_dict({"train": {"weight_decay": 0, "lr": 1}, "features": {"duration_s": 2}})
    assert c.train.weight_decay == 0.0 and isinstance(c.train.weight_decay, float)
    assert c.features.duration_s == 2.0 and isinstance(c.features.duration_s, float)
    assert c.train.lr == 1


@pytest.mark.parametrize("make, text", [
    (lambda: TrainConfig(epochs=0), "epochs=0"),
    (lambda: TrainConfig(lr=0.0), "lr=0.0"),
    (lambda: TrainConfig(label_smoothing=1.5), "label_smoothing=1.5"),
    (lambda: FeatureConfig(duration_s=-1.0), "duration_s=-1.0"),
    (lambda: FeatureConfig(hop_length=2048), "hop_length=2048"),
    (lambda: FeatureConfig(f_max=30000.0), "f_max=30000.0"),
    (lambda: AugmentConfig(mixup_alpha=-0.5), "mixup_alpha=-0.5"),
    (lambda: ModelConfig(dropout=1.0), "dropout=1.0"),
    (lambda: DataConfig(val_split=0.0), "val_split=0.0"),
])
def test_range_errors_name_the_value(make, text):
    with pytest.raises(AudioclfError, match=f"{text}.*out of range"):
        make()


def test_choice_and_cross_field_errors():
    with pytest.raises(AudioclfError, match="scheduler='step'.*plateau"):
        TrainConfig(scheduler="step")
    with pytest.raises(AudioclfError, match="device='gpu'"):
        TrainConfig(device="gpu")
    with pytest.raises(AudioclfError, match="both 2"):
        DataConfig(val_fold=2, test_fold=2)
    assert TrainConfig(device="cuda:1").device == "cuda:1"


def test_feature_config_derived_sizes():
    c = FeatureConfig(sample_rate=16000, duration_s=1.5, hop_length=160)
    assert c.n_samples == 24000
    assert c.n_frames == 1 + 24000 // 160


# ---------------------------------------------------------------------------------------------- resolve

def test_resolve_precedence_defaults_preset_yaml_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"epochs": 7, "batch_size": 8}, "features": {"n_mels": 64}}))

    assert resolve().model.backbone == "mn04_as"  # the default preset's backbone, with its front end and recipe
    assert resolve().features.sample_rate == 32000
    assert resolve(overrides={"model": {"backbone": "resnet18"}}) == RunConfig()  # resnet18 adds nothing to the defaults

    seeded = resolve("tutorial")
    assert seeded.train.lr == 1e-4 and seeded.preset == "tutorial"
    assert seeded.train.scheduler == "plateau" and seeded.augment.n_time_masks == 1  # the tutorial notebook's

    c = resolve("tutorial", cfg, {"train": {"batch_size": 4}})
    assert c.train.lr == 1e-4  # preset, untouched by YAML and flags
    assert seeded.train.epochs != 7 and c.train.epochs == 7  # YAML beats the preset
    assert c.features.n_mels == 64  # YAML beats the default
    assert c.train.batch_size == 4  # flags beat YAML
    assert c.train.weight_decay == TrainConfig().weight_decay  # defaults fill the rest


def test_resolve_errors(tmp_path):
    with pytest.raises(AudioclfError, match="Unknown preset='fast'.*default"):
        resolve("fast")
    with pytest.raises(AudioclfError, match="cannot read config file.*missing.yaml"):
        resolve(yaml_path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(AudioclfError, match="bad.yaml is not valid YAML"):
        resolve(yaml_path=bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epocs: 3\n")
    with pytest.raises(AudioclfError, match="train.epocs"):
        resolve(yaml_path=typo)


def test_resolve_refuses_yaml_that_is_not_a_mapping(tmp_path):
    listy = tmp_path / "list.yaml"
    listy.write_text("- epochs: 3\n")
    with pytest.raises(AudioclfError, match="list.yaml"):
        resolve(yaml_path=listy)


def test_empty_yaml_means_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert resolve(yaml_path=empty) == resolve()


# ----------------------------------------------------------------------------------------- round trips

def _custom() -> RunConfig:
    return RunConfig(
        data=DataConfig(root="/data/esc50", format="esc50", esc10=True, val_fold=4, test_fold=5, strict=True),
        features=FeatureConfig(sample_rate=16000, duration_s=2.5, n_mels=64, f_min=20.0, f_max=7600.0),
        augment=AugmentConfig(n_time_masks=2, mixup_alpha=0.4, gain_db=6.0),
        model=ModelConfig(pretrained="none", dropout=0.3, normalization="global"),
        train=TrainConfig(epochs=3, lr=3e-4, scheduler="cosine", device="cpu", amp=False),
        preset="tutorial",
    )


def test_round_trip_through_dict():
    c = _custom()
    d = c.to_dict()
    assert d["features"]["f_max"] == 7600.0 and d["data"]["val_fold"] == 4
    assert RunConfig.from_dict(d) == c
    assert RunConfig.from_dict(d) != RunConfig()


def test_round_trip_through_yaml(tmp_path):
    c = _custom()
    c.save_yaml(tmp_path / "config.yaml")
    assert RunConfig.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == c


def test_nested_from_dict_keeps_defaults_for_absent_keys():
    c = from_dict(RunConfig, {"augment": {"gain_db": 3}})
    assert c.augment.gain_db == 3.0 and c.augment.freq_mask_width == AugmentConfig().freq_mask_width
    assert c.features == FeatureConfig()


def test_configs_saved_before_a_setting_existed_keep_the_old_behaviour():
    old = RunConfig().to_dict()
    del old["features"]["peak_normalize"], old["augment"]["time_shift"]
    c = RunConfig.from_saved(old)  # a model trained without peak normalisation must predict without it
    assert c.features.peak_normalize is False and c.augment.time_shift == 0.0
    assert c.features.n_mels == 80 and c.train.epochs == RunConfig().train.epochs
    assert RunConfig.from_saved(RunConfig().to_dict()).features.peak_normalize is True
    assert RunConfig.from_dict(old).features.peak_normalize is True  # a user's file gets today's default


def test_the_old_preset_name_still_works_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="audioclf.config"):
        old = resolve("seed")
    assert old == resolve("tutorial") and old.preset == "tutorial"
    assert "'seed' is deprecated: it is called 'tutorial' now" in caplog.text
    saved = {**resolve("tutorial").to_dict(), "preset": "seed"}  # a run started under the old name
    assert RunConfig.from_saved(saved).preset == "tutorial"


def test_yaml_anchors_and_aliases_within_the_bounds_work(tmp_path):
    from audioclf.config import load_yaml

    config = tmp_path / "c.yaml"
    config.write_text("common: &lr 0.01\ntrain:\n  lr: *lr\n  epochs: 3\n")
    assert load_yaml(config)["train"] == {"lr": 0.01, "epochs": 3}
