"""How much of one file ichprep will read: every size limit, stated once.

A CT slice is about half a megabyte (a 512x512 int16 frame and its header) and deflates a few times; a NIfTI
volume is a few hundred of them.  A file, zip member or object that declares far more, or a zip member that
declares a ratio no CT image reaches, is rejected from its declared sizes before a byte of it is read
(``too_large``, ``suspicious_ratio``); a zip member is inflated to at most its declared size plus a margin,
and one whose data run past it is rejected (``size_mismatch``).  So a hostile archive costs each worker at
most one limit's worth of memory and time per file, never a stall.

The limits travel with the :class:`~ichprep.reading.source.Source` to every worker; ``ichprep scan`` and
``ichprep convert`` set them with ``--max-file-mb``, ``--max-volume-mb`` and ``--max-ratio``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SuspiciousRatioError, TooLargeError

MIB = 1 << 20
#: The most a header read takes of a file whose header the plain walk cannot read in its first bytes.
HEADER_BYTES = 4 * MIB
#: A zip member is inflated to at most its declared size plus this: one byte past it proves the header wrong.
INFLATE_MARGIN = 64 << 10
#: Members declaring fewer bytes than this pass at any ratio: a blank 1024x1024 slice deflates ~1000:1 and is harmless.
RATIO_FLOOR_BYTES = 2 * MIB
_VOLUME_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ReadLimits:
    """The largest file ichprep reads, and the highest compression ratio it believes.

    Attributes
    ----------
    max_file_bytes : int
        A DICOM file, zip member or object (64 MiB: a 4096x4096 uint16 frame is 32 MiB).
    max_volume_bytes : int
        A NIfTI volume's voxel data, inflated (1 GiB: 1000 slices of 512x512 int16 are 500 MiB).
    max_ratio : float
        Declared inflated bytes per compressed byte, for members of at least :data:`RATIO_FLOOR_BYTES`.
    """

    max_file_bytes: int = 64 * MIB
    max_volume_bytes: int = 1024 * MIB
    max_ratio: float = 100.0

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_volume_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < MIB:
                raise ValueError(f"{name} must be at least 1 MiB ({MIB} bytes), not {value!r}")
        if not (isinstance(self.max_ratio, int | float) and math.isfinite(self.max_ratio) and self.max_ratio > 1):
            raise ValueError(f"max_ratio must be a finite number above 1, not {self.max_ratio!r}")

    @classmethod
    def from_mib(cls, *, max_file_mb: float, max_volume_mb: float, max_ratio: float) -> ReadLimits:
        """Limits given in MiB, as the CLI's options are."""
        return cls(int(max_file_mb * MIB), int(max_volume_mb * MIB), float(max_ratio))

    def check_file(self, path: str, size: int | None, stored: int | None = None) -> None:
        """Refuse a file (a volume by its suffix) of ``size`` bytes, stored in ``stored`` bytes, before reading it.

        ``size`` None (not known before reading) passes; ``stored`` is a zip member's compressed size.
        """
        if size is None:
            return
        volume = str(path).lower().endswith(_VOLUME_SUFFIXES)
        limit, option = (self.max_volume_bytes, "--max-volume-mb") if volume else (self.max_file_bytes, "--max-file-mb")
        kind = "volume" if volume else "member" if stored is not None else "file"
        self._bound(path, f"{kind} too large: it declares {_mib(size)}", size, (limit, option), stored)

    def check_volume(self, path: str, nbytes: int, stored: int | None) -> None:
        """Refuse a NIfTI volume whose header announces ``nbytes`` of voxels, from a file of ``stored`` bytes."""
        announced = f"volume too large: its header announces {_mib(nbytes)} of voxels"
        self._bound(path, announced, nbytes, (self.max_volume_bytes, "--max-volume-mb"), stored)

    def _bound(self, path: str, what: str, size: int, limit: tuple[int, str], stored: int | None) -> None:
        """``size`` against ``limit`` (bytes, the option that raises it), then its ratio to ``stored``."""
        if size > limit[0]:
            raise TooLargeError(
                path, f"{what}, over the {_mib(limit[0])} limit (not read; raise {limit[1]} if it is a real image)"
            )
        if stored is not None:
            self.check_ratio(path, size, stored)

    def check_ratio(self, path: str, size: int, stored: int) -> None:
        """Refuse ``size`` inflated bytes from ``stored`` compressed ones at a ratio above ``max_ratio``."""
        if size < RATIO_FLOOR_BYTES:
            return
        ratio = size / max(stored, 1)
        if ratio > self.max_ratio:
            raise SuspiciousRatioError(
                path,
                f"suspicious compression ratio: {_mib(size)} from {stored} bytes is {ratio:.0f}:1, above "
                f"{self.max_ratio:g}:1 (CT deflates a few times at most; not read; raise --max-ratio if it is a "
                "real image)",
            )


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"
