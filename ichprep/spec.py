"""The preprocessing spec: everything that decides the bytes of a cached slice.

It is stored in the Zarr group's attributes (key ``ichkit``) so the trainer
and ``predict`` apply exactly what the converter applied; nobody re-types
window values.  Two specs are compatible when their :meth:`PreprocessSpec.key`
matches (library versions are recorded but not compared).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from .windows import DEFAULT_WINDOWS, Window, preprocess

logger = logging.getLogger(__name__)

#: Store format. 2: ``images`` carries Zarr v3 ``dimension_names``; 3: the recorded pipeline names the real
#: readers. Shard bytes are the same in all three.
FORMAT_VERSION = 3
_TRUE_PIPELINE = "a recorded pipeline naming the readers really used (its own says pydicom decodes every file)"
#: Earlier formats still read (their pixels are the same), and what each lacks; ``ichprep upgrade`` fixes them.
OLDER_FORMATS = {
    1: f"dimension_names on images (xarray and other Zarr v3 readers cannot name its axes) and {_TRUE_PIPELINE}",
    2: _TRUE_PIPELINE,
}
#: Axis names of ``images``, in order.
AXES = ("slice", "channel", "y", "x")
COMPRESSORS = ("zstd", "blosc-lz4")
#: The steps from stored pixels to cached bytes, in order; recorded in stores, so the words stay as written.
PIPELINE = (
    "read: Part 10 little-endian files with defined lengths by ichkit's element walk (ichprep.plainread, the "
    "values pydicom reads), any other file by pydicom.dcmread",
    "decode pixels: uncompressed little-endian 16-bit pixels straight from their bytes, any other kind by "
    "pydicom's decoders (all transfer syntaxes with pylibjpeg plugins)",
    "to HU: x * RescaleSlope + RescaleIntercept, float32",
    "pad non-square images to a centred square with -1000 HU (air)",
    "resize HU to size x size with OpenCV INTER_AREA",
    "window each channel: uint8 = clip(floor((hu - (center - width/2)) * 255 / width + 0.5), 0, 255)",
)
QUIRK_FIXES = (
    "rsna_12bit_wraparound: BitsStored 12, PixelRepresentation 0, RescaleIntercept > -100 -> "
    "x = pixels + 1000; x[x >= 4096] -= 4096; intercept = -1000",
    "multi-valued WindowCenter/WindowWidth: first value (header windows are recorded, never used for channels)",
    "slices ordered by ImagePositionPatient[2] within a study, InstanceNumber where a study lacks it",
)


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("ichkit", "pydicom", "numpy", "opencv-python-headless", "zarr", "numcodecs"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


@dataclass(frozen=True)
class PreprocessSpec:
    windows: tuple[Window, ...] = DEFAULT_WINDOWS
    size: int = 256
    shard_slices: int = 64
    compressor: str = "zstd"
    compression_level: int = 1
    versions: dict = field(default_factory=library_versions, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("at least one window is needed")
        if not 16 <= self.size <= 2048:
            raise ValueError(f"size must be between 16 and 2048 pixels, got {self.size}")
        if not 1 <= self.shard_slices <= 4096:
            raise ValueError(f"shard_slices must be between 1 and 4096, got {self.shard_slices}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.compressor!r}; choose one of {', '.join(COMPRESSORS)}")
        top = 22 if self.compressor == "zstd" else 9
        if not 1 <= self.compression_level <= top:
            raise ValueError(f"{self.compressor} compression level must be 1..{top}, got {self.compression_level}")

    @property
    def channels(self) -> int:
        return len(self.windows)

    def apply(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """HU image -> the (C, size, size) uint8 image this spec caches (written into ``out`` if given)."""
        return preprocess(hu, self.windows, self.size, out=out)

    def key(self) -> dict:
        """The fields that decide the image bytes a model sees."""
        return {
            "format_version": FORMAT_VERSION,
            "windows": [w.to_dict() for w in self.windows],
            "size": self.size,
            "interpolation": "INTER_AREA",
            "pipeline": list(PIPELINE),
            "quirk_fixes": list(QUIRK_FIXES),
        }

    def to_attrs(self) -> dict:
        return {
            **self.key(),
            "layout": {
                "array": "images",
                "axes": list(AXES),
                "chunk_slices": 1,
                "shard_slices": self.shard_slices,
                "compressor": self.compressor,
                "compression_level": self.compression_level,
            },
            "versions": dict(self.versions),
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> PreprocessSpec:
        """The spec of a store's (or a checkpoint's) attributes, of the current format or an older one."""
        check_format(attrs.get("format_version"))
        layout = attrs["layout"]
        return cls(
            windows=tuple(Window(**w) for w in attrs["windows"]),
            size=int(attrs["size"]),
            shard_slices=int(layout["shard_slices"]),
            compressor=layout["compressor"],
            compression_level=int(layout["compression_level"]),
            versions=dict(attrs.get("versions", {})),
        )

    def describe_mismatch(self, other: PreprocessSpec) -> str | None:
        """None when compatible, else which fields differ (for error messages)."""
        mine, theirs = self.key(), other.key()
        diffs = [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]
        return "; ".join(diffs) or None


def check_format(found) -> None:
    """Refuse a format version this ichkit cannot read (a newer ichkit's, or no ichkit's)."""
    if found == FORMAT_VERSION or found in OLDER_FORMATS:
        return
    readable = ", ".join(map(str, sorted([*OLDER_FORMATS, FORMAT_VERSION])))
    if isinstance(found, int) and found > FORMAT_VERSION:
        raise ValueError(
            f"store format version {found} is newer than this ichkit reads ({readable}); "
            "update ichkit (pip install -U ichkit)"
        )
    raise ValueError(
        f"store format version {found!r} is not one this ichkit reads ({readable}); reconvert with this ichkit version"
    )


def warn_if_outdated(attrs: dict, where: str) -> None:
    """Log what a store of an older format lacks and the command that adds it (once per ``open_store``)."""
    found = attrs.get("format_version")
    if found in OLDER_FORMATS:
        logger.warning(
            "%s is store format %s, which lacks %s; its pixels are the same. Bring it to format %d "
            "with `ichprep upgrade %s` (rewrites metadata only)",
            where,
            found,
            OLDER_FORMATS[found],
            FORMAT_VERSION,
            where,
        )
