import logging
import shutil
import urllib.error
from dataclasses import replace

import pytest
import torch
import torch.hub
from torch import nn
from torchvision.models import resnet18

from audioclf import weights
from audioclf.backbones import BACKBONES
from audioclf.config import AudioclfError, FeatureConfig, ModelConfig
from audioclf.features import LogMel
from audioclf.fileio import sha256
from audioclf.model import FAMILIES, AudioMobileNet, AudioResNet, WaveformClassifier, build_model, place_model

RESNET18 = BACKBONES["resnet18"]


@pytest.fixture(scope="module")
def rgb_state_dict():
    """A torchvision ResNet-18 state dict with every float tensor random (BN statistics included), so
    "loaded" can never be confused with "freshly initialised"."""
    g = torch.Generator().manual_seed(123)
    return {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v)
            for k, v in resnet18(weights=None).state_dict().items()}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def pin_prefix(monkeypatch, prefix):
    """ResNet-18's entry with another published hash prefix (None: unchecked), so that a random state dict
    can stand in for the official file, which cannot be downloaded here."""
    monkeypatch.setitem(BACKBONES, "resnet18", replace(RESNET18, sha256_prefix=prefix))


@pytest.fixture
def unpinned(monkeypatch):
    pin_prefix(monkeypatch, None)


def cache_weights(torch_home, state_dict):
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state_dict, path)
    return path


def assert_loaded(model: AudioResNet, sd: dict, n_classes: int):
    own = model.backbone.state_dict()
    torch.testing.assert_close(own["conv1.weight"], sd["conv1.weight"].sum(dim=1, keepdim=True))
    assert own["conv1.weight"].shape == (64, 1, 7, 7)
    for k, v in sd.items():
        if k != "conv1.weight" and not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    head = model.backbone.fc[-1]
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (512, n_classes)


# ----------------------------------------------------------------------------------- ImageNet weights

