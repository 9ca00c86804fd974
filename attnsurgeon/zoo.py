"""torchvision models and their weights: names, weight enums and local state_dict files."""

from __future__ import annotations

import contextlib
import inspect
import io
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import UsageError, first_line, foreign_error, suggest
from .files import load_plain, with_metadata
from .options import check_model_name

__all__ = ["build_model", "check_model_name", "fit_state_dict", "is_detector", "load_state_dict_file", "model_names"]


def model_names() -> list[str]:
    return list(torchvision.models.list_models())


def _weights_enum(name: str, weights: str) -> Any:
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum.verify(weights)
    except (ValueError, KeyError):
        valid = ["DEFAULT", *(w.name for w in enum)]
        raise UsageError(f"--weights: {name} has no weights {weights!r}" + suggest(weights, valid)) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local state_dict safely (``weights_only=True``; nothing is unpickled).

    Accepts a plain ``{name: tensor}`` dict, or a training checkpoint that keeps one
    under ``"state_dict"`` or ``"model"``; a ``"module."`` prefix (DataParallel) is dropped.
    """
    path = Path(path)
    data = load_plain(path, what=f"--weights-file: {path}", kind="state_dict")
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not data or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise UsageError(f"--weights-file: {path} does not hold a state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def is_detector(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision detector (its output is boxes per image, and its
    builder freezes the backbone's norms when it loads weights)."""
    return type(model).__module__.startswith("torchvision.models.detection.")


def freeze_norms_like(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Make each ``BatchNorm2d`` of ``model`` a ``FrozenBatchNorm2d`` where ``state`` holds one.

    torchvision's detection builders freeze the backbone's norms when they load weights and
    build plain ``BatchNorm2d`` without; the keys tell them apart (a frozen norm has no
    ``num_batches_tracked``). A norm of ``model`` that ``state`` does not name (where a
    Selective Kernel conv, with norms of its own, replaced it) takes the kind of ``model``'s
    other norms in the nearest module around it that ``state`` names. Only a torchvision
    detector is changed: elsewhere a norm without ``num_batches_tracked`` is one saved
    before PyTorch 0.4.1 (:func:`fit_state_dict` fills it in, as torch does).
    """
    if not is_detector(model):
        return
    norms = [(path, m) for path, m in model.named_modules()
             if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    frozen = {path: f"{path}.num_batches_tracked" not in state
              for path, _ in norms if f"{path}.running_var" in state}
    for path, module in norms:
        if type(module) is not nn.BatchNorm2d or not module.affine or not module.track_running_stats:
            continue
        verdict, parts = frozen.get(path), path.split(".")
        while verdict is None and parts:
            parts.pop()
            prefix = ".".join(parts) + "." if parts else ""
            around = [v for k, v in frozen.items() if k.startswith(prefix)]
            verdict = all(around) if around else None
        if verdict:
            model.set_submodule(path, FrozenBatchNorm2d(module.num_features, eps=module.eps))


class _ReleasingStream:
    """A stream (stderr) that first lets out what :func:`_held_download_line` held."""

    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream, self._release = stream, release

    def write(self, text: str) -> int:
        self._release()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def _held_download_line() -> Iterator[None]:
    """Hold torch.hub's ``Downloading: "<url>" to <file>`` line (written to stdout before it
    connects) until the download shows progress on stderr, or succeeds: offline, the
    one error line is all that is printed."""
    held, out = io.StringIO(), sys.stdout

    def release() -> None:
        if held.getvalue():
            out.write(held.getvalue())
            out.flush()
            held.seek(0)
            held.truncate()

    with contextlib.redirect_stdout(held), contextlib.redirect_stderr(_ReleasingStream(sys.stderr, release)):
        yield
    release()  # not on an error: the download failed, the line would only precede ours


@contextmanager
def _weights_only() -> Iterator[None]:
    """Make torchvision's builders load pretrained weights with ``weights_only=True``.

    They call ``weights.get_state_dict(...)``, which is ``torch.hub.load_state_dict_from_url``
    with its default ``weights_only=False``; and the hash of a file already in the hub cache
    is never checked. A file planted there would run code when unpickled.
    """
    enum = torchvision.models.WeightsEnum
    plain = enum.get_state_dict

    def safe(self: Any, *args: Any, **kwargs: Any) -> Any:
        return plain(self, *args, **{**kwargs, "weights_only": True})

    enum.get_state_dict = safe
    try:
        yield
    finally:
        enum.get_state_dict = plain


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model`` strictly; a misfit names the first offending keys.

    Norms become frozen where ``state`` says so (:func:`freeze_norms_like`); a norm's
    ``num_batches_tracked`` that ``state`` lacks (a file saved before PyTorch 0.4.1) is
    filled in. Modules may convert a legacy layout while loading (a dynamic conv's old 5-D
    kernel bank), so shapes are compared only when the load itself refuses them.

    Raises:
        UsageError: keys missing or unexpected, a shape that differs, a tensor that is not
            a dense CPU tensor of real numbers, or a floating-point tensor holding NaN or
            infinity (a diverged run's weights).
    """
    for k, v in state.items():
        if v.layout != torch.strided or v.device.type != "cpu" or v.is_complex():
            raise UsageError(f"{source}: {k} is a {v.layout} {v.dtype} tensor on {v.device.type}; "
                             "expected dense CPU tensors of real numbers")
    freeze_norms_like(model, state)
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in state
                and f"{k[: -len('num_batches_tracked')]}running_var" in state}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
    if problems:
        raise UsageError(f"{source} does not fit {type(model).__name__}: {'; '.join(problems)}")
    for k, v in state.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise UsageError(f"{source}: {k} holds NaN or infinite values; refusing non-finite weights")
    try:
        model.load_state_dict(with_metadata(state, model), strict=True)
    except RuntimeError as e:
        shape = [k for k in own if own[k].shape != state[k].shape]
        detail = (f"shape of {shape[0]}: file {tuple(state[shape[0]].shape)}, model {tuple(own[shape[0]].shape)}"
                  if shape else str(e).strip().splitlines()[-1].strip())
        raise UsageError(f"{source} does not fit {type(model).__name__}: {detail}") from None


