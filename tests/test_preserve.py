"""Pretrained weights survive surgery, and ``--init preserve`` keeps what they compute.

The weights file is a random resnet18 whose BatchNorms have non-default affine parameters
and running statistics (a few train-mode passes on random data), so a kind that mishandles
a norm, or a mode, shows up as a changed output. As in trained ResNets, the last norm of
each residual branch has small gammas (0.15 to 0.45): a random network with gammas near 1
there is chaotic (scaling resnet50's input by 1 - 8.3e-7 moves its logits by 1.4e-4
relative), and no gate at 1 - 1.2e-7 could be trusted to meet the tolerance on it; these
move them by
2.6e-6 (resnet18) and 7.9e-6 (resnet50) (``test_probe_network_is_well_conditioned``).

Tolerance (``--init preserve``): on a probe batch in eval mode,
``max |delta logits| / max |logits| <= 1e-4`` and top-1 agreement 100%. Gates that must
open start at ``sigmoid(PRESERVE_LOGIT)`` = 1 - 1.2e-7 (see ``attnsurgeon.layers``), so
the error is not 0, but far below the tolerance. ``--init paper`` makes no such promise:
it changes the logits by more than 100x the tolerance.

Keys: surgery loads the original weights first, then edits. Every original parameter and
buffer is in the checkpoint under its own name with its own value, except, for replace
kinds, those of the replaced modules (see ``REPLACED``): ``sk`` replaces each main 3x3
conv and the BatchNorm after it; ``dynconv`` replaces convs and keeps their norms.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from typer.testing import CliRunner

import attnsurgeon
from attnsurgeon.cli import app

TOLERANCE = 1e-4  # max|delta logits| / max|logits|
SIZE = 64
runner = CliRunner()

# (kind, position, params) on resnet18: every kind and, for insert kinds, every position
INSERT_KINDS = ("se", "cbam", "afp", "eca", "coord", "gc")
POSITIONS = ("standard", "pre", "mid", "post", "identity")
CASES: list[tuple[str, str | None, dict[str, str]]] = [
    *((k, p, {}) for k in INSERT_KINDS for p in POSITIONS),
    ("sk", None, {}),
    ("dynconv", None, {"target": "spatial"}),
    ("dynconv", None, {"target": "all"}),
    ("gc", "standard", {"fusion": "scale"}),
    ("dual-pool", None, {}),  # the head
]
# kinds whose paper initialisation already computes the original function (GC's zero last
# conv, by design): --init paper preserves them exactly
IDENTITY_AT_PAPER_INIT = {("gc", "add")}
# what a replace kind takes away from the original state_dict: the conv, and its norm?
REPLACED = {"sk": ("conv", "norm"), "dynconv": ("conv",)}
NORM_OF = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "downsample.0": "downsample.1"}


def case_id(case: tuple[str, str | None, dict[str, str]]) -> str:
    kind, position, params = case
    return "-".join([kind, *([position] if position else []), *params.values()])


def with_bn_statistics(model: nn.Module, *, seed: int) -> nn.Module:
    """Give every BatchNorm non-default affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                m.momentum = None  # cumulative average over the passes below
        for block in model.modules():
            if isinstance(block, (BasicBlock, Bottleneck)):
                last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last.weight.copy_(0.15 + 0.3 * torch.rand(last.weight.shape, generator=gen))
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, SIZE, SIZE, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return model.eval()


def probe(seed: int = 1) -> torch.Tensor:
    return torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def logits_error(original: nn.Module | torch.Tensor, modified: nn.Module) -> tuple[float, float]:
    """(max|delta| / max|logits|, top-1 agreement) on a probe batch of our own, eval mode.

    ``original`` is the unmodified model, or its logits on :func:`probe`.
    """
    x = probe()
    modified.eval()
    with torch.no_grad():
        a = original if isinstance(original, torch.Tensor) else original.eval()(x)
        b = modified(x)
    relative = ((a - b).abs().max() / a.abs().max()).item()
    return relative, (a.argmax(1) == b.argmax(1)).float().mean().item()


def surgery_args(kind: str, position: str | None, params: dict[str, str]) -> list[str]:
    if kind == "dual-pool":
        return ["--head", "dual-pool"]
    args = ["--attn", kind]
    if position:
        args += ["--position", position]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    return args


