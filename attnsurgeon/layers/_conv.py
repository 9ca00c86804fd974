"""The steps every replace kind's ``from_conv`` shares (SK, dynamic conv, and those to come)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from . import check_init

__all__ = ["replace_conv"]

R = TypeVar("R", bound=nn.Module)


def replace_conv(conv: nn.Conv2d, build: Callable[..., R], *, kind: str, init: str,
                 preserve: Callable[[R], None]) -> R:
    """Build the module that replaces ``conv``, with ``conv``'s geometry, device and dtype.

    The steps, in order: check ``init``; refuse a conv that is not zero-padded by numbers
    (a replacement pads its input itself); call ``build(in_channels=, out_channels=,
    kernel_size=, stride=, padding=, dilation=, groups=, bias=)`` with ``conv``'s values
    (``bias`` a bool; groups kept, so a depthwise conv stays depthwise); move the result to
    ``conv``'s device and dtype; under ``init="preserve"`` call ``preserve(new)``, which
    must make ``new`` start computing what ``conv`` (and what it takes over) computed.

    A replace kind's ``from_conv`` passes its own knobs with ``functools.partial`` or a
    lambda, e.g. ``replace_conv(conv, partial(DynamicConv2d, kernels=4), kind="dynconv",
    init=init, preserve=lambda new: new.preserve_(conv))``.

    Raises:
        ValueError: an ``init`` not in :data:`INIT_MODES`, or a conv with string padding
            (``'same'``) or a padding mode other than zeros (the message names ``kind``).
    """
    check_init(init)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            f"{kind} replaces a zero-padded conv with numeric padding, got "
            f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
        )
    new = build(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None)
    new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    if init == "preserve":
        preserve(new)
    return new
