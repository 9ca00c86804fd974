"""Property-based tests of everything that parses user input: any input gives a valid
result or a UsageError, never another exception.

Covered: the layer-spec parser, ``--param`` parsing and resolution, the recipe parser (on
arbitrary data and on arbitrary file bytes) and the checkpoint reader (on arbitrary bytes
and on ``torch.save``d dicts of arbitrary plain data).
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from attnsurgeon import checkpoint
from attnsurgeon.errors import UsageError
from attnsurgeon.kinds import KINDS, parse_cli_params
from attnsurgeon.recipe import Recipe, load_recipe, recipe_from_data
from attnsurgeon.select import check_spec_syntax, select_blocks

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text built from the characters that matter to each grammar, plus anything at all
NAMES = ["all", "layer1", "layer2", "layer3", "layer4", "layer1.0", "layer2.1", "layer3.0", "layer4.1", "x"]
spec_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from([*NAMES, ":", ",", " ", "", ".", "9"]), max_size=8).map("".join),
)
plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def blocks_strategy():
    """A model's ``(block, stage)`` pairs: stages in order, each with some blocks."""
    return st.lists(st.integers(1, 3), min_size=0, max_size=4).map(
        lambda sizes: [(f"layer{s + 1}.{b}", f"layer{s + 1}") for s, n in enumerate(sizes) for b in range(n)]
    )


@FAST
@given(spec=spec_text, blocks=blocks_strategy())
def test_layer_spec_gives_indices_or_usage_error(spec, blocks):
    try:
        chosen = select_blocks(spec, blocks)
    except UsageError:
        return
    check_spec_syntax(spec)  # what selects must also pass the up-front syntax check
    assert chosen == sorted(set(chosen)) and chosen
    assert all(0 <= i < len(blocks) for i in chosen)


raw_value = st.one_of(st.integers(-5, 10**30).map(str), st.floats().map(str), st.text(max_size=8),
                     st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "3", "7", "all", "spatial", " "]))


@FAST
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data())
def test_params_resolve_or_usage_error(kind, data):
    spec = KINDS[kind]
    key = st.one_of(st.sampled_from([*spec.param_names, "ratio", ""]), st.text(max_size=6))
    items = data.draw(st.lists(st.one_of(st.builds("{}={}".format, key, raw_value), st.text(max_size=20)),
                               max_size=4))
    try:
        resolved = spec.resolve_params(parse_cli_params(items), where="--param")
    except UsageError:
        return
    assert set(resolved) == set(spec.param_names)
    for p in spec.params:
        value = resolved[p.name]
        assert isinstance(value, p.type) and not isinstance(value, bool)
        if isinstance(value, float):
            assert math.isfinite(value)
        if p.minimum is not None:
            assert value >= p.minimum
        if p.maximum is not None:
            assert value <= p.maximum
        if p.choices:
            assert value in p.choices


@FAST
@given(kind=st.sampled_from(sorted(KINDS)), given_params=st.dictionaries(
    st.one_of(st.sampled_from(["reduction", "kernel_size", "temperature", "target", "kernels"]), st.text(max_size=6)),
    plain, max_size=3))
def test_recipe_values_resolve_or_usage_error(kind, given_params):
    """TOML and checkpoint values arrive typed (not as strings): same guarantee."""
    try:
        resolved = KINDS[kind].resolve_params(given_params, where="rule 1")
    except UsageError:
        return
    assert set(resolved) == set(KINDS[kind].param_names)


