"""The ``attnsurgeon`` command line: builds the Typer app and registers the commands.

Commands are thin: they hand typed options to :mod:`attnsurgeon.commands`. torch is only
imported inside command bodies, so ``--help`` and ``kinds`` are instant. A user error
(:class:`~attnsurgeon.errors.UsageError`) becomes one line on stderr and exit status 2;
set ``ATTNSURGEON_DEBUG=1`` to see its traceback. The machine's own failures (a full disk,
an unwritable directory, not enough memory) get one line too (:func:`errors.foreign_error`),
and SIGTERM unwinds like Ctrl-C, so no temp file is left behind.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.markup import escape

from . import __version__
from .errors import UsageError, VerificationError, foreign_error
from .kinds import KINDS

__all__ = ["app", "main"]

# Help texts follow the registry (torch-free), so a kind added there needs no edit here.
_ABOUT = f"Insert attention ({', '.join(KINDS)}) into torchvision models."

app = typer.Typer(
    name="attnsurgeon",
    help=_ABOUT,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

S = "surgery"  # help panel
ModelArg = Annotated[str | None, typer.Argument(help="torchvision model name (e.g. resnet50); may be left out when --recipe names the model.", show_default=False)]
Attn = Annotated[str | None, typer.Option("--attn", help=f"Attention kind: {' | '.join(KINDS)} (see `attnsurgeon kinds`).", rich_help_panel=S)]
Position = Annotated[str | None, typer.Option("--position", help="standard | pre | mid | post | identity | builtin (insert kinds; default: the kind's own; `attnsurgeon blocks MODEL` shows which blocks have which).", rich_help_panel=S)]
Layers = Annotated[str | None, typer.Option("--layers", help="Blocks to change: a stage (layer3) or its alias (stage3, the same depth in every family), a block (layer3.1), ranges A:B (open ends allowed), comma lists, or all (default).", rich_help_panel=S)]
Params = Annotated[list[str] | None, typer.Option("--param", help="KEY=VALUE for the kind, repeatable (e.g. --param reduction=8).", rich_help_panel=S)]
Recipes = Annotated[list[Path] | None, typer.Option("--recipe", help="TOML recipe instead of --attn/--position/--layers/--param. MODEL, --weights, --head, --init and --seed given on the command line win over the recipe's values.", rich_help_panel=S)]
Weights = Annotated[str | None, typer.Option("--weights", help="torchvision weight name (DEFAULT, IMAGENET1K_V2, ...) or none. Default: random weights.", rich_help_panel=S)]
WeightsFile = Annotated[Path | None, typer.Option("--weights-file", help="Local state_dict of the unmodified model (loaded with weights_only=True).", rich_help_panel=S)]
Init = Annotated[str | None, typer.Option("--init", help="paper (the papers' init) | preserve (new modules start as the identity, keeping pretrained accuracy). Default: paper.", rich_help_panel=S)]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for the new modules' initial weights, and the base model's when its weights are random (default: the recipe's, else 0).", rich_help_panel=S, show_default=False)]
Head = Annotated[str | None, typer.Option("--head", help="Classifier head: avg (unchanged) | dual-pool.", rich_help_panel=S)]
Output = Annotated[Path, typer.Option("-o", "--output", help="Output file.", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Json = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout, nothing else.")]
InputSize = Annotated[int, typer.Option("--input-size", help="Square input size for MAC counts and probes.")]
L = "latency"  # help panel
Latency = Annotated[bool, typer.Option("--latency", help="Also time the original and the modified model at --input-size (eval, inference mode, interleaved rounds, median) and print both and their ratio.", rich_help_panel=L)]
Device = Annotated[str | None, typer.Option("--device", help="Where --latency times: cpu (default) | cuda.", rich_help_panel=L, show_default=False)]
Batch = Annotated[int | None, typer.Option("--batch", help="Batch size for --latency. Default: 1 on cpu (one image's latency), 64 on cuda (at batch 1 a GPU is launch-bound).", rich_help_panel=L, show_default=False)]
Q = "precision"  # help panel of export-onnx's fp16/int8 options
# click keeps the last of a repeated option without a word (`--attn se --attn cbam` would
# apply only cbam): these are taken as lists so that a repeat is refused (_once)


def _as_list(option: Any, metavar: str) -> Any:
    """The ``typer.Option`` of ``option`` (an ``Annotated[str | None, typer.Option(...)]``),
    shown in the help as ``metavar``, for the same option parsed as a list."""
    info = copy.copy(get_args(option)[1])
    info.metavar = metavar
    return info


AttnOnce = Annotated[list[str] | None, _as_list(Attn, "KIND")]
PositionOnce = Annotated[list[str] | None, _as_list(Position, "POSITION")]
LayersOnce = Annotated[list[str] | None, _as_list(Layers, "SPEC")]


def _once(option: str, values: list[str] | None) -> str | None:
    """The one value of a surgery option; a repeat is an error, not a silent override."""
    if values and len(values) > 1:
        raise UsageError(f"{option} given {len(values)} times ({', '.join(values)}): a command takes one rule; "
                         "put several rules in a --recipe file")
    return values[0] if values else None


def _one_line(text: str) -> str:
    """``text`` on one line: a newline or other control character (in a file name) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _error(text: str) -> None:
    """The one ``error:`` line on stderr (the user's text verbatim: ":b:" is not an emoji)."""
    from .render import messages_console

    messages_console().print(f"[bold red]error:[/] {escape(_one_line(text))}", highlight=False, soft_wrap=True)


