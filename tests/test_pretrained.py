"""Pretrained backbones: timm models by name, weights from files, runs and the published sets
(faked here: no internet), the weights' preprocessing carried to predict and export, the
linear probe, the folder fine-tuning recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import folder_config, tiny_config
from longtail import api
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict, load_config
from longtail.data.sources import ArraySource, select_classes
from longtail.errors import UsageError
from longtail.models import backbones as backbones_module
from longtail.models import (
    build_backbone,
    layer_depths,
    load_backbone_weights,
    published_preprocessing,
    read_weights,
)
from longtail.runs.read import read_run_info
from longtail.runs.train import _set_up

timm = pytest.importorskip("timm")

# Small timm models of the families a practitioner reaches for (ResNet, ConvNeXt, MobileNet /
# EfficientNet, ViT) at a size each accepts.
TIMM_MODELS = {
    "resnet10t": 32,
    "convnext_atto": 32,
    "mobilenetv3_small_050": 32,
    "efficientnet_b0": 32,
    "vit_tiny_patch16_224": 224,
}
FOLDER_RECIPES = sorted(p for p in Path("configs/folder").glob("*.yaml") if p.name[0] != "_")


@pytest.mark.parametrize("arch", sorted(TIMM_MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_a_timm_model_is_a_backbone(arch, channels):
    """forward_features -> forward_head is forward, feature_dim is the pooled width, grey
    images work, and layer-wise decay finds every parameter a depth."""
    torch.manual_seed(0)
    net = build_backbone(f"timm/{arch}", channels).eval()
    x = torch.randn(2, channels, TIMM_MODELS[arch], TIMM_MODELS[arch])
    with torch.no_grad():
        pooled = net(x)
        assert torch.equal(net.forward_head(net.forward_features(x)), pooled)
    assert pooled.shape == (2, net.feature_dim)
    depths, count = layer_depths(net)
    assert set(depths) == {n for n, _ in net.named_parameters()} and count >= 3
    assert len(set(depths.values())) == count


def test_an_unknown_timm_model_and_a_missing_timm_are_one_line(monkeypatch):
    with pytest.raises(ValueError, match=r"timm has no model 'resnet5000'.*near: resnet50"):
        build_backbone("timm/resnet5000")
    monkeypatch.setattr(backbones_module, "timm", None)
    with pytest.raises(UsageError, match=r"needs timm: pip install 'longtail\[timm\]'"):
        build_backbone("timm/resnet10t")


def _timm_state(arch: str = "resnet10t", in_chans: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model(arch, in_chans=in_chans).state_dict()  # with its classifier


@pytest.mark.parametrize("wrap", ["", "module.", "model."])
def test_a_timm_state_dict_loads_without_its_classifier(wrap):
    state = {wrap + k: v for k, v in _timm_state().items()}
    assert any(k.startswith(wrap + "fc.") for k in state)
    net = build_backbone("timm/resnet10t")
    load_backbone_weights(net, state)
    for name, value in net.state_dict().items():
        assert torch.equal(value, state[wrap + name.removeprefix("model.")]), name


def test_an_rgb_stem_is_summed_for_grey_images():
    state = _timm_state()
    net = build_backbone("timm/resnet10t", in_channels=1)
    load_backbone_weights(net, state)
    stem = next(k for k in state if state[k].dim() == 4)
    assert torch.allclose(net.state_dict()[f"model.{stem}"], state[stem].sum(1, keepdim=True))


def test_weights_that_do_not_fit_are_named_in_one_line():
    state = _timm_state()
    del state["layer4.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["layer3.0.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError) as e:
        load_backbone_weights(build_backbone("timm/resnet10t"), state)
    said = str(e.value)
    assert "\n" not in said
    for part in (
        "1 missing (model.layer4.0.conv1.weight)",
        "1 the backbone lacks (model.extra.weight)",
        "1 of another shape (model.layer3.0.conv2.weight (3, 3, 3, 3)",
    ):
        assert part in said, said


def test_weights_files_in_every_format(tmp_path):
    from safetensors.torch import save_file

    state = _timm_state()
    for name, saved in {
        "plain.pth": state,
        "nested.pt": {"state_dict": state, "epoch": 3},
        "model.bin": {"model": state},
    }.items():
        torch.save(saved, tmp_path / name)
        assert read_weights(tmp_path / name).keys() == state.keys(), name
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    got = read_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], v) for k, v in state.items())
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth is not a weights file torch can read"):
        read_weights(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth holds no state_dict"):
        read_weights(tmp_path / "list.pth")


def _start(cfg_dict):
    """Config (validated, preprocessing filled) and the method a new run starts with."""
    from longtail.runs.pretrained import with_weights_preprocessing

    cfg = with_weights_preprocessing(validate(config_from_dict(cfg_dict)))
    _, data, method, _ = _set_up(cfg, resume=False)
    return cfg, data, method


def test_a_run_starts_from_a_longtail_run_and_its_checkpoint(tiny_fmnist, tmp_path):
    """Pretrain on classes 0-4, fine-tune on 5-9 from the run directory (or its checkpoint):
    the new backbone is the old one, the classifier is new, the normalisation the old run's."""
    first = tiny_config(
        tiny_fmnist, model={"backbone": "resnet20"}, data={"classes": [0, 1, 2, 3, 4]}
    )
    api.train(config_from_dict(first), tmp_path / "first", progress=False)
    ckpt = torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=False)["model"]
    for source in (tmp_path / "first", tmp_path / "first/checkpoints/last.pt"):
        raw = tiny_config(tiny_fmnist, model={"backbone": "resnet20", "pretrained": str(source)},
                          data={"classes": [5, 6, 7, 8, 9], "ratio": 4})  # fmt: skip
        cfg, data, method = _start(raw)
        for name, value in method.backbone.state_dict().items():
            assert torch.equal(value, ckpt[f"backbone.{name}"]), name
        assert method.classifier.weight.shape[0] == 5
        assert cfg.data.mean == read_run_info(tmp_path / "first").mean
    other = tiny_config(
        tiny_fmnist, model={"backbone": "resnet32", "pretrained": str(tmp_path / "first")}
    )
    with pytest.raises(UsageError, match="trained a resnet20, not the resnet32 of model.backbone"):
        _start(other)


