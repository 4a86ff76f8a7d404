"""Errors raised by ichprep.

Every error subclasses :class:`IchprepError` and a built-in (``ValueError``,
``FileNotFoundError``, ...) so callers can catch either the package's own
type or the usual Python one.  Errors about one DICOM file carry the file
and a short machine-readable ``reason`` that ends up in ``rejected.csv``.
"""

from __future__ import annotations

from pathlib import Path


class IchprepError(Exception):
    """Base class of every error ichprep raises on purpose."""


class DicomReadError(IchprepError, ValueError):
    """A DICOM file could not be read; ``reason`` says why in one word."""

    reason = "unreadable"

    def __init__(self, path: str | Path, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.path}: {self.reason}: {detail}")


class NotDicomError(DicomReadError):
    reason = "not_dicom"


class EmptyFileError(DicomReadError):
    reason = "empty_file"


class UnreadableFileError(DicomReadError):
    """The file exists but cannot be opened (permission denied, symlink loop, I/O error)."""

    reason = "unreadable_file"


class TruncatedFileError(DicomReadError):
    reason = "truncated"


class MissingTagError(DicomReadError):
    reason = "missing_tag"


class InvalidHeaderError(DicomReadError):
    reason = "bad_header"


class NoPixelDataError(DicomReadError):
    reason = "no_pixel_data"


class UnsupportedImageError(DicomReadError):
    """The pixels are not one monochrome frame (RGB, multi-frame, ...)."""

    reason = "unsupported_image"


class UnsupportedTransferSyntaxError(DicomReadError):
    reason = "unsupported_syntax"


class PixelDecodeError(DicomReadError):
    reason = "pixel_decode"


class ZipMemberError(DicomReadError):
    """A zip member is damaged (CRC-32 mismatch, no local header, does not inflate) or cannot be read."""

    reason = "bad_zip_member"


class TooLargeError(DicomReadError):
    """A file or zip member declares more bytes than :class:`ichprep.reading.limits.ReadLimits` allows."""

    reason = "too_large"


class SuspiciousRatioError(DicomReadError):
    """A zip member or gzip volume declares far more inflated bytes than a CT image compresses to."""

    reason = "suspicious_ratio"


class SizeMismatchError(DicomReadError):
    """A zip member's data inflate past the size its header declares (a damaged or hostile zip)."""

    reason = "size_mismatch"


class HeaderTooLongError(DicomReadError):
    """No pixel data element within the bytes a header read takes (:data:`ichprep.reading.limits.HEADER_BYTES`)."""

    reason = "header_too_long"


class SourceError(IchprepError, FileNotFoundError):
    """A SOURCE (folder, zip, URL) does not exist or cannot be listed; the message says which part."""


class LabelsError(IchprepError, ValueError):
    """The label CSV is malformed; the message names the line."""


class WindowSpecError(IchprepError, ValueError):
    """A ``--window`` value is neither a preset name nor NAME:CENTER:WIDTH."""


class StoreError(IchprepError, ValueError):
    """A path is not an ichkit store, or the store is incomplete or inconsistent."""


class DamagedStoreError(StoreError):
    """A store's shard files do not match its manifest (missing, cut, altered); the message lists them and the fix."""


class DamagedShardError(StoreError):
    """A shard file that should exist is absent or does not decode, found while reading it.

    Built from one message string, so a DataLoader worker's error is raised again in the main process as this type.
    """


def repair_hint(root) -> str:
    """What to do about a store file that is missing, cut, altered or does not read."""
    return (
        f"run `ichprep verify {root}` to check every file by its sha256, then rerun the same `ichprep convert` "
        "(it rewrites every shard that does not match its record) or fetch the files again"
    )


class StoreExistsError(IchprepError, FileExistsError):
    """The output store exists and was made with other inputs or options."""


class StoreLockedError(IchprepError, RuntimeError):
    """Another converter is writing this store right now."""


class ScanTableError(IchprepError, ValueError):
    """A file given as a scan table was not written by ``ichprep scan``."""