def apply_case(model: nn.Module, kind: str, position: str | None, params: dict[str, str], *,
               init: str, layers: str = "all") -> list[Any]:
    if kind == "dual-pool":
        return attnsurgeon.apply(model, head="dual-pool", init=init)
    return attnsurgeon.apply(model, kind, position=position, layers=layers, params=params, init=init)


@pytest.fixture(scope="session")
def weights18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = with_bn_statistics(torchvision.models.resnet18(), seed=0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def original18(weights18: Path) -> nn.Module:
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights18, weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def logits18(original18: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return original18(probe())


@pytest.fixture(scope="session")
def inserted(weights18: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, dict]]:
    """``attnsurgeon insert resnet18 ... --weights-file W --init preserve --json``, once per case."""
    cache: dict[str, tuple[Path, dict]] = {}
    folder = tmp_path_factory.mktemp("inserted")

    def run(kind: str, position: str | None, params: dict[str, str]) -> tuple[Path, dict]:
        key = case_id((kind, position, params))
        if key not in cache:
            out = folder / f"{key}.pt"
            result = runner.invoke(app, ["insert", "resnet18", *surgery_args(kind, position, params),
                                         "--weights-file", str(weights18), "--init", "preserve",
                                         "-o", str(out), "--json", "--input-size", str(SIZE)])
            assert result.exit_code == 0, result.output
            cache[key] = out, json.loads(result.stdout)
        return cache[key]

    return run


def test_weights_file_has_non_default_bn_statistics(original18: nn.Module) -> None:
    bns = [m for m in original18.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    assert all(m.running_mean.abs().max() > 1e-3 for m in bns[1:])
    assert all(not torch.allclose(m.weight, torch.ones_like(m.weight)) for m in bns)


def test_probe_network_is_well_conditioned(original18: nn.Module) -> None:
    """A 8.3e-7 relative change (seven gates at sigmoid(PRESERVE_LOGIT)) must not by itself
    use up the tolerance, or the preservation tests would measure the network, not the init."""
    x = probe()
    with torch.no_grad():
        a, b = original18(x), original18(x * (1 - 8.3e-7))
    assert ((a - b).abs().max() / a.abs().max()).item() < TOLERANCE / 5


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_original_weights_kept_under_their_keys(case, inserted, weights18: Path) -> None:
    kind = case[0]
    out, data = inserted(*case)
    saved = torch.load(out, weights_only=True)["state_dict"]
    original = torch.load(weights18, weights_only=True)
    replaced: set[str] = set()
    for change in data["changes"]:
        if kind not in REPLACED:
            continue
        block, conv = change["block"], change["where"]  # "layer2.0", "downsample.0"
        prefixes = [f"{block}.{conv}."]
        if "norm" in REPLACED[kind]:
            prefixes.append(f"{block}.{NORM_OF[conv]}.")
        replaced |= {k for k in original if any(k.startswith(p) for p in prefixes)}
    assert bool(replaced) == (kind in REPLACED)
    kept = [k for k in original if k not in replaced]
    for key in kept:
        assert key in saved, f"{key} missing from the checkpoint"
        assert saved[key].shape == original[key].shape and torch.equal(saved[key], original[key]), key
    # the documented exceptions really are gone or different (else the list is wrong)
    for key in replaced:
        assert key not in saved or saved[key].shape != original[key].shape \
            or not torch.equal(saved[key], original[key]), f"{key} was documented as replaced"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_preserve_keeps_logits(case, inserted, logits18: torch.Tensor) -> None:
    out, data = inserted(*case)
    reported = data["preservation"]  # insert --json reports the error it measured
    assert reported["relative"] <= TOLERANCE and reported["top1_agreement"] == 1.0, reported
    relative, agreement = logits_error(logits18, attnsurgeon.load(out))
    assert relative <= TOLERANCE, f"{case_id(case)}: relative error {relative:.3g}"
    assert agreement == 1.0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_paper_init_does_not_preserve(case, original18: nn.Module, logits18: torch.Tensor) -> None:
    model = copy.deepcopy(original18)
    apply_case(model, *case, init="paper")
    relative, _ = logits_error(logits18, model)
    kind, _, params = case
    if (kind, params.get("fusion", "add")) in IDENTITY_AT_PAPER_INIT:
        assert relative == 0.0, f"{case_id(case)}: the paper init is the identity, yet {relative:.3g}"
        return
    assert relative > 100 * TOLERANCE, f"{case_id(case)}: paper init changed the logits by only {relative:.3g}"


def test_summarize_checkpoint_shows_recipe_and_preservation(inserted) -> None:
    out, data = inserted("se", "standard", {})
    result = runner.invoke(app, ["summarize", str(out), "--input-size", str(SIZE)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "made by resnet18: se at standard on all (reduction=16, variant=standard, gate=sigmoid), init preserve" in result.stderr
    assert "preservation (preserve init" in result.stdout
    as_json = runner.invoke(app, ["summarize", str(out), "--json", "--input-size", str(SIZE)])
    summary = json.loads(as_json.stdout)
    assert summary["recipe"]["init"] == "preserve"
    assert summary["recipe"]["insert"] == [{"attn": "se", "layers": "all", "position": "standard",
                                            "params": {"reduction": 16, "variant": "standard", "gate": "sigmoid"}}]
    assert summary["preservation"] == data["preservation"]


# --- trainability -----------------------------------------------------------------------

TRAIN_CASES = [("se", None, {}), ("cbam", None, {}), ("afp", None, {}), ("eca", None, {}), ("coord", None, {}),
               ("gc", None, {}), ("gc", None, {"fusion": "scale"}), ("sk", None, {}),
               ("dynconv", None, {}), ("dual-pool", None, {})]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=case_id)
def test_preserved_modules_train(case, original18: nn.Module) -> None:
    """Preserve init does not freeze the new modules: within five Adam steps a gradient
    reaches every new parameter and every new module moves, and the loss falls.

    Not every parameter moves that soon: layers behind a gate's zeroed output weights
    (SE's fc1, coordinate attention's conv1 and BN) get a second-order gradient (output
    weight ~ lr times sigmoid'(PRESERVE_LOGIT) = 1.2e-7) until those weights have grown,
    and Adam's eps (1e-8) mutes it for a few dozen steps. (All parameters train, as in
    fine-tuning; layer3 only, to keep it fast.)
    """
    torch.manual_seed(0)
    model = copy.deepcopy(original18)
    old = {id(p) for p in original18.parameters()}  # deepcopy keeps none of these
    old_names = {name for name, _ in original18.named_parameters()}
    changes = apply_case(model, *case, init="preserve", layers="layer3")
    new = {name: p.detach().clone() for name, p in model.named_parameters() if name not in old_names}
    assert new and not old & {id(p) for p in model.parameters()}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 1000, (8,))
    losses, reached = [], set()
    params = dict(model.named_parameters())
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        reached |= {n for n in new if params[n].grad is not None and params[n].grad.abs().max() > 0}
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    # GC's conv_mask bias shifts every softmax logit alike: no gradient, in mmcv and timm too
    unreached = [n for n in new if n not in reached and not n.endswith("conv_mask.bias")]
    assert not unreached, f"{case_id(case)}: no gradient reached {unreached}"
    still = [c.path for c in changes
             if all(torch.equal(params[n].detach(), new[n]) for n in new if n.startswith(c.path + "."))]
    assert not still, f"{case_id(case)}: new modules that did not move: {still}"


# --- resnet50: every kind and position on bottleneck blocks --------------------------------

CASES50 = [(*case, "all") for case in CASES]


@pytest.fixture(scope="module")
def original50() -> nn.Module:
    torch.manual_seed(0)
    return with_bn_statistics(torchvision.models.resnet50(), seed=1)


@pytest.mark.heavy
@pytest.mark.parametrize("case", CASES50, ids=lambda c: case_id(c[:3]) + "-" + c[3])
def test_preserve_keeps_logits_resnet50(case, original50: nn.Module) -> None:
    kind, position, params, layers = case
    model = copy.deepcopy(original50)
    apply_case(model, kind, position, params, init="preserve", layers=layers)
    relative, agreement = logits_error(original50, model)
    assert relative <= TOLERANCE, f"{case_id(case[:3])}: relative error {relative:.3g}"
    assert agreement == 1.0
