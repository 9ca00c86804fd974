"""The layer spec (the README's Layer spec section), on resnet50's block names (torch-free)."""

from __future__ import annotations

import pytest

from attnsurgeon.errors import UsageError
from attnsurgeon.select import select_blocks

DEPTHS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
BLOCKS = [(f"{s}.{i}", s) for s, n in DEPTHS.items() for i in range(n)]
NAMES = [b for b, _ in BLOCKS]


def pick(spec: str) -> list[str]:
    return [NAMES[i] for i in select_blocks(spec, BLOCKS)]


@pytest.mark.parametrize(
    "spec, first, last, count",
    [
        ("all", "layer1.0", "layer4.2", 16),
        ("layer3", "layer3.0", "layer3.5", 6),
        ("layer3.1", "layer3.1", "layer3.1", 1),
        ("layer2:layer4", "layer2.0", "layer4.2", 13),
        ("layer3.1:layer4.0", "layer3.1", "layer4.0", 6),
        ("layer3:", "layer3.0", "layer4.2", 9),
        (":layer2", "layer1.0", "layer2.3", 7),
        ("layer2:layer2", "layer2.0", "layer2.3", 4),
        ("layer2.3:layer3", "layer2.3", "layer3.5", 7),
    ],
)
def test_specs(spec, first, last, count):
    got = pick(spec)
    assert (got[0], got[-1], len(got)) == (first, last, count)


def test_comma_list_is_sorted_and_deduplicated():
    assert pick("layer4.2, layer1.0,layer4.2") == ["layer1.0", "layer4.2"]
    assert pick("layer1,layer3.5:") == NAMES[:3] + ["layer3.5"] + NAMES[-3:]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("layer9", "unknown layer 'layer9'.*stages: layer1, layer2, layer3, layer4"),
        ("layer3.9", "unknown layer 'layer3.9'"),
        ("layr3", "did you mean: layer3"),
        ("layer4:layer2", "reversed"),
        ("layer3.2:layer3.1", "reversed"),
        ("", "empty layer spec"),
        ("layer1,,layer2", "empty item"),
        (":", "at least one end"),
        ("a:b:c", "one ':'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        select_blocks(spec, BLOCKS)


def test_model_without_blocks():
    with pytest.raises(UsageError, match="no blocks"):
        select_blocks("all", [])
