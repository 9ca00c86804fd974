"""Recipes: what surgery to do, as frozen data, validated before any model is loaded.

A recipe comes from a TOML file (``recipes/*.toml``) or from the command-line surgery
options (one rule). Either way it becomes a :class:`Recipe` whose rules carry fully
resolved parameters, so a checkpoint's ``recipe`` field says exactly how it was made::

    model = "resnet50"          # optional when the command line names the model
    weights = "DEFAULT"         # optional: torchvision weight name or "none"
    head = "dual-pool"          # optional
    init = "preserve"           # optional: paper | preserve

    [[insert]]
    attn = "se"
    position = "standard"       # insert kinds only
    layers = "layer3:"
    params = { reduction = 16 }
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import UsageError, suggest
from .kinds import HEADS, INIT_MODES, KINDS, get_kind
from .options import MAX_RECIPE_BYTES, check_regular_file, show_path
from .select import check_spec_syntax

MAX_NESTING = 100  # arrays and inline tables in a recipe; a real one nests two or three deep


def _nesting(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text`` (brackets in strings count too: an
    overestimate, which only a recipe far beyond :data:`MAX_NESTING` could notice)."""
    depth = peak = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            peak = max(peak, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return peak

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["MAX_SEED", "Recipe", "Rule", "check_seed", "load_recipe", "recipe_from_data", "rule_from_options"]

MAX_SEED = 2**64 - 1  # torch.manual_seed takes a 64-bit unsigned seed

_TOP_KEYS = ("model", "weights", "head", "init", "seed", "insert")
_RULE_KEYS = ("attn", "position", "layers", "params")
_TYPE_NAMES = {"str": "a string", "int": "an integer", "Mapping": "a table"}


@dataclass(frozen=True)
class Rule:
    """One surgery step: put ``attn`` at ``position`` of the blocks in ``layers``."""

    attn: str
    layers: str = "all"
    position: str | None = None  # None for replace kinds
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"attn": self.attn, "layers": self.layers}
        if self.position is not None:
            data["position"] = self.position
        data["params"] = dict(self.params)
        return data

    def describe(self) -> str:
        where = f" at {self.position}" if self.position else ""
        args = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.attn}{where} on {self.layers}" + (f" ({args})" if args else "")