def test_a_missing_or_wrong_pretrained_path_is_one_line(tiny_fmnist, tmp_path):
    (tmp_path / "folder").mkdir()
    for path, needle in (
        (tmp_path / "nope.pth", "no file"),
        (tmp_path / "folder", "is a folder but not a longtail run directory"),
    ):
        raw = tiny_config(tiny_fmnist, model={"pretrained": str(path)})
        with pytest.raises(UsageError, match=f"model.pretrained'.*{needle}"):
            api.train(config_from_dict(raw), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
    raw = tiny_config(tiny_fmnist, model={"backbone": "resnet32", "pretrained": True})
    with pytest.raises(UsageError, match="resnet32 has no published weights"):
        validate(config_from_dict(raw))


@pytest.fixture
def offline(monkeypatch):
    """Every download fails as it does without a network."""

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)
    monkeypatch.setattr("timm.models._builder.load_pretrained", no_network)
    monkeypatch.setattr("timm.models._builder.load_custom_pretrained", no_network)


@pytest.mark.parametrize("backbone", ["resnet18", "timm/resnet10t"])
def test_published_weights_offline_name_the_local_file_option(
    tiny_fmnist, tmp_path, offline, backbone
):
    raw = tiny_config(tiny_fmnist, model={"backbone": backbone, "pretrained": True})
    with pytest.raises(UsageError) as e:
        api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    said = str(e.value)
    assert "\n" not in said and "Name or service not known" in said
    assert "give a local file: model.pretrained: path/to/weights.pth" in said
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backbone", ["resnet50", "timm/convnext_atto"])
def test_published_weights_bring_their_preprocessing_to_predict_and_export(
    pattern_folder, tmp_path, monkeypatch, backbone
):
    """With model.pretrained: true the data keys take the weights' metadata (mean, std, crop
    fraction, interpolation); data.json, predict and the export card use them."""
    expected = published_preprocessing(backbone)
    assert expected is not None
    torch.manual_seed(3)
    fake = build_backbone(backbone).state_dict()  # what a download would give, offline
    monkeypatch.setattr(
        "longtail.models.backbones.TorchvisionResNet.load_published_weights",
        lambda self: load_backbone_weights(self, fake),
    )
    real_create = timm.create_model
    monkeypatch.setattr(
        backbones_module.timm,
        "create_model",
        lambda arch, pretrained=False, **kw: real_create(arch, pretrained=False, **kw),
    )
    raw = folder_config(
        pattern_folder,
        model={"backbone": backbone, "pretrained": True, "projection_hidden": 32},
        data={"image_size": 72},  # over 64 px: the evaluation resize of the weights applies
        train={"epochs": 1, "batch_size": 8},
    )
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    saved = load_config(tmp_path / "run/config.yaml").data
    assert (saved.mean, saved.std) == (expected["mean"], expected["std"])
    assert (saved.crop_fraction, saved.interpolation) == (
        pytest.approx(expected["crop_fraction"]), expected["interpolation"])  # fmt: skip
    info = read_run_info(tmp_path / "run")
    assert info.mean == expected["mean"] and info.resize.interpolation == expected["interpolation"]
    card = json.loads(
        Path(str(api.export_run(tmp_path / "run", "torchscript")) + ".json").read_text()
    )
    assert card["resize_shorter_side"] == int(72 / expected["crop_fraction"])
    assert card["interpolation"] == expected["interpolation"] and card["mean"] == expected["mean"]
    # predict preprocesses with the same numbers as the evaluation did
    image = next((pattern_folder / "test").rglob("*.png"))
    rows = api.predict_images(tmp_path / "run", [image])
    assert rows[0]["class"] in {p.name for p in (pattern_folder / "test").iterdir()}