def build_model(
    name: str,
    *,
    weights: str | None = None,
    weights_file: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    like: Mapping[str, torch.Tensor] | None = None,
    structure_only: bool = False,
) -> nn.Module:
    """Build torchvision model ``name``, with random, torchvision or local weights.

    Args:
        name: as ``torchvision.models.list_models()`` spells it.
        weights: a torchvision weight name (``"DEFAULT"``, ``"IMAGENET1K_V2"``, ...) or
            ``None``/``"none"`` for random weights. Downloading is torchvision's own code;
            a cached file works offline.
        weights_file: a local state_dict of the unmodified model.
        model_kwargs: passed to the torchvision builder (e.g. ``num_classes``).
        like: a state_dict the model is built to fit (``weights_file``'s, or a checkpoint's):
            torchvision builds another architecture when it loads pretrained weights (the
            auxiliary head of a segmentation model, the frozen norms of a detector), and a
            file of such weights must load into a model built without them.
        structure_only: random weights on the ``meta`` device where the builder allows it
            (no memory, no initialisation), for commands that only read the structure.
    """
    if structure_only and weights is None and weights_file is None and like is None:
        model = _build_on_meta(name, model_kwargs)
        if model is not None:
            return model
    check_model_name(name)
    if weights is not None and weights.lower() == "none":
        weights = None
    if weights is not None and weights_file is not None:
        raise UsageError("give --weights or --weights-file, not both")
    enum = _weights_enum(name, weights) if weights is not None else None
    if weights_file is not None:
        like = state = load_state_dict_file(weights_file)
    model = _call_builder(name, weights, enum, _builder_kwargs(name, model_kwargs, like), model_kwargs)
    if weights_file is not None:
        fit_state_dict(model, state, source=f"--weights-file {weights_file}")  # freezes norms too
    elif like is not None:
        freeze_norms_like(model, like)
    return model


def _build_on_meta(name: str, model_kwargs: dict[str, Any] | None) -> nn.Module | None:
    """``name`` built on the ``meta`` device, or None where its builder reads tensor data (RegNet)."""
    try:
        with torch.device("meta"):
            return build_model(name, model_kwargs=model_kwargs)
    except (RuntimeError, NotImplementedError):
        return None


def _builder_kwargs(name: str, model_kwargs: dict[str, Any] | None,
                    like: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    """``model_kwargs`` plus what the builder needs to build the architecture ``like`` fits,
    and never to download a backbone."""
    kwargs = dict(model_kwargs or {})
    builder_params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    if like is not None and "aux_loss" in builder_params and any(k.startswith("aux_classifier.") for k in like):
        kwargs.setdefault("aux_loss", True)  # what a segmentation builder does when it loads weights
    if "weights_backbone" in builder_params:  # detection/segmentation: never a backbone download
        kwargs["weights_backbone"] = None
    return kwargs


def _call_builder(name: str, weights: str | None, enum: Any, kwargs: dict[str, Any],
                  model_kwargs: dict[str, Any] | None) -> nn.Module:
    """torchvision's builder of ``name``, loading ``enum`` (the user's ``weights``) safely;
    its failures as one line."""
    try:
        with _weights_only(), _held_download_line():
            return torchvision.models.get_model(name, weights=enum, **kwargs)
    except Exception as e:
        error = foreign_error(e) if enum is None else None  # out of memory
        if error is not None:
            raise error from e
        if enum is not None:
            raise _weights_error(weights, enum, e) from None
        if model_kwargs:
            raise UsageError(f"{name}: bad model arguments {model_kwargs}: {first_line(e)}") from None
        raise


def _weights_error(weights: str | None, enum: Any, e: Exception) -> UsageError:
    """Why ``--weights`` (``enum``) did not load: a damaged cached file, or no download."""
    first = first_line(e)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache / Path(urlparse(enum.url).path).name
    if cached.is_file():
        return UsageError(f"--weights {weights}: the cached file {cached} does not load "
                          f"({first}); delete it to download it again")
    return UsageError(f"--weights {weights}: could not get {enum.url} ({type(e).__name__}: "
                      f"{first}); offline, put the file in {cache} or use --weights-file")