def test_imagenet_is_downloaded_into_the_hub_cache_then_read_from_it(torch_home, tmp_path, rgb_state_dict,
                                                                     monkeypatch):
    official = tmp_path / "official.pth"
    torch.save(rgb_state_dict, official)
    pin_prefix(monkeypatch, sha256(official)[:8])  # the file's own 8 hex digits, as torchvision publishes them
    urls = []

    def fake_download(url, dst, **kwargs):
        urls.append(url)
        shutil.copy(official, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model, pretrained = build_model(ModelConfig(pretrained="imagenet"), n_classes=5, n_mels=80)
    assert pretrained is True and urls == [RESNET18.weights_url]
    assert_loaded(model, rgb_state_dict, 5)
    assert weights.hub_path(RESNET18) == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights.status("resnet18") == "cached"
    model, pretrained = build_model(ModelConfig(pretrained="auto"), n_classes=3, n_mels=80)
    assert pretrained is True and len(urls) == 1  # the second time, from the cache
    assert_loaded(model, rgb_state_dict, 3)


def test_a_cached_file_without_torchvisions_hash_prefix_is_refused(torch_home, offline, rgb_state_dict, caplog):
    path = cache_weights(torch_home, rgb_state_dict)  # right name and shapes, but not the official bytes
    with pytest.raises(AudioclfError) as e:
        build_model(ModelConfig(pretrained="imagenet"), n_classes=5, n_mels=80)
    msg = str(e.value)
    assert msg.startswith(f"{path}: sha256 {sha256(path)} is not that of the official resnet18-f37072fd.pth "
                          f"(f37072fd...)")
    assert RESNET18.weights_url in msg
    _, pretrained = build_model(ModelConfig(pretrained="auto"), n_classes=3, n_mels=80)
    assert pretrained is False and "from scratch instead" in caplog.text


@pytest.mark.parametrize("wrapped", [False, True])
def test_imagenet_from_weights_path(tmp_path, offline, unpinned, rgb_state_dict, wrapped):
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": rgb_state_dict} if wrapped else rgb_state_dict, path)
    assert not weights.hub_path(RESNET18).exists()
    # weights_path implies pretrained, whatever ``pretrained`` says.
    model, pretrained = build_model(ModelConfig(pretrained="none", weights_path=str(path)), n_classes=5, n_mels=80)
    assert pretrained is True
    assert_loaded(model, rgb_state_dict, 5)


def test_a_weights_path_is_checked_like_the_cached_file(tmp_path, offline, rgb_state_dict):
    path = tmp_path / "r18.pth"
    torch.save(rgb_state_dict, path)
    with pytest.raises(AudioclfError, match=r"r18.pth: sha256 \w+ is not that of the official resnet18-f37072fd.pth"):
        build_model(ModelConfig(pretrained="auto", weights_path=str(path)), n_classes=5, n_mels=80)


def test_offline_with_nothing_cached_says_what_to_do(torch_home, offline):
    assert not weights.hub_path(RESNET18).exists()
    with pytest.raises(AudioclfError) as e:
        build_model(ModelConfig(pretrained="imagenet"), n_classes=5, n_mels=80)
    msg = str(e.value)
    # the file, where to get it, where to put it, why it failed and how to do without
    assert "resnet18-f37072fd.pth" in msg and RESNET18.weights_url in msg
    assert str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "Temporary failure in name resolution" in msg and "--pretrained none" in msg


def test_auto_falls_back_to_scratch_with_a_warning(torch_home, offline, caplog):
    with caplog.at_level(logging.WARNING, logger="audioclf.model"):
        model, pretrained = build_model(ModelConfig(pretrained="auto"), n_classes=4, n_mels=80)
    assert pretrained is False
    assert model.backbone.fc[-1].out_features == 4
    assert "from scratch instead" in caplog.text and "resnet18-f37072fd.pth" in caplog.text


def test_none_never_looks_for_weights(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("should not be called")

    monkeypatch.setattr("audioclf.weights.load_state_dict", fail)
    model, pretrained = build_model(ModelConfig(pretrained="none", dropout=0.3), n_classes=2, n_mels=80)
    assert pretrained is False and model.backbone.fc[0].p == 0.3


def test_corrupt_cached_weights(torch_home, offline, unpinned, caplog):
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xc3" + bytes(range(256)) * 8)
    with pytest.raises(AudioclfError, match="resnet18-f37072fd.pth: not a readable resnet18 weights file"):
        build_model(ModelConfig(pretrained="imagenet"), n_classes=3, n_mels=80)
    _, pretrained = build_model(ModelConfig(pretrained="auto"), n_classes=3, n_mels=80)
    assert pretrained is False and "from scratch instead" in caplog.text


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 50, b"PK\x03\x04truncated zip", b"plain text"])
def test_unreadable_weights_path_names_the_file(tmp_path, unpinned, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(AudioclfError, match="weights.pth: not a readable resnet18 weights file") as e:
        weights.load_state_dict("resnet18", str(path))
    assert "\n" not in str(e.value)
    # An explicit file is never silently replaced by scratch training, even with "auto".
    with pytest.raises(AudioclfError, match="weights.pth"):
        build_model(ModelConfig(pretrained="auto", weights_path=str(path)), n_classes=3, n_mels=80)


def test_weights_that_are_not_resnet18_are_refused(rgb_state_dict):
    with pytest.raises(AudioclfError, match="not a torchvision ResNet-18"):
        AudioResNet(3, 80, 0.0, pooling="mean").load_imagenet({"weight": torch.zeros(3)})
    partial = {k: v for k, v in rgb_state_dict.items() if not k.startswith("layer4.")}
    with pytest.raises(AudioclfError, match="missing.*layer4"):
        AudioResNet(3, 80, 0.0, pooling="mean").load_imagenet(partial)


def test_summed_stem_sees_a_grey_image_like_the_rgb_stem(rgb_state_dict):
    model = AudioResNet(5, 80, 0.0, pooling="mean").load_imagenet(rgb_state_dict)
    rgb = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
    rgb.weight.data.copy_(rgb_state_dict["conv1.weight"])
    x = torch.randn(2, 1, 40, 50)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.conv1(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ the model

def test_forward_shapes_and_normalisation():
    torch.manual_seed(0)
    model = AudioResNet(n_classes=7, n_mels=32, dropout=0.0, pooling="mean").eval()
    x = torch.rand(3, 32, 45)
    assert model(x).shape == (3, 7)
    # The normalisation buffers are applied before the backbone.
    model.norm.mean.fill_(0.5)
    model.norm.std.fill_(2.0)
    with torch.no_grad():
        direct = model.backbone(((x - 0.5) / 2.0).unsqueeze(1))
        torch.testing.assert_close(model(x), direct)
    assert {"norm.mean", "norm.std"} <= set(model.state_dict())


def test_one_class_is_refused():
    with pytest.raises(AudioclfError, match="n_classes=1"):
        AudioResNet(1, 80, 0.0, pooling="mean")


def test_waveform_classifier_gives_probabilities():
    torch.manual_seed(0)
    features = FeatureConfig(sample_rate=16000, duration_s=0.5, n_mels=32, n_fft=512, hop_length=256,
                             win_length=512)
    model = AudioResNet(3, n_mels=32, dropout=0.0, pooling="mean").eval()
    clf = WaveformClassifier(features, model).eval()
    wave = torch.randn(2, features.n_samples) * 0.1
    with torch.no_grad():
        probs = clf(wave)
        torch.testing.assert_close(probs, torch.softmax(model(LogMel(features)(wave)), -1))
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_our_resnet18_is_torchvisions_module_for_module(rgb_state_dict):
    from torchvision.models import ResNet18_Weights

    from audioclf.model import ResNet18

    url = ResNet18_Weights.IMAGENET1K_V1.url  # torchvision names its files <name>-<first 8 hex of sha256>.pth
    assert RESNET18.weights_url == url and RESNET18.weights_file == url.rsplit("/", 1)[1] == "resnet18-f37072fd.pth"
    assert RESNET18.sha256_prefix == torch.hub.HASH_REGEX.search(RESNET18.weights_file).group(1)
    ours, theirs = ResNet18(nn.Linear(512, 1000)), resnet18(weights=None)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(rgb_state_dict), theirs.load_state_dict(rgb_state_dict)
    x = torch.randn(2, 3, 80, 120, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    # the same initialisation scheme: Kaiming-normal (fan_out) convolutions, unit BatchNorm
    torch.manual_seed(0)
    fresh = ResNet18(nn.Linear(512, 10))
    std = fresh.layer3[0].conv1.weight.std().item()
    assert abs(std - (2 / (256 * 9)) ** 0.5) < 0.002 and torch.equal(fresh.bn1.weight, torch.ones(64))


def test_inference_never_imports_torchvision(tmp_path):
    import subprocess
    import sys

    code = ("import sys, audioclf, audioclf.predict, audioclf.cli, audioclf.serve, audioclf.export; "
            "from audioclf.model import AudioResNet; AudioResNet(3, 80, 0.0, pooling='mean'); print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # it costs 2-3 s of a prediction's cold start


def test_amp_dtype_uses_bf16_on_cpu_only_where_it_is_native(monkeypatch):
    from audioclf.runtime import amp_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert amp_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert amp_dtype(cpu) is None  # emulated bf16 is slower than fp32: stay in fp32

    def gone():
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", gone)
    assert amp_dtype(cpu) is None  # a torch without the private probe: fp32, not a crash


@pytest.mark.parametrize("name, cls", [("resnet18", AudioResNet), ("mn04_as", AudioMobileNet)])
def test_the_family_table_builds_and_places_each_backbone(name, cls):
    config = ModelConfig(backbone=name, pretrained="none")
    assert BACKBONES[name].family in FAMILIES
    model, pretrained = build_model(config, n_classes=3, n_mels=32 if name == "resnet18" else 128)
    assert isinstance(model, cls) and not pretrained
    read = []

    def frames():  # the training clips' features: read only where the family fits something to them
        for k in range(3):
            read.append(k)
            yield torch.randn(32, 20) * 3 + k

    place_model(model, config, frames(), torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"
    if name == "resnet18":
        assert read == [0, 1, 2] and model.norm.mean.abs().sum() > 0  # its input standardisation was fitted
    else:
        assert read == []  # the MobileNets' front end normalises with fixed numbers


def test_each_family_loads_its_own_pretrained_weights():
    sd = AudioResNet(1000, 80, 0.0, pooling="mean").backbone.state_dict()  # the shape of torchvision's file, 1-channel stem
    sd["conv1.weight"] = sd["conv1.weight"].repeat(1, 3, 1, 1)
    model = FAMILIES["resnet"].load_pretrained(AudioResNet(5, 80, 0.0, pooling="mean"), sd, "resnet18")
    assert torch.equal(model.backbone.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])
    mn = AudioMobileNet(5, 0.4, 0.0, pooling="mean")
    official = AudioMobileNet(527, 0.4, 0.0, pooling="mean").net.state_dict()
    FAMILIES["mobilenet"].load_pretrained(mn, official, "mn04_as")
    first = next(iter(official))
    assert torch.equal(mn.net.state_dict()[first], official[first])


@pytest.mark.parametrize("backbone", ["resnet18", "mn04_as"])
def test_attention_pooling_starts_as_the_mean_of_the_steps_and_returns_them(backbone):
    from audioclf.model import build_network

    net = build_network(ModelConfig(backbone=backbone, pretrained="none", pooling="attention"), 4, 128).eval()
    x = torch.randn(2, 128, 300)
    logits, steps = net(x, steps=True)
    assert logits.shape == (2, 4) and steps.shape == (2, 10, 4)
    assert torch.equal(net(x), logits) and torch.equal(net.frame_logits(x), steps)
    # zero attention weights at the start: every step counts the same
    assert torch.allclose(logits, steps.mean(1), atol=1e-6)


def test_attention_pooling_lets_one_step_carry_its_class():
    from audioclf.mobilenet import AttentionPool

    pool = AttentionPool(3, 2)
    with torch.no_grad():
        pool.attention.weight.copy_(torch.tensor([[10.0, 0, 0], [0, 0, 0]]))  # class 0 attends to feature 0
    h = torch.zeros(1, 8, 3)
    h[0, 5, 0] = 1.0  # feature 0 fires at step 5 only
    step_logits = torch.full((1, 8, 2), -4.0)
    step_logits[0, 5] = 4.0
    out = pool(h, step_logits).detach()
    assert out[0, 0] > 3.9  # the one step where class 0 sounds decides its score
    assert out[0, 1].item() == pytest.approx(-3.0)  # uniform weights: the mean of its steps, (7 * -4 + 4) / 8


def test_a_model_saved_before_pooling_existed_loads_as_mean():
    from audioclf.config import RunConfig

    saved = RunConfig().to_dict()
    del saved["model"]["pooling"], saved["train"]["frame_loss"]
    c = RunConfig.from_saved(saved)
    assert c.model.pooling == "mean" and c.train.frame_loss == 0.0


@pytest.mark.parametrize("backbone", ["resnet18", "mn04_as"])
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_logits_and_embedding_in_one_pass_equal_forward_and_embed(backbone, pooling):
    from audioclf.model import build_network

    torch.manual_seed(0)
    net = build_network(ModelConfig(backbone=backbone, pretrained="none", pooling=pooling), 4, 128).eval()
    x = torch.randn(2, 128, 300)
    logits, emb = net.logits_and_embedding(x)
    torch.testing.assert_close(logits, net(x))
    torch.testing.assert_close(emb, net.embed(x))