def test_timm_preprocessing_is_the_models_own_metadata():
    pre = published_preprocessing("timm/convnext_tiny")
    cfg = timm.models.get_pretrained_cfg("convnext_tiny")
    assert pre["mean"] == list(cfg.mean) and pre["crop_fraction"] == cfg.crop_pct
    assert pre["interpolation"] == cfg.interpolation
    tv = published_preprocessing("resnet50")
    assert tv["crop_fraction"] == pytest.approx(224 / 232) and tv["interpolation"] == "bilinear"
    assert published_preprocessing("resnet32") is None


def test_a_linear_probe_trains_only_the_classifier(tiny_fmnist, tmp_path):
    raw = tiny_config(tiny_fmnist, model={"backbone": "resnet20", "freeze_backbone": True},
                      train={"epochs": 2})  # fmt: skip
    torch.manual_seed(0)
    cfg = validate(config_from_dict(raw))
    before = build_method(cfg, build_data(cfg)).state_dict()
    api.train(config_from_dict(raw), tmp_path / "probe", progress=False)
    after = torch.load(tmp_path / "probe/checkpoints/last.pt", weights_only=False)["model"]
    for name, value in after.items():
        same = torch.equal(value, before[name])
        assert same == name.startswith("backbone."), name  # BN statistics included


def test_classes_keeps_and_relabels_a_subset():
    images = np.zeros((6, 4, 4), dtype=np.uint8)
    source = ArraySource(images, [0, 1, 2, 0, 1, 2], ["a", "b", "c"], [0.5], [0.25])
    kept = select_classes(source, ["c", 0])
    assert kept.classes == ["c", "a"] and kept.targets.tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="no class 'd'"):
        select_classes(source, ["d"])
    with pytest.raises(ValueError, match="given twice"):
        select_classes(source, [0, "a"])


def test_every_folder_recipe_is_there_and_fine_tunes_pretrained_weights():
    names = {p.stem for p in FOLDER_RECIPES}
    for method in ("ce", "logit-adjust", "hybrid-sc", "hybrid-psc", "bcl", "linear-probe"):
        for backbone in ("resnet50", "convnext-t"):
            assert f"{method}-{backbone}" in names
    for path in FOLDER_RECIPES:
        cfg = validate(load_config(path))
        assert cfg.model.pretrained is True and cfg.data.image_size == 224, path
        assert cfg.optim.name == "adamw" and cfg.optim.schedule == "cosine", path
        assert cfg.optim.warmup_epochs > 0 and cfg.optim.decay_exempt, path
        probe = cfg.model.freeze_backbone
        assert probe == path.stem.startswith("linear-probe"), path
        assert probe or cfg.optim.backbone_lr_scale < 1, path


def test_the_recipe_command_fine_tunes_from_a_local_file(pattern_folder, tmp_path):
    """The README's command, offline: the ResNet-50 recipe from a saved torchvision
    state_dict, on an image folder (small and short here)."""
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    out = tmp_path / "run"
    sets = [
        f"data.root={pattern_folder}", f"model.pretrained={tmp_path / 'resnet50.pth'}",
        "data.image_size=32", "data.num_workers=0", "train.epochs=1", "train.batch_size=8",
        "train.report=false", "model.projection_hidden=64",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "longtail", "train", "--no-progress", "--config",
           "configs/folder/hybrid-sc-resnet50.yaml", "--out", str(out)]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resnet50 from weights of {tmp_path / 'resnet50.pth'}" in done.stdout + done.stderr
    assert json.loads((out / "eval_test.json").read_text())["top1"] >= 0


def test_dscl_on_a_vit_says_pbsd_needs_a_feature_map(tiny_fmnist):
    raw = tiny_config(tiny_fmnist, method={"name": "dscl", "classifier_epochs": 1},
                      model={"backbone": "timm/vit_tiny_patch16_224"}, train={"epochs": 2},
                      data={"image_size": 224})  # fmt: skip
    cfg = validate(config_from_dict(raw))
    with pytest.raises(UsageError, match="dscl's PBSD pools boxes of a feature map.*pbsd_weight"):
        build_method(cfg, build_data(cfg))
    raw["method"]["pbsd_weight"] = 0.0
    cfg = validate(config_from_dict(raw))
    assert build_method(cfg, build_data(cfg)).backbone.feature_dim == 192
