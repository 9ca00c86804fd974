"""Models and weights: torchvision weight names (cached offline), local files, misfits."""

from __future__ import annotations

import inspect
import json
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import attnsurgeon
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


def _pretrained_layout(name: str) -> dict[str, torch.Tensor]:
    """A random state_dict of the architecture torchvision builds when it loads ``name``'s
    pretrained weights: a segmentation model gains its auxiliary head, a detector freezes
    its backbone's norms. torchvision's own strict load checks this below."""
    if "aux_loss" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        return torchvision.models.get_model(name, weights_backbone=None, aux_loss=True).state_dict()
    model = torchvision.models.get_model(name, weights_backbone=None)
    for path, m in list(model.backbone.body.named_modules()):
        if type(m) is nn.BatchNorm2d:
            model.backbone.body.set_submodule(path, FrozenBatchNorm2d(m.num_features, eps=m.eps))
    return model.state_dict()


@pytest.mark.parametrize("source", ["--weights", "--weights-file"])
@pytest.mark.parametrize("name, kind", [("deeplabv3_mobilenet_v3_large", "se"),
                                        ("fasterrcnn_mobilenet_v3_large_320_fpn", "sk")])
@pytest.mark.heavy
def test_pretrained_segmentation_and_detection_round_trip(cli, torch_home, tmp_path, name, kind, source):
    """torchvision builds another architecture when it loads weights; the checkpoint of such
    a model reloads (before, it wrote files its own load refused: unexpected aux_classifier,
    missing num_batches_tracked), and summarize sees the same base model as insert did."""
    state = _pretrained_layout(name)
    if source == "--weights":
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        (torch_home / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(state, torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
        weights = "DEFAULT"
    else:
        weights = str(tmp_path / "w.pth")
        torch.save(state, weights)
    out = tmp_path / "m.pt"
    inserted = cli("insert", name, source, weights, "--attn", kind, "--layers", "stage4",
                   "--input-size", "64", "-o", str(out), "--json")
    assert inserted.exit_code == 0, inserted.output
    summarized = cli("summarize", str(out), "--input-size", "64", "--json")
    assert summarized.exit_code == 0, summarized.output
    total_s, total_i = json.loads(summarized.stdout)["total"], json.loads(inserted.stdout)["total"]
    if name.startswith("fasterrcnn"):  # a detector's head MACs follow how many boxes its random weights
        total_s, total_i = ({k: v for k, v in t.items() if not k.startswith("macs")} for t in (total_s, total_i))
    assert total_s == total_i
    model = attnsurgeon.load(out)
    saved = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    common = saved.keys() & state.keys()  # all but the convs and norms sk replaced
    assert len(common) > 0.9 * len(state) and all(torch.equal(saved[k], state[k]) for k in common)
