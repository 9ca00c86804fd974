"""Models and weights: torchvision weight names (cached offline), local files, misfits."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from attnsurgeon.errors import UsageError
from attnsurgeon.zoo import build_model


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_cached_torchvision_weights_load_offline(torch_home):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cache / weights.url.rsplit("/", 1)[-1])
    model = build_model("resnet18", weights="DEFAULT")
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])


def test_offline_without_cache_is_a_clear_error(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UsageError, match=r"--weights IMAGENET1K_V1: could not get .*resnet18.*use --weights-file"):
        build_model("resnet18", weights="IMAGENET1K_V1")


def test_weights_none_and_names():
    assert build_model("resnet18", weights="none").fc.out_features == 1000
    with pytest.raises(UsageError, match="valid: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        build_model("resnet50", weights="imagenet")


def test_detection_models_do_not_download_a_backbone(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with torch.device("meta"):
        model = build_model("fasterrcnn_resnet50_fpn")
    assert model.backbone.body.layer4[0].conv1.in_channels == 1024


def test_misfit_state_dict_names_the_keys(tmp_path):
    path = tmp_path / "w.pth"
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"shape of fc.weight: file \(10, 512\), model \(1000, 512\)"):
        build_model("resnet18", weights_file=path)
    with pytest.raises(UsageError, match="not both"):
        build_model("resnet18", weights="DEFAULT", weights_file=path)
