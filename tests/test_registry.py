"""Adding a kind is one file plus its registration: everything that lists or covers kinds
reads the registry. A kind registered here, after import, is picked up by the CLI's help,
``attnsurgeon kinds``, surgery, :func:`attnsurgeon.training.new_modules` and the every-kind
model of the training-stack tests; the README's kinds table matches the registry.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

from attnsurgeon import training
from attnsurgeon.kinds import KINDS, POSITIONS, KindSpec, Param, register
from attnsurgeon.surgery import apply

from _every_kind import every_kind_model, every_kind_recipe, insert_kinds

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PROBE = "probekind"


def _probe_spec() -> KindSpec:
    # the builder lives outside this file only because training.new_modules knows new modules
    # by where their class is defined; the registration is what this test adds
    return KindSpec(
        name=PROBE, title="Probe kind", paper="Probe (Nobody; nowhere): https://example.org",
        mode="insert", builder="attnsurgeon.layers.squeeze_excite:build",
        params=(Param("reduction", int, 8, "reduction ratio", "r", minimum=1),),
        default_position="mid", note="registered by a test",
    )


@pytest.fixture
def probe():
    spec = register(_probe_spec())
    try:
        yield spec
    finally:
        del KINDS[PROBE]


def test_registered_kind_is_listed_by_kinds(cli, probe):
    data = json.loads(cli("kinds", "--json").stdout)
    assert PROBE in [k["name"] for k in data["kinds"]]
    text = cli("kinds").stdout
    assert PROBE in text and "Probe kind" in text and "--param reduction=8" in text


def test_registered_kind_is_in_the_cli_help():
    """The help texts are built from the registry when cli is imported: register first
    (in a fresh process, torch-free, so it also shows --help stays without torch)."""
    code = (
        "import sys\n"
        "from attnsurgeon.kinds import KindSpec, Param, register\n"
        f"register(KindSpec(name={PROBE!r}, title='Probe kind', paper='Probe', mode='insert',\n"
        "    builder='attnsurgeon.layers.squeeze_excite:build', default_position='mid',\n"
        "    params=(Param('reduction', int, 8, 'reduction ratio'),)))\n"
        "from attnsurgeon.cli import app\n"
        "for argv in (['--help'], ['insert', '--help'], ['summarize', '--help']):\n"
        "    try:\n        app(argv)\n    except SystemExit as e:\n        assert e.code in (0, None)\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "COLUMNS": "400", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(PROBE) == 3, out.stdout
    names = " | ".join(KINDS)
    assert f"Attention kind: {names} | {PROBE}" in out.stdout


def test_registered_kind_is_new_for_training_and_in_every_kind_model(probe):
    model = torchvision.models.resnet18(num_classes=10)
    changes = apply(model, PROBE, layers="layer2")
    assert [c.path for c in changes] == ["layer2.0.attn_mid", "layer2.1.attn_mid"]
    assert [name for name, _ in training.new_modules(model)] == [c.path for c in changes]
    assert PROBE in insert_kinds()
    assert any(rule.attn == PROBE for rule in every_kind_recipe().rules)
    _, changes = every_kind_model()
    assert PROBE in {c.attn for c in changes}


def test_every_kind_model_fits_many_insert_kinds(monkeypatch):
    """More insert kinds than ResNet-18 has blocks: several per block, at distinct slots."""
    extra = [f"many{i}" for i in range(12)]
    spec = _probe_spec()
    try:
        for name in extra:
            register(KindSpec(**{**spec.__dict__, "name": name}))
        recipe = every_kind_recipe()
        placed = [(r.layers, r.position) for r in recipe.rules if r.attn in insert_kinds()]
        assert len(placed) == len(insert_kinds()) > 8
        assert len(set(placed)) == len(placed)
        _, changes = every_kind_model()
        assert set(insert_kinds()) <= {c.attn for c in changes}
    finally:
        for name in extra:
            KINDS.pop(name, None)


def _kinds_table() -> dict[str, list[str]]:
    section = README.split("## Attention kinds", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {re.match(r"\| `([^`]+)`", r).group(1): [c.strip() for c in r.strip("|").split(" | ")] for r in rows}


def test_readme_kinds_table_matches_the_registry():
    table = {k: v for k, v in _kinds_table().items() if not k.startswith("--")}
    assert list(table) == list(KINDS), "README's kinds table: one row per registered kind, in order"
    for name, (_, _, mode, defaults, _) in table.items():
        spec = KINDS[name]
        if spec.mode == "insert":
            assert mode.startswith(f"insert, `{spec.default_position}`"), (name, mode)
        else:
            assert mode.startswith("replace"), (name, mode)
        shown = dict(re.findall(r"`(\w+)=([^`]+)`", defaults))
        assert set(shown) == set(spec.param_names), (name, shown)
        for p in spec.params:
            assert p.type(shown[p.name]) == p.default, (name, p.name, shown[p.name], p.default)


def test_readme_attn_option_lists_every_kind():
    row = next(line for line in README.splitlines() if line.startswith("| `--attn KIND` |"))
    assert sorted(re.findall(r"`(\w+)`", row.split("|")[2])) == sorted(KINDS)
    row = next(line for line in README.splitlines() if line.startswith("| `--position POS` |"))
    assert sorted(re.findall(r"`(\w+)`", row.split("|")[2])) == sorted(POSITIONS)