def _tolerant_streams() -> None:
    """Make stdout and stderr replace what their encoding cannot write (a "Δ" under
    ``PYTHONIOENCODING=ascii`` or a C locale) instead of failing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    _tolerant_streams()
    try:
        yield
    except (UsageError, OSError, MemoryError, RuntimeError) as e:
        error = foreign_error(e)
        if error is None or os.environ.get("ATTNSURGEON_DEBUG"):
            raise
        _error(str(error))
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        print(f"attnsurgeon {__version__}")
        raise typer.Exit()


@app.callback(help=_ABOUT)
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """The app's callback: ``--version``; the help text is ``_ABOUT`` (from the registry)."""


def _opts(model: str | None, attn: list[str] | None, position: list[str] | None, layers: list[str] | None,
          param: list[str] | None, recipe: list[Path] | None, weights: str | None,
          weights_file: Path | None, init: str | None, seed: int | None, head: str | None):
    from .commands import SurgeryOptions

    return SurgeryOptions(model=model, attn=_once("--attn", attn), position=_once("--position", position),
                          layers=_once("--layers", layers),
                          params=tuple(param or ()), recipes=tuple(recipe or ()), weights=weights,
                          weights_file=weights_file, init=init, seed=seed, head=head)


@app.command()
def insert(
    output: Output,
    model: ModelArg = None,
    attn: AttnOnce = None,
    position: PositionOnce = None,
    layers: LayersOnce = None,
    param: Params = None,
    recipe: Recipes = None,
    weights: Weights = None,
    weights_file: WeightsFile = None,
    init: Init = None,
    seed: Seed = None,
    head: Head = None,
    force: Force = False,
    input_size: InputSize = 224,
    latency: Latency = False,
    device: Device = None,
    batch: Batch = None,
    json: Json = False,
) -> None:
    """Rewrite MODEL's blocks with attention and save a safe .pt checkpoint."""
    with _user_errors():
        from .commands import run_insert
        from .options import check_latency_options

        run_insert(_opts(model, attn, position, layers, param, recipe, weights, weights_file, init, seed, head),
                   output=output, force=force, input_size=input_size, as_json=json,
                   latency=check_latency_options(latency, device, batch))


@app.command()
def summarize(
    target: Annotated[str | None, typer.Argument(help="A model name (dry run: nothing is written) or a FILE.pt from insert.", show_default=False)] = None,
    attn: AttnOnce = None,
    position: PositionOnce = None,
    layers: LayersOnce = None,
    param: Params = None,
    recipe: Annotated[list[Path] | None, typer.Option("--recipe", help="TOML recipe(s); several (or a directory) print one comparison table. CLI values win over the recipe's.", rich_help_panel=S)] = None,
    weights: Weights = None,
    weights_file: WeightsFile = None,
    init: Init = None,
    seed: Seed = None,
    head: Head = None,
    input_size: InputSize = 224,
    latency: Latency = False,
    device: Device = None,
    batch: Batch = None,
    json: Json = False,
) -> None:
    """Show parameters and MACs per stage before and after surgery (writes nothing)."""
    with _user_errors():
        from .commands import run_summarize
        from .options import check_latency_options

        run_summarize(target, _opts(None, attn, position, layers, param, recipe, weights, weights_file, init, seed, head),
                      input_size=input_size, as_json=json, latency=check_latency_options(latency, device, batch))


