"""The work behind each CLI command, as plain functions of typed options.

``cli.py`` only parses options and calls these. Options are validated (recipe, kind,
params, layer-spec syntax, output path) before any model is loaded, and nothing is
written until everything has succeeded. Importing this module does not import torch: the
modules that do are imported inside the functions that need them, after those checks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError, VerificationError
from .files import check_input_size, check_output
from .kinds import parse_cli_params
from .options import (
    LatencyOptions,
    check_export_args,
    check_model_name,
    check_regular_file,
    show_path,
)
from .recipe import (
    Recipe,
    Rule,
    check_head,
    check_init,
    check_seed,
    load_recipe,
    rule_from_options,
)
from .render import (
    BLOCKS_DROP,
    COMPARISON_DROP,
    blocks_table,
    comparison_table,
    kinds_data,
    messages_console,
    print_export_summary,
    print_kinds,
    print_summary,
    print_table,
    results_console,
)

if TYPE_CHECKING:
    from torch import nn

    from .surgery import Changes

__all__ = ["QuantizeOptions", "SurgeryOptions", "check_quantize_options", "run_blocks", "run_export", "run_insert",
           "run_kinds", "run_summarize"]

# results (tables) on stdout (render.results_console: made per command, at the terminal's
# width), messages on stderr (render.messages_console: made per message)


def _say(text: str) -> None:
    """A message on stderr, verbatim (no markup)."""
    messages_console().print(text, markup=False, highlight=False, soft_wrap=True)


def _warn(text: str) -> None:
    _say(f"warning: {text}")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While models are built, downloaded, measured and exported, send what library code
    prints (torchvision's "Downloading: ...", the ONNX exporter's progress) to stderr:
    stdout carries results only, so ``--json`` output stays JSON."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@dataclass(frozen=True)
class SurgeryOptions:
    """The surgery options shared by insert, summarize and export-onnx."""

    model: str | None = None
    attn: str | None = None
    position: str | None = None
    layers: str | None = None
    params: Sequence[str] = ()
    recipes: Sequence[Path] = ()
    weights: str | None = None
    weights_file: Path | None = None
    init: str | None = None
    seed: int | None = None  # None: the recipe's seed, else 0
    head: str | None = None

    def recipe(self, path: Path | None = None) -> Recipe:
        """The recipe these options describe: a TOML file (CLI values override its
        top-level keys) or the one rule of ``--attn/--position/--layers/--param``."""
        if path is not None:
            if self.attn or self.position or self.layers or self.params:
                raise UsageError("--recipe replaces --attn/--position/--layers/--param; give one or the other")
            recipe = load_recipe(path)
        else:
            if self.attn is None and (self.position or self.layers or self.params):
                raise UsageError("--position/--layers/--param need --attn")
            rules: tuple[Rule, ...] = ()
            if self.attn is not None:
                rules = (rule_from_options(self.attn, position=self.position,
                                           layers="all" if self.layers is None else self.layers,
                                           params=parse_cli_params(list(self.params))),)
            recipe = Recipe(rules=rules)
        recipe = recipe.with_overrides(model=self.model, weights=self.weights, head=self.head,
                                       init=self.init, seed=self.seed)
        if recipe.seed is None:  # reproducible by default
            recipe = replace(recipe, seed=0)
        check_seed(recipe.seed, "--seed")
        if self.weights_file is not None and self.weights is None:
            recipe = replace(recipe, weights=None)  # --weights-file wins over the recipe's weights
        check_init(recipe.init, "--init")
        return replace(recipe, head=check_head(recipe.head, "--head"))  # "avg" -> None

    def check(self, recipe: Recipe) -> str:
        """Check what can be checked without torch: the model's name, and the weights
        (one source, a regular file). Return the model name."""
        name = check_model_name(recipe.model)
        if self.weights_file is not None:
            if recipe.weights not in (None, "none"):
                raise UsageError("give --weights or --weights-file, not both")
            check_regular_file(self.weights_file, f"--weights-file: {show_path(self.weights_file)}")
        return name


@dataclass
class Prepared:
    """A model before and after surgery, and what was done."""

    name: str
    recipe: Recipe
    original: nn.Module
    model: nn.Module
    changes: Changes
    weights: str = "none"


def prepare(opts: SurgeryOptions, recipe: Recipe) -> Prepared:
    from .surgery import apply_recipe
    from .torch_state import seeded
    from .zoo import build_model

    name = opts.check(recipe)
    # random base weights come from the recipe's seed too (0 unless given): same command, same file
    with seeded(recipe.seed):
        original = build_model(name, weights=recipe.weights, weights_file=opts.weights_file)
    model = copy.deepcopy(original)
    changes = apply_recipe(model, recipe)
    weights = (f"file:{Path(opts.weights_file).name}" if opts.weights_file
               else recipe.weights or "none")
    return Prepared(name, recipe, original, model, changes, weights)


def _block_groups(model: nn.Module) -> dict[str, str]:
    """Each block's path -> its stage, the groups of the summary's rows."""
    from .blocks import find_blocks

    return {info.name: info.stage for info, _ in find_blocks(model)}


def _warn_costly_stages(before: Any, after: Any, *, input_size: int) -> None:
    """One line on stderr naming the stages where the new modules cost more MACs than the
    stage's own layers (a non-local block's (HW)^2 on an early stage, say)."""
    own = before.by_name()
    costly = [f"{g.name} (+{g.macs - own[g.name].macs:,} vs {own[g.name].macs:,})" for g in after.groups
              if g.name in own and g.name not in ("stem", "head") and g.macs - own[g.name].macs > own[g.name].macs]
    if costly:
        _warn(f"at --input-size {input_size} the inserted modules cost more MACs than the stage itself in "
              f"{', '.join(costly)}; a cost that grows with (HW)^2 (nl) belongs on later stages")


def summarize_prepared(p: Prepared, *, input_size: int, probe: bool = True,
                       latency: LatencyOptions | None = None) -> dict[str, Any]:
    from .report import measure, preservation, summary_data
    from .surgery import preserve_lost

    groups = _block_groups(p.original)
    before = measure(p.original, groups, input_size=input_size)
    after = measure(p.model, groups, input_size=input_size)
    pres = preservation(p.original, p.model, input_size=input_size) if probe and p.changes else None
    _warn_costly_stages(before, after, input_size=input_size)
    note = preserve_lost(p.changes, p.recipe.init)
    if note:
        _warn(note)
        if pres is not None:
            pres["function_kept"] = False
            pres["note"] = note
    if pres is not None and pres.get("too_small"):
        _warn(f"the unmodified model's outputs on the probe are at most {pres['logit_scale']:.2g} (random "
              "weights?): too small to judge preservation; use --weights or --weights-file")
    if before.params and after.params - before.params > before.params:
        _warn(f"the surgery adds {after.params - before.params:,} parameters, more than the model's own "
              f"{before.params:,} (+{100 * (after.params - before.params) / before.params:.0f}%); "
              "if that is not intended, check --layers and --param")
    data = summary_data(model_name=p.name, recipe=p.recipe.to_data(), before=before, after=after,
                        changes=p.changes, input_size=input_size, preservation=pres)
    return _with_latency(data, p.original, p.model, input_size=input_size, latency=latency)


def _with_latency(data: dict[str, Any], original: nn.Module, model: nn.Module, *, input_size: int,
                  latency: LatencyOptions | None) -> dict[str, Any]:
    """``data`` plus ``"latency"``: measured before/after times, or None when not asked."""
    if latency is not None:
        from .latency import measure_latency

        data["latency"] = measure_latency(original, model, input_size=input_size, options=latency)
    else:
        data["latency"] = None
    return data


def _write_json(data: Any) -> None:
    """``data`` as JSON on stdout; NaN and infinity (a diverged or all-zero model's figures),
    which JSON has no words for, become null."""
    def plain(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    sys.stdout.write(json.dumps(plain(data), indent=2, allow_nan=False) + "\n")


def _emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _write_json(data)
    else:
        print_summary(results_console(), data)


def run_insert(opts: SurgeryOptions, *, output: Path, force: bool, input_size: int, as_json: bool,
               latency: LatencyOptions | None = None) -> None:
    check_input_size(input_size)
    if len(opts.recipes) > 1:
        raise UsageError("insert takes one --recipe")
    recipe = opts.recipe(opts.recipes[0] if opts.recipes else None)
    if not recipe.rules and recipe.head is None:
        raise UsageError("nothing to insert: give --attn KIND, --head or --recipe FILE")
    opts.check(recipe)  # everything so far without torch: a typo is reported at once
    hint = "; use export-onnx to write ONNX" if output.suffix == ".onnx" else ""
    output = check_output(output, force=force, suffix=(".pt", ".pth"), hint=hint)
    from .checkpoint import save
    from .latency import check_device

    check_device(latency)
    with _stdout_to_stderr():
        p = prepare(opts, recipe)
        data = summarize_prepared(p, input_size=input_size, latency=latency)
        save(output, p.model, model_name=p.name, recipe=p.recipe, weights=p.weights,
             preservation=data["preservation"])
    with _removed_on_failure(output):
        data["output"] = str(output)
        _emit(data, as_json)
        _say(f"wrote {show_path(output)}")


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    """Remove the file just written at ``path`` if what follows fails (printing the
    summary into a closed pipe, an interrupt): a failed command leaves nothing behind."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _summarize_checkpoint(path: Path, *, input_size: int, latency: LatencyOptions | None = None) -> dict[str, Any]:
    from . import checkpoint
    from .report import measure, summary_data

    data = checkpoint.read(path)
    original = checkpoint.build_base(data, path)
    model, changes = checkpoint.rebuild(data, path, base=original)
    recipe = checkpoint.recipe_of(data, path)
    groups = _block_groups(original)
    result = summary_data(
        model_name=data["model"], recipe=data["recipe"],
        before=measure(original, groups, input_size=input_size),
        after=measure(model, groups, input_size=input_size),
        changes=changes, input_size=input_size, preservation=data.get("preservation"),
    )
    _with_latency(result, original, model, input_size=input_size, latency=latency)
    made_by = "; ".join(r.describe() for r in recipe.rules)
    if recipe.head:
        made_by += f"; head {recipe.head}"
    result["checkpoint"] = {"path": str(path), "weights": data.get("weights"),
                            "versions": data.get("versions"),
                            "made_by": f"{data['model']}: {made_by}, init {recipe.init}"}
    return result


def run_summarize(target: str | None, opts: SurgeryOptions, *, input_size: int, as_json: bool,
                  latency: LatencyOptions | None = None) -> None:
    check_input_size(input_size)
    if target is not None and _is_checkpoint(target, opts, "summarize"):
        from .latency import check_device

        check_device(latency)
        with _stdout_to_stderr():
            data = _summarize_checkpoint(Path(target), input_size=input_size, latency=latency)
        if not as_json:
            _say(f"{show_path(target)}: made by {data['checkpoint']['made_by']}")
        _emit(data, as_json)
        return
    opts = replace(opts, model=target)
    paths = _expand(opts.recipes)
    # every recipe parsed and checked before torch is imported and any model is built
    recipes = [opts.recipe(path) for path in paths] if paths else [opts.recipe(None)]
    for recipe in recipes:
        opts.check(recipe)
    from .latency import check_device

    check_device(latency)
    if len(recipes) == 1:
        with _stdout_to_stderr():
            data = summarize_prepared(prepare(opts, recipes[0]), input_size=input_size, latency=latency)
        _emit(data, as_json)
        return
    rows = []
    for path, recipe in zip(paths, recipes, strict=True):
        with _stdout_to_stderr():
            data = summarize_prepared(prepare(opts, recipe), input_size=input_size, probe=False,
                                      latency=latency)
        data["source"] = str(path)
        rows.append(data)
    if as_json:
        _write_json({"recipes": rows})
    else:
        print_table(results_console(), comparison_table(rows), drop=COMPARISON_DROP)


def _is_checkpoint(target: str, opts: SurgeryOptions, command: str) -> bool:
    """Whether ``target`` is a file (then no surgery option may come with it) rather than
    a model name: an existing file, whatever its suffix, or anything a model name cannot
    be (torchvision's names have no ``.`` or ``/``); a FIFO or device is refused as not
    a regular file. Its content says whether it is an
    attnsurgeon checkpoint (:func:`checkpoint.read`). A folder named like a model (say
    ``resnet18/``) does not hide the model."""
    if not ("." in target or os.sep in target or "/" in target
            or (os.path.exists(target) and not os.path.isdir(target))):
        return False
    if opts != SurgeryOptions():
        raise UsageError(f"{command} FILE.pt takes no surgery options: the file says what was done")
    check_regular_file(target, show_path(target))
    return True


def _expand(paths: Sequence[Path]) -> list[Path]:
    """Recipe paths, with a directory standing for its ``*.toml`` files."""
    result: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.toml"))
            if not found:
                raise UsageError(f"--recipe: no .toml files in {path}")
            result.extend(found)
        else:
            result.append(path)
    return result


def run_blocks(target: str, *, as_json: bool) -> None:
    """List the blocks of a model, named or saved in a checkpoint (what ``insert`` wrote)."""
    from_file = _is_checkpoint(target, SurgeryOptions(), "blocks")
    if not from_file:
        check_model_name(target)
    from .blocks import find_blocks, unsupported_message

    if from_file:
        from . import checkpoint

        with _stdout_to_stderr():
            data = checkpoint.read(target)
            model, _ = checkpoint.rebuild(data, target)
        name = data["model"]
    else:
        from .zoo import build_model

        model, name = build_model(target, structure_only=True), target
    blocks = [info.to_data() for info, _ in find_blocks(model)]
    if not blocks:
        raise UsageError(unsupported_message(model, name))
    if as_json:
        _write_json({"model": name, "blocks": blocks})
        return
    title = name if not from_file else f"{show_path(target)} ({name} after surgery)"
    print_table(results_console(), blocks_table(title, blocks), drop=BLOCKS_DROP)


def run_kinds(*, as_json: bool) -> None:
    if as_json:
        _write_json(kinds_data())
    else:
        print_kinds(results_console())


@dataclass(frozen=True)
class QuantizeOptions:
    """export-onnx's precision options: what to convert the float file to, and how to check it."""

    precision: str = "fp32"
    calibration: Path | None = None
    calibration_count: int = 300
    mean: str | None = None
    std: str | None = None
    min_agreement: float = 0.9
    quantize_all: bool = False
    keep_float: str | None = None
    policy: str | None = None


def run_export(target: str | None, opts: SurgeryOptions, *, output: Path, opset: int, input_size: int,
               static_batch: bool, dynamic_hw: bool, verify: bool, atol: float, keep_failed: bool,
               force: bool, as_json: bool, quant: QuantizeOptions | None = None) -> None:
    """Export a checkpoint (``target`` is a file) or a model after surgery to ONNX.

    Raises:
        UsageError: bad options, an existing output without ``force``, or a model the
            exporter cannot export.
        VerificationError: the file does not match PyTorch (the summary is printed first).
    """
    quant = quant or QuantizeOptions()
    images_found = check_quantize_options(quant, verify=verify)  # before torch is imported
    check_export_args(input_size=input_size, opset=opset, atol=atol)
    path = target if target is not None and _is_checkpoint(target, opts, "export-onnx") else None
    if len(opts.recipes) > 1:
        raise UsageError("export-onnx takes one --recipe")
    if path is None:
        opts = replace(opts, model=target)
        recipe = opts.recipe(opts.recipes[0] if opts.recipes else None)
        opts.check(recipe)  # everything so far without torch
    output = check_output(output, force=force, suffix=".onnx")
    from . import checkpoint
    from .onnx_export import export_onnx

    try:
        with _stdout_to_stderr():
            if path is not None:
                data = checkpoint.read(path)
                model, _ = checkpoint.rebuild(data, path)
                source = {"source": path, "model": data["model"], "recipe": data["recipe"]}
            else:
                p = prepare(opts, recipe)
                model = p.model
                source = {"source": p.name, "model": p.name, "recipe": p.recipe.to_data(), "weights": p.weights}
            if quant.precision == "fp32":
                summary = export_onnx(model, output, input_size=input_size, opset=opset,
                                      dynamic_batch=not static_batch, dynamic_hw=dynamic_hw, verify=verify,
                                      atol=atol, keep_failed=keep_failed)
            else:
                summary = _export_quantized(model, source["model"], output, quant, images_found,
                                            input_size=input_size, opset=opset, static_batch=static_batch,
                                            dynamic_hw=dynamic_hw, atol=atol, keep_failed=keep_failed,
                                            show_progress=not as_json or sys.stderr.isatty())
    except VerificationError as e:
        _emit_export({**source, **e.summary}, as_json)
        raise
    with _removed_on_failure(output):
        _emit_export({**source, **summary}, as_json)
        _say(f"wrote {show_path(output)}")


def check_quantize_options(quant: QuantizeOptions, *, verify: bool) -> list[Path] | None:
    """Check the precision options and the calibration folder (no torch yet); the images found."""
    from .calibration import find_images, parse_triple
    from .quantize import check_quantize_args

    check_quantize_args(precision=quant.precision, calibration=quant.calibration, quantize_all=quant.quantize_all,
                        min_agreement=quant.min_agreement, count=quant.calibration_count, keep_float=quant.keep_float,
                        policy=quant.policy)
    if quant.precision == "fp32" and (quant.mean is not None or quant.std is not None):
        raise UsageError("--mean/--std preprocess --calibration images (for --precision int8 or fp16)")
    if quant.precision != "fp32" and not verify:
        raise UsageError(f"--no-verify: a {quant.precision} file is always checked against the float model "
                         "(its agreement is the only evidence it works)")
    if (quant.mean is not None or quant.std is not None) and quant.calibration is None:
        raise UsageError("--mean/--std preprocess --calibration images; give --calibration DIR")
    parse_triple(quant.mean, "--mean")
    parse_triple(quant.std, "--std")
    if quant.calibration is None:
        return None
    return find_images(quant.calibration, count=quant.calibration_count)


def _export_quantized(model: nn.Module, model_name: str, output: Path, quant: QuantizeOptions,
                      images_found: list[Path] | None, *, input_size: int, opset: int, static_batch: bool,
                      dynamic_hw: bool, atol: float, keep_failed: bool, show_progress: bool) -> dict[str, Any]:
    from .calibration import load_images, parse_triple, preprocessing_for, split
    from .quantize import check_module_paths, check_policy_kinds, export_quantized, parse_module_paths, parse_policies

    keep_float, policies = parse_module_paths(quant.keep_float), parse_policies(quant.policy)
    check_module_paths(model, keep_float)  # before the images are decoded
    check_policy_kinds(model, policies)
    images = calibration = None
    if images_found is not None:
        prep = preprocessing_for(model_name, input_size=input_size, mean=parse_triple(quant.mean, "--mean"),
                                 std=parse_triple(quant.std, "--std"))
        images = load_images(images_found, prep, show_progress=show_progress)
        n_cal, n_held = split(len(images))
        calibration = {"folder": str(quant.calibration), "images": len(images_found), "calibrate": n_cal,
                       "held_out": n_held, "preprocessing": prep.to_data()}
    return export_quantized(model, output, precision=quant.precision, input_size=input_size, opset=opset,
                            dynamic_batch=not static_batch, dynamic_hw=dynamic_hw, atol=atol,
                            calibration=calibration, images=images, quantize_all=quant.quantize_all,
                            keep_float=keep_float, policies=policies,
                            min_agreement=quant.min_agreement, keep_failed=keep_failed, show_progress=show_progress)


def _emit_export(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _write_json(data)
    elif data.get("quantized"):
        from .quantize import print_quantized_summary

        print_quantized_summary(results_console(), data)
    else:
        print_export_summary(results_console(), data)