@dataclass(frozen=True)
class Recipe:
    """A whole surgery: model, weights, head, init mode and rules applied in order."""

    model: str | None = None
    rules: tuple[Rule, ...] = ()
    weights: str | None = None
    head: str | None = None
    init: str = "paper"
    seed: int | None = None
    source: str = "command line"

    def to_data(self) -> dict[str, Any]:
        """Plain data for the checkpoint (loadable with ``weights_only=True``)."""
        data: dict[str, Any] = {"model": self.model, "init": self.init}
        if self.head is not None:
            data["head"] = self.head
        if self.seed is not None:
            data["seed"] = self.seed
        data["insert"] = [r.to_data() for r in self.rules]
        return data

    def with_overrides(self, **values: Any) -> Recipe:
        """Return a copy with the non-None ``values`` replacing top-level fields."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def check_head(head: str | None, where: str) -> str | None:
    if head is None or head == "avg":
        return None
    if head not in HEADS:
        raise UsageError(f"{where}: unknown head {head!r}" + suggest(head, HEADS))
    return head


def check_init(init: str, where: str) -> str:
    if init not in INIT_MODES:
        raise UsageError(f"{where}: init must be one of {', '.join(INIT_MODES)}, got {init!r}")
    return init


def check_seed(seed: int | None, where: str) -> int | None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{where} must be an integer from 0 to 2**64-1, got {seed}")
    return seed


def make_rule(
    attn: str, *, layers: str = "all", position: str | None = None,
    params: Mapping[str, object] | None = None, where: str,
) -> Rule:
    """Validate one rule and resolve its parameters (defaults filled in). Errors name
    ``where`` and the key (``rule 2: layers``), or the option for ``where="options"``."""
    def at(key: str) -> str:
        return f"--{key}" if where == "options" else f"{where}: {key}"

    kind = get_kind(attn, where=at("attn"))
    resolved_position = kind.resolve_position(position, where=at("position"))
    check_spec_syntax(layers, where=at("layers"))
    resolved = kind.resolve_params(params or {}, where=at("param") if where == "options" else where)
    return Rule(attn=attn, layers=layers.strip(), position=resolved_position,
                params=tuple(resolved.items()))


def rule_from_options(
    attn: str, *, position: str | None, layers: str, params: Mapping[str, str],
) -> Rule:
    """The single rule that ``--attn/--position/--layers/--param`` describe."""
    return make_rule(attn, layers=layers, position=position, params=params, where="options")


def recipe_from_data(data: Mapping[str, Any], *, source: str) -> Recipe:
    """Validate parsed TOML (or checkpoint) data into a :class:`Recipe`."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: a recipe must be a table, got {type(data).__name__}")
    _check_keys(data, _TOP_KEYS, source)

    def typed(key: str, value: Any, kind: type | tuple[type, ...], where: str, optional: bool = True) -> Any:
        if value is None and optional:  # (TOML has no null; checkpoint data may)
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            want = " or ".join(_TYPE_NAMES.get(k.__name__, k.__name__) for k in kinds)
            raise UsageError(f"{where}: {key} must be {want}, got {value!r}")
        return value

    model = typed("model", data.get("model"), str, source)
    weights = typed("weights", data.get("weights"), str, source)
    head = check_head(typed("head", data.get("head"), str, source), source)
    init = check_init(typed("init", data.get("init", "paper"), str, source), source)
    seed = check_seed(typed("seed", data.get("seed"), int, source), f"{source}: seed")
    raw_rules = data.get("insert", [])
    if not isinstance(raw_rules, list):
        raise UsageError(f"{source}: 'insert' must be an array of tables ([[insert]])")
    rules = []
    for n, raw in enumerate(raw_rules, start=1):
        where = f"{source}: rule {n}"
        if not isinstance(raw, Mapping):
            raise UsageError(f"{where}: must be a table")
        _check_keys(raw, _RULE_KEYS, where)
        if "attn" not in raw:
            raise UsageError(f"{where}: missing key 'attn'")
        attn = typed("attn", raw["attn"], str, where, optional=False)
        params = typed("params", raw.get("params", {}), Mapping, where, optional=False)
        _check_param_types(attn, params, where)
        rules.append(make_rule(
            attn,
            layers=typed("layers", raw.get("layers", "all"), str, where, optional=False),
            position=typed("position", raw.get("position"), str, where),
            params=params,
            where=where,
        ))
    if not rules and head is None:
        raise UsageError(f"{source}: no [[insert]] rule and no head: nothing to do")
    return Recipe(model=model, rules=tuple(rules), weights=weights, head=head,
                  init=init, seed=seed, source=source)


def _check_keys(table: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    """Every key of ``table`` is a string among ``allowed``; else the error names the first bad one."""
    for key in table:
        if not isinstance(key, str):
            raise UsageError(f"{where}: keys must be strings, got {key!r}")
        if key not in allowed:
            raise UsageError(f"{where}: unknown key {key!r}" + suggest(key, allowed))


def _check_param_types(attn: str, params: Mapping[str, Any], where: str) -> None:
    """In TOML a number is written as a number: ``reduction = "8"`` is a type error.

    (``--param`` values arrive as strings and are converted; TOML values are not.)
    Unknown kinds and keys are left to :func:`make_rule`, which names the valid ones.
    """
    kind = KINDS.get(attn)
    if kind is None:
        return
    types = {p.name: p.type for p in kind.params}
    for key, value in params.items():
        want = types.get(key, str)
        if isinstance(value, str) and want is not str:
            raise UsageError(
                f"{where}: params.{key} must be {_TYPE_NAMES.get(want.__name__, want.__name__)}, "
                f"got the string {value!r}"
            )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a TOML recipe; errors name the file, rule and key."""
    path = Path(path)
    shown = show_path(path)
    check_regular_file(path, f"--recipe: {shown}")  # a FIFO would block, /dev/zero never end
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{shown}: cannot read recipe: {e.strerror or e}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise UsageError(f"{shown}: larger than {MAX_RECIPE_BYTES // 1024} KiB, not a recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{shown}: a recipe is UTF-8 text; byte {e.start} is not ({e.reason})") from None
    if _nesting(text) > MAX_NESTING:  # before the parser: its recursion depends on the caller's limit
        raise UsageError(f"{shown}: invalid TOML: nested too deeply")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{shown}: invalid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per nested array or table
        raise UsageError(f"{shown}: invalid TOML: nested too deeply") from None
    return recipe_from_data(data, source=shown)