rule = st.fixed_dictionaries(
    {},
    optional={"attn": st.one_of(st.sampled_from(sorted(KINDS)), plain),
              "position": st.one_of(st.sampled_from(["standard", "pre", "post", "identity", "mid"]), plain),
              "layers": st.one_of(spec_text, plain),
              "params": st.one_of(st.dictionaries(st.sampled_from(["reduction", "kernel_size", "target"]),
                                                  plain, max_size=2), plain)},
)
recipe_data = st.one_of(
    plain,
    st.fixed_dictionaries(
        {},
        optional={"model": st.one_of(st.just("resnet18"), plain), "weights": plain, "head": plain,
                  "init": st.one_of(st.sampled_from(["paper", "preserve"]), plain),
                  "seed": st.one_of(st.integers(), plain), "insert": st.one_of(st.lists(rule, max_size=3), plain),
                  "extra": plain},
    ),
)


@FAST
@given(data=recipe_data)
def test_recipe_from_data_gives_recipe_or_usage_error(data):
    try:
        recipe = recipe_from_data(data, source="r.toml")
    except UsageError:
        return
    assert isinstance(recipe, Recipe)
    assert recipe.rules or recipe.head
    assert recipe.seed is None or 0 <= recipe.seed < 2**64


toml_text = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([
        'model = "resnet18"\n', "[[insert]]\n", 'attn = "se"\n', 'attn = "dynconv"\n', 'position = "pre"\n',
        'layers = "layer3:"\n', "params = { reduction = 8 }\n", "params = { temperature = nan }\n",
        "seed = -1\n", "seed = 7\n", 'init = "preserve"\n', "[insert]\n", "x = [1, 2\n", "\xff", "= =\n",
    ]), max_size=8).map(lambda parts: "".join(parts).encode("utf-8", "surrogateescape")),
)


@SLOW
@given(content=toml_text)
def test_load_recipe_on_arbitrary_bytes(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.toml"
        path.write_bytes(content)
        try:
            recipe = load_recipe(path)
        except UsageError:
            return
        assert isinstance(recipe, Recipe)


def _read_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.pt"
        path.write_bytes(content)
        try:
            data = checkpoint.read(path)
        except UsageError:
            return
    # what read() lets through is what rebuild() can rely on
    assert data["format"] == "attnsurgeon" and data["format_version"] == 1
    assert isinstance(data["model"], str)
    assert isinstance(data["model_kwargs"], dict) and all(isinstance(k, str) for k in data["model_kwargs"])
    assert isinstance(data["state_dict"], dict)
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data["state_dict"].items())
    assert isinstance(checkpoint.recipe_of(data, path), Recipe)


@SLOW
@given(content=st.binary(max_size=300))
def test_checkpoint_read_on_arbitrary_bytes(content):
    _read_bytes(content)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@SLOW
@given(content=st.binary(min_size=1, max_size=40), cut=st.integers(0, 2000))
@example(content=b"\x01", cut=1731)  # a damaged zip64 end record: zipfile.is_zipfile raised BadZipFile
def test_checkpoint_read_on_damaged_files(content, cut):
    """A real checkpoint archive, truncated or with bytes overwritten."""
    good = _saved({"format": "attnsurgeon", "format_version": 1, "model": "resnet18", "model_kwargs": {},
                   "recipe": {"insert": [{"attn": "se"}]}, "state_dict": {"w": torch.zeros(2)}})
    cut = min(cut, len(good))
    _read_bytes(good[:cut] + content + good[cut + len(content):])


tensors = st.builds(lambda n: torch.zeros(n), st.integers(0, 3))
fields = st.fixed_dictionaries(
    {"format": st.one_of(st.just("attnsurgeon"), plain),
     "format_version": st.one_of(st.just(1), plain)},
    optional={"model": st.one_of(st.just("resnet18"), plain),
              "model_kwargs": st.one_of(st.just({}), plain),
              "recipe": st.one_of(recipe_data, plain),
              "state_dict": st.one_of(st.dictionaries(st.text(max_size=5), st.one_of(tensors, plain), max_size=3),
                                      plain),
              "weights": plain, "versions": plain, "preservation": plain},
)


@SLOW
@given(data=st.one_of(fields, plain))
def test_checkpoint_read_on_saved_plain_data(data):
    _read_bytes(_saved(data))
