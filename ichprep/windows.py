"""Display windows: Hounsfield units to uint8 channels, and resizing.

A window (center c, width w) maps HU linearly onto 0..255 over
[c - w/2, c + w/2] and clips outside it.  Rounding is half-up:
``uint8 = clip(floor((hu - lo) * 255 / w + 0.5), 0, 255)``.  Several windows
stacked give the (C, H, W) uint8 image the cache stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from . import scratch
from .errors import WindowSpecError

#: Air, used to pad non-square images to a square before resizing.
AIR_HU = -1000.0


@dataclass(frozen=True)
class Window:
    name: str
    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise WindowSpecError(f"window name {self.name!r} must be letters, digits, '-' or '_'")
        if not (math.isfinite(self.center) and math.isfinite(self.width)) or self.width <= 0:
            raise WindowSpecError(
                f"window {self.name!r}: center must be finite and width > 0 (got {self.center}, {self.width})"
            )

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    def to_dict(self) -> dict:
        return {"name": self.name, "center": self.center, "width": self.width}


#: Named windows (center/width in HU) used by the reference method and the top RSNA solutions.
PRESETS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("brain", 40.0, 80.0),
        Window("subdural", 80.0, 200.0),
        Window("soft", 40.0, 380.0),
        Window("bone", 600.0, 2800.0),
    )
}
DEFAULT_WINDOWS: tuple[Window, ...] = (PRESETS["brain"], PRESETS["subdural"], PRESETS["soft"])


def parse_window(text: str) -> Window:
    """``"brain"`` -> the preset; ``"NAME:CENTER:WIDTH"`` -> a custom window."""
    text = text.strip()
    if ":" not in text:
        if text in PRESETS:
            return PRESETS[text]
        raise WindowSpecError(f"unknown window {text!r}; choose one of {', '.join(PRESETS)} or give NAME:CENTER:WIDTH")
    parts = text.split(":")
    if len(parts) != 3:
        raise WindowSpecError(f"window {text!r} must look like NAME:CENTER:WIDTH, e.g. stroke:32:8")
    name, center, width = parts
    try:
        return Window(name, float(center), float(width))
    except ValueError as exc:
        if isinstance(exc, WindowSpecError):
            raise
        raise WindowSpecError(f"window {text!r}: CENTER and WIDTH must be numbers") from None


def parse_windows(texts: list[str] | tuple[str, ...]) -> tuple[Window, ...]:
    windows = tuple(parse_window(t) for t in texts) if texts else DEFAULT_WINDOWS
    names = [w.name for w in windows]
    if len(set(names)) != len(names):
        raise WindowSpecError(f"window names must be unique, got {names}")
    return windows


def apply_window(
    hu: np.ndarray, window: Window, out: np.ndarray | None = None, temporary: np.ndarray | None = None
) -> np.ndarray:
    """One window of a float HU image as uint8 (writes into ``out`` if given).

    ``temporary`` (float32, the shape of ``hu``) saves an allocation per call.  The float -> uint8 cast
    truncates, which is the formula's floor because the value is already clipped to [0, 255].
    """
    scale = 255.0 / window.width
    tmp = np.multiply(hu, np.float32(scale), dtype=np.float32, out=temporary)
    # (hu - lo) * s + 0.5  ==  hu * s + (0.5 - lo * s): one fused pass instead of two.
    tmp += np.float32(0.5 - window.low * scale)
    if out is None:
        out = np.empty(hu.shape, dtype=np.uint8)
    np.clip(tmp, 0.0, 255.0, out=out, casting="unsafe")
    return out


def apply_windows(
    hu: np.ndarray, windows: tuple[Window, ...] | list[Window], out: np.ndarray | None = None
) -> np.ndarray:
    """Stack windows of a (H, W) HU image into a (C, H, W) uint8 image."""
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D HU image, got shape {hu.shape}")
    if out is None:
        out = np.empty((len(windows),) + hu.shape, dtype=np.uint8)
    temporary = scratch.array("window", hu.shape, np.float32)  # see ichprep.scratch: no page faults
    for i, window in enumerate(windows):
        apply_window(hu, window, out=out[i], temporary=temporary)
    return out


def pad_to_square(hu: np.ndarray, fill: float = AIR_HU) -> np.ndarray:
    """Centre a non-square image on a square of ``fill`` so resizing keeps the aspect ratio."""
    rows, cols = hu.shape
    if rows == cols:
        return hu
    side = max(rows, cols)
    square = np.full((side, side), fill, dtype=hu.dtype)
    top, left = (side - rows) // 2, (side - cols) // 2
    square[top : top + rows, left : left + cols] = hu
    return square


def resize_square(hu: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Pad to a square (with air) and resize to ``size`` x ``size`` with OpenCV INTER_AREA (into ``out`` if given)."""
    square = pad_to_square(hu)
    if square.shape[0] == size:
        return square
    return cv2.resize(square, (size, size), dst=out, interpolation=cv2.INTER_AREA)


def preprocess(hu: np.ndarray, windows: tuple[Window, ...], size: int, out: np.ndarray | None = None) -> np.ndarray:
    """HU image -> (C, size, size) uint8: pad to square, resize, then window (into ``out`` if given).

    Resizing the HU image before windowing averages physical values (not clipped
    display values) and windows 4x fewer pixels at 512 -> 256.
    """
    resized = resize_square(
        hu.astype(np.float32, copy=False), size, out=scratch.array("resized", (size, size), np.float32)
    )
    return apply_windows(resized, windows, out=out)
