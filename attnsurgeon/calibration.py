"""Calibration images for quantized ONNX export: find them, preprocess them, split them.

A calibration folder holds JPEG or PNG images, flat or in class subfolders as torchvision's
``ImageFolder`` lays them out (``DIR/cat/001.jpg``). :func:`find_images` checks the folder
and picks the images without importing torch, so a wrong folder is refused at once.
:func:`load_images` decodes and preprocesses them as the model's torchvision weights
expect (resize the shorter side, center crop to ``input_size``, scale to [0, 1],
normalise), with the weights' mean and std unless ``--mean``/``--std`` override them.

The images are split in two: most calibrate the quantizer's activation ranges, and a
held-out part (:data:`HOLDOUT_FRACTION`, at least one image) is kept for the agreement
check, so the check never scores the quantized model on the images it was fitted to.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_COUNT", "HOLDOUT_FRACTION", "IMAGE_SUFFIXES", "Preprocessing", "find_images",
           "load_images", "parse_triple", "preprocessing_for", "progress_bar", "split"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_COUNT = 300
HOLDOUT_FRACTION = 0.2
MAX_COUNT = 100_000  # a typo's guard: the images are held in memory
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes an input: resize the shorter side to ``resize``, center crop
    ``crop`` x ``crop``, scale to [0, 1], subtract ``mean`` and divide by ``std``."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    source: str  # where the figures come from, for the report

    def to_data(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "source": self.source}


def parse_triple(raw: str | None, option: str) -> tuple[float, float, float] | None:
    """``"0.5,0.5,0.5"`` -> ``(0.5, 0.5, 0.5)``; one value per RGB channel, finite (std > 0)."""
    if raw is None:
        return None
    parts = [p.strip() for p in raw.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"{option} must be three comma-separated numbers (R,G,B), got {raw!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} must be three finite comma-separated numbers (R,G,B), got {raw!r}")
    if option == "--std" and not all(v > 0 for v in values):
        raise UsageError(f"--std values must be > 0, got {raw!r}")
    return values


def find_images(folder: Path, *, count: int) -> list[Path]:
    """Up to ``count`` images of ``folder`` (flat, or one level of class subfolders).

    More images than ``count``: a seeded sample (the same files on every run), so every
    class subfolder is represented. Raises UsageError for a missing, empty or non-folder
    path, or an unusable ``count``.
    """
    if not 2 <= count <= MAX_COUNT:
        raise UsageError(f"--calibration-count must be between 2 and {MAX_COUNT}, got {count}")
    if not folder.exists():
        raise UsageError(f"--calibration: {folder}: no such folder")
    if not folder.is_dir():
        raise UsageError(f"--calibration: {folder} is not a folder")
    try:
        entries = sorted(folder.iterdir())
        found = [p for p in entries if _is_image(p)]
        for sub in entries:
            if sub.is_dir():
                found.extend(p for p in sorted(sub.iterdir()) if _is_image(p))
    except OSError as e:
        raise UsageError(f"--calibration: cannot read {folder}: {e.strerror or e}") from None
    if len(found) < 2:
        what = "no" if not found else "only one"
        raise UsageError(f"--calibration: {what} JPEG or PNG image in {folder} (flat or in class subfolders); "
                         "at least 2 are needed (calibration and held-out check)")
    if len(found) > count:
        found = sorted(random.Random(0).sample(found, count))
    return found


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def split(n: int) -> tuple[int, int]:
    """``(calibrate, held_out)`` image counts for ``n`` images: a fifth held out, at least one."""
    held = max(1, round(n * HOLDOUT_FRACTION))
    return n - held, held


def preprocessing_for(model_name: str, *, input_size: int, mean: tuple[float, float, float] | None = None,
                      std: tuple[float, float, float] | None = None) -> Preprocessing:
    """The preprocessing of ``model_name``'s default torchvision weights, scaled to ``input_size``.

    The weights' transform resizes to ``resize_size`` and crops ``crop_size`` (e.g. 256 and
    224); at another ``input_size`` the resize keeps that ratio. A model without such
    weights gets ImageNet's mean/std and the 256/224 ratio.
    """
    import torchvision

    resize, crop, source = 256, 224, "ImageNet defaults"
    w_mean, w_std = IMAGENET_MEAN, IMAGENET_STD
    interpolation: Any = "bilinear"
    try:
        weights = torchvision.models.get_model_weights(model_name).DEFAULT
        t = weights.transforms()
        crop = int(getattr(t, "crop_size", [crop])[0])
        resize = int(getattr(t, "resize_size", [resize])[0])
        w_mean, w_std = tuple(t.mean), tuple(t.std)
        interpolation = getattr(t, "interpolation", None)
        interpolation = getattr(interpolation, "value", "bilinear")
        source = f"torchvision {model_name} {weights.name}"
    except (ValueError, KeyError, AttributeError, IndexError, TypeError):
        pass
    scaled = max(input_size, round(input_size * resize / crop))
    return Preprocessing(resize=scaled, crop=input_size, mean=mean or w_mean, std=std or w_std,
                         interpolation=str(interpolation),
                         source=source + (" (--mean/--std given)" if mean or std else ""))


def load_images(paths: Sequence[Path], prep: Preprocessing, *, show_progress: bool = True) -> np.ndarray:
    """Decode and preprocess ``paths`` into one ``(N, 3, crop, crop)`` float32 array.

    A progress bar runs on stderr meanwhile. Raises UsageError naming the first image
    that cannot be read or decoded.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    mode = InterpolationMode(prep.interpolation)
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    out = np.empty((len(paths), 3, prep.crop, prep.crop), dtype=np.float32)
    with progress_bar("calibration images", total=len(paths), enabled=show_progress) as advance:
        for i, path in enumerate(paths):
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                reason = "not a readable JPEG or PNG image" if isinstance(e, UnidentifiedImageError) else (
                    getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__)
                raise UsageError(f"--calibration: cannot read {path}: {reason}") from None
            x = F.pil_to_tensor(F.center_crop(F.resize(rgb, prep.resize, interpolation=mode, antialias=True),
                                              [prep.crop, prep.crop]))
            out[i] = ((x.float() / 255.0 - mean) / std).numpy()
            advance()
    return out


@contextlib.contextmanager
def progress_bar(label: str, *, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr; yields ``advance()``. Disappears when done."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)
