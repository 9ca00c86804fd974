"""Produced models under the training stacks people use: channels_last, bf16 autocast,
torch.compile, torch.export and DistributedDataParallel (gloo, two local processes).

The cheap checks (eager channels_last and autocast) run per kind and slot on
:func:`one_kind_model`; the slow ones (compile, export, DDP) on one model that carries
every registered kind (:func:`every_kind_model`), so kinds added to the registry later
are covered without new tests. All on CPU, at 64x64 (32x32 for DDP).
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.nn.functional as F

from _every_kind import ddp_worker, every_kind_model, kind_cases, one_kind_model

CASES = kind_cases()
IDS = [f"{k}-{p}" if p else k for k, p in CASES]
BF16_TOLERANCE = 0.03  # ||bf16 - fp32|| / ||fp32|| of the logits; seen: 0.002 to 0.008


def _x(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _channels_last(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind, position", CASES, ids=IDS)
def test_channels_last_and_bf16_autocast_per_kind(kind, position):
    """Eager, eval: channels_last matches fp32 to float noise; bf16 autocast (contiguous and
    channels_last) stays within bf16 tolerance and gives bf16 logits."""
    model = one_kind_model(kind, position).eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        last_model, last_x = _channels_last(copy.deepcopy(model), x)
        torch.testing.assert_close(last_model(last_x), ref, rtol=1e-4, atol=1e-5)
        for m, inp in ((model, x), (last_model, last_x)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(inp)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
            assert _relative(out, ref) < BF16_TOLERANCE, (kind, position, _relative(out, ref))


@pytest.mark.parametrize("kind, position", CASES, ids=IDS)
def test_bf16_autocast_channels_last_training_step(kind, position):
    """Train mode, bf16 autocast, channels_last: every parameter gets a finite fp32 gradient."""
    model, x = _channels_last(one_kind_model(kind, position).train(), _x(4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_every_kind_model_has_every_kind():
    from _every_kind import INSERT_KINDS, REPLACE_KINDS

    _, changes = every_kind_model()
    assert {c.attn for c in changes} >= set(INSERT_KINDS) | set(REPLACE_KINDS)
    assert len({c.path for c in changes}) == len(changes)


@pytest.mark.heavy
def test_export_matches_eager_with_a_dynamic_batch():
    model, _ = every_kind_model()
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(model, (_x(2),), dynamic_shapes=({0: batch},))
    for n in (1, 3):
        x = _x(n)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_compile_matches_eager():
    """torch.compile (Inductor, CPU) of the every-kind model: ~70 s on 2 cores with a cold
    Inductor cache, as CI has it, ~10 s warm."""
    model, _ = every_kind_model()
    model.eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.heavy
def test_compile_bf16_autocast_channels_last():
    """Compiled under bf16 autocast on a channels_last model and input, against eager fp32.
    Dynamo and AOTAutograd (``aot_eager``) trace the model under autocast as Inductor gets it;
    Inductor's code for every kind is what :func:`test_compile_matches_eager` compiles (cold,
    Inductor took 75 s here for this one, ``aot_eager`` 6 s)."""
    model, _ = every_kind_model()
    model.eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        model, x = _channels_last(model, x)
        compiled = torch.compile(model, backend="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
    assert out.dtype == torch.bfloat16
    assert _relative(out, ref) < BF16_TOLERANCE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_ddp_gloo_two_processes():
    """DDP, gloo, 2 local processes, find_unused_parameters=False, 3 SGD steps, with both
    inits (under preserve, dynconv's attention FCs get zero but present gradients): no
    unused-parameter error, every parameter gets a gradient, parameters equal across
    ranks afterwards (checked in the workers)."""
    import torch.multiprocessing as mp

    mp.spawn(ddp_worker, args=(2, _free_port(), ("paper", "preserve"), 3), nprocs=2, join=True)
