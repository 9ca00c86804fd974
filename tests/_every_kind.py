"""A small model that carries every registered kind at once (for tests that are too slow
to run per kind: torch.compile, torch.export, DDP).

Insert kind i of :data:`attnsurgeon.kinds.KINDS` goes into block i (mod 8) of a ResNet-18,
at slot i (mod its 5 slots): the slots take turns, and since 8 and 5 are coprime no two
kinds share a (block, slot) until 40 insert kinds, so a block carries several kinds at
different slots once there are more than 8. The replace kinds take turns over the stages
(over the blocks past 4 replace kinds); the dual-pool head replaces the pool. Kinds
registered later, even by a test after import, are picked up. One module per insert
kind keeps torch.compile's time down (every kind at every slot is far slower to compile);
the per-kind, per-slot checks run on :func:`one_kind_model`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from attnsurgeon.blocks import find_blocks
from attnsurgeon.kinds import HEAD_BUILDERS, KINDS
from attnsurgeon.recipe import Recipe, make_rule
from attnsurgeon.surgery import Change, apply_recipe

__all__ = ["INSERT_KINDS", "REPLACE_KINDS", "ddp_worker", "every_kind_model", "every_kind_recipe", "insert_kinds",
           "kind_cases", "one_kind_model", "slots"]

INSERT_KINDS = tuple(name for name, spec in KINDS.items() if spec.mode == "insert")
REPLACE_KINDS = tuple(name for name, spec in KINDS.items() if spec.mode == "replace")


def slots() -> tuple[str, ...]:
    """The slots of a ResNet-18 block (all its blocks have the same ones)."""
    with torch.device("meta"):
        info, _ = find_blocks(torchvision.models.resnet18())[0]
    return tuple(info.slots)


def kind_cases() -> list[tuple[str, str | None]]:
    """(kind, position) for every insert kind at every slot, and every replace kind."""
    return [*((k, p) for k in INSERT_KINDS for p in slots()), *((k, None) for k in REPLACE_KINDS)]


def _base(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def insert_kinds() -> tuple[str, ...]:
    """The insert kinds registered now (a test may register one after import)."""
    return tuple(name for name, spec in KINDS.items() if spec.mode == "insert")


def _places(blocks: int, slots: int, kinds: int) -> list[tuple[int, int]]:
    """(block, slot) for kind i: (i mod blocks, i mod slots), distinct while i < lcm; beyond
    that the next free pair, so any number up to blocks * slots fits."""
    free = [(b, s) for b in range(blocks) for s in range(slots)]
    if kinds > len(free):
        raise RuntimeError(f"{kinds} insert kinds do not fit {blocks} blocks x {slots} slots")
    out: list[tuple[int, int]] = []
    taken: set[tuple[int, int]] = set()
    for i in range(kinds):
        place = (i % blocks, i % slots)
        if place in taken:
            place = next(p for p in free if p not in taken)
        taken.add(place)
        out.append(place)
    return out


def every_kind_recipe(*, init: str = "paper", seed: int = 0, head: bool = True) -> Recipe:
    """The recipe :func:`every_kind_model` applies to a ResNet-18 (module docstring)."""
    with torch.device("meta"):
        blocks = [info for info, _ in find_blocks(torchvision.models.resnet18())]
    stages = list(dict.fromkeys(info.stage for info in blocks))
    positions = slots()
    inserts = insert_kinds()
    places = _places(len(blocks), len(positions), len(inserts))
    rules = []
    for kind, (b, p) in zip(inserts, places, strict=True):
        rules.append(make_rule(kind, layers=blocks[b].name, position=positions[p], where="test"))
    replaces = tuple(name for name, spec in KINDS.items() if spec.mode == "replace")
    targets = stages if len(replaces) <= len(stages) else [info.name for info in blocks]  # more: per block
    if len(replaces) > len(targets):
        raise RuntimeError(f"{len(replaces)} replace kinds do not fit {len(targets)} blocks")
    for s, target in enumerate(targets):
        if replaces:
            rules.append(make_rule(replaces[s % len(replaces)], layers=target, where="test"))
    heads = list(HEAD_BUILDERS) if head else []
    return Recipe(model="resnet18", rules=tuple(rules), init=init, seed=seed, head=heads[0] if heads else None)


def every_kind_model(*, init: str = "paper", seed: int = 0, head: bool = True) -> tuple[nn.Module, list[Change]]:
    """ResNet-18 (10 classes) with every kind; see the module docstring."""
    model = _base(seed)
    return model, apply_recipe(model, every_kind_recipe(init=init, seed=seed, head=head))


def one_kind_model(kind: str, position: str | None, *, init: str = "paper", seed: int = 0) -> nn.Module:
    """ResNet-18 (10 classes) with ``kind`` at ``position`` in every block."""
    model = _base(seed)
    recipe = Recipe(rules=(make_rule(kind, position=position, where="test"),), init=init, seed=seed)
    apply_recipe(model, recipe)
    return model


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def ddp_worker(rank: int, world: int, port: int, inits: tuple[str, ...], steps: int) -> None:
    """One rank of the DDP test (run by ``torch.multiprocessing.spawn``): gloo on
    127.0.0.1, :func:`every_kind_model` under DDP with ``find_unused_parameters=False``,
    ``steps`` SGD steps on rank-specific data; then every parameter must have had a
    gradient, have moved, and be equal on all ranks. Failures raise in the child, and
    ``spawn`` raises them in the parent."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for init in inits:
            model, _ = every_kind_model(init=init, seed=0)  # same start on every rank
            start = _flat(model.parameters())
            ddp = DistributedDataParallel(model, find_unused_parameters=False)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
            ddp.train()
            for _ in range(steps):
                x = torch.randn(4, 3, 32, 32, generator=gen)
                y = torch.randint(0, 10, (4,), generator=gen)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()
                missing = [n for n, p in model.named_parameters() if p.grad is None]
                assert not missing, f"{init}: no gradient for {missing[:5]}"
                optimizer.step()
            params = _flat(model.parameters())
            assert not torch.equal(params, start), f"{init}: nothing trained"
            gathered = [torch.empty_like(params) for _ in range(world)]
            dist.all_gather(gathered, params)
            for other in gathered[1:]:
                assert torch.equal(other, gathered[0]), f"{init}: parameters differ across ranks"
            # (BN running statistics differ after the last step: DDP broadcasts rank 0's
            # buffers at the start of each forward, and each rank then saw its own batch)
    finally:
        dist.destroy_process_group()