@app.command("export-onnx")
def export_onnx(
    output: Output,
    target: Annotated[str | None, typer.Argument(help="A FILE.pt from insert, or a model name (with surgery options).", show_default=False)] = None,
    attn: AttnOnce = None,
    position: PositionOnce = None,
    layers: LayersOnce = None,
    param: Params = None,
    recipe: Recipes = None,
    weights: Weights = None,
    weights_file: WeightsFile = None,
    init: Init = None,
    seed: Seed = None,
    head: Head = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 18 to 23 (20 is the exporter's default).")] = 20,
    input_size: Annotated[int, typer.Option("--input-size", help="Square size of the example input (and of the verification inputs).")] = 224,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="Fix the batch to 1 instead of a dynamic 'batch' axis.")] = False,
    dynamic_hw: Annotated[bool, typer.Option("--dynamic-hw", help="Also make height and width dynamic ('height', 'width').")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run onnx.checker and compare onnxruntime with PyTorch at batch 1 and 3.")] = True,
    atol: Annotated[float, typer.Option("--atol", help="Largest max-absolute difference from PyTorch that passes verification.")] = 1e-4,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep the file when verification fails (the exit status is still 1).")] = False,
    force: Force = False,
    json: Json = False,
    precision: Annotated[str, typer.Option("--precision", help="fp32 (default) | fp16 | int8 (onnxruntime static quantization, QDQ, per-channel weights; needs --calibration).", rich_help_panel=Q)] = "fp32",
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Folder of JPEG/PNG images (flat or in class subfolders): calibrates int8, and a held-out fifth checks agreement with the float model.", rich_help_panel=Q, show_default=False)] = None,
    calibration_count: Annotated[int, typer.Option("--calibration-count", help="How many images of --calibration to use (a seeded sample when there are more).", rich_help_panel=Q)] = 300,
    mean: Annotated[str | None, typer.Option("--mean", help="R,G,B mean for the calibration images (default: the model's torchvision weights').", rich_help_panel=Q, show_default=False)] = None,
    std: Annotated[str | None, typer.Option("--std", help="R,G,B std for the calibration images (default: the model's torchvision weights').", rich_help_panel=Q, show_default=False)] = None,
    min_agreement: Annotated[float, typer.Option("--min-agreement", help="Least top-1 agreement (0 to 1) of the fp16/int8 file with the float PyTorch model on the held-out images; below it verification fails.", rich_help_panel=Q)] = 0.9,
    quantize_all: Annotated[bool, typer.Option("--quantize-all", help="int8: quantize every node, attention gates too (the default keeps each kind's measured gate nodes in float).", rich_help_panel=Q)] = False,
    keep_float: Annotated[str | None, typer.Option("--keep-float", metavar="MODULES", help="int8: comma list of module paths (e.g. features.0,layer4.1) whose every node stays in float, for layers the agreement check shows to be sensitive.", rich_help_panel=Q, show_default=False)] = None,
    policy: Annotated[str | None, typer.Option("--policy", metavar="KIND=POLICY", help="int8: comma list of KIND=POLICY (none, gate, gate+apply, branch, branch+apply) replacing those kinds' measured defaults, e.g. se=branch.", rich_help_panel=Q, show_default=False)] = None,
) -> None:
    """Export a checkpoint or a model after surgery to verified ONNX (dynamic batch)."""
    with _user_errors():
        from .commands import QuantizeOptions, run_export

        quant = QuantizeOptions(precision=precision, calibration=calibration, calibration_count=calibration_count,
                                mean=mean, std=std, min_agreement=min_agreement, quantize_all=quantize_all,
                                keep_float=keep_float, policy=policy)

        try:
            run_export(target, _opts(None, attn, position, layers, param, recipe, weights, weights_file, init, seed, head),
                       output=output, opset=opset, input_size=input_size, static_batch=static_batch,
                       dynamic_hw=dynamic_hw, verify=verify, atol=atol, keep_failed=keep_failed,
                       force=force, as_json=json, quant=quant)
        except VerificationError as e:
            _error(str(e))
            raise typer.Exit(1) from None


@app.command()
def blocks(
    model: Annotated[str, typer.Argument(help="torchvision model name, or a FILE.pt from insert.", show_default=False)],
    json: Json = False,
) -> None:
    """List MODEL's residual blocks: stages, dotted names, channels, stride, slots."""
    with _user_errors():
        from .commands import run_blocks

        run_blocks(model, as_json=json)


@app.command()
def kinds(json: Json = False) -> None:
    """List the attention kinds, their parameters, defaults and papers."""
    with _user_errors():
        from .commands import run_kinds

        run_kinds(as_json=json)


class Terminated(SystemExit):
    """Raised by the SIGTERM handler: unwinds the stack so every ``finally`` and temp-file
    cleanup runs, as Ctrl-C does, then exits with status 143 (128 + SIGTERM)."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated(128 + signum)


def main() -> None:
    """The console script: the app, with SIGTERM turned into a clean exit."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(prog_name="attnsurgeon")
    except Terminated as e:
        sys.stderr.write("attnsurgeon: terminated (SIGTERM); no partial file left behind\n")
        raise SystemExit(e.code) from None


if __name__ == "__main__":
    main()
