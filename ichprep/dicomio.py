"""Reading one DICOM slice: header fields, and pixels as Hounsfield units.

Two entry points, both raising :class:`~ichprep.errors.DicomReadError`
subclasses (never a bare ``KeyError``/``AttributeError``) that name the file:

* :func:`read_header` reads the header only (no pixel decode) for the scan.
* :func:`read_slice` reads header and pixels and returns HU as float32.

HU conversion (:func:`to_hu`) is a pure function of the stored pixels and
four header values, including the RSNA 12-bit wrap-around fix.

Speed: plain files (every RSNA file) are walked by :mod:`ichprep.plainread`
instead of ``pydicom.dcmread`` (0.03 vs 0.18 ms), and header values are read
from the raw element bytes (:func:`_values`) instead of pydicom's per-element
conversion (~10 µs each).  Whatever is not plain goes through pydicom.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import scratch
from .errors import (
    DicomReadError,
    EmptyFileError,
    InvalidHeaderError,
    MissingTagError,
    NoPixelDataError,
    NotDicomError,
    PixelDecodeError,
    TruncatedFileError,
    UnreadableFileError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from .plainread import NotPlain, parse, read_plain

logger = logging.getLogger(__name__)

#: What pydicom raises on malformed bytes while parsing values (found by fuzzing; see tests/test_hostile.py).
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeError, OverflowError,
                 NotImplementedError, RecursionError, MemoryError, BytesLengthException)

#: Pixel data elements; any of them makes an image.
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class SliceHeader:
    """The header fields ichkit uses, one per scan row."""

    image_id: str
    path: str
    study_uid: str
    series_uid: str
    patient_id: str | None
    sop_uid: str | None
    modality: str | None
    z: float | None
    instance_number: int | None
    rows: int | None
    cols: int | None
    pixel_spacing_row: float | None
    pixel_spacing_col: float | None
    slope: float
    intercept: float
    bits_stored: int | None
    pixel_representation: int | None
    samples_per_pixel: int
    n_frames: int
    transfer_syntax: str | None
    window_center: float | None
    window_width: float | None
    has_pixels: bool

    def to_row(self) -> dict:
        return asdict(self)

    @property
    def wrap12(self) -> bool:
        return needs_wrap_fix(self.bits_stored, self.pixel_representation, self.intercept)


def image_id_of(path: str | Path) -> str:
    """The Kaggle image id is the file name without ``.dcm`` (not a header field)."""
    name = Path(path).name
    return name[: -len(".dcm")] if name.lower().endswith(".dcm") else name


def first_value(value):
    """First item of a multi-valued element (WindowCenter is sometimes ``[40, 40]``)."""
    if isinstance(value, (MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def _number(value, kind=float):
    value = first_value(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    result = kind(value)
    if kind is float and not math.isfinite(result):
        raise ValueError(f"non-finite number {value!r}")
    return result


def _text(value) -> str | None:
    value = first_value(value)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


#: The elements ichkit reads, with the VR the standard gives them: tag and VR let :func:`_values`
#: read them from the raw bytes of an implicit or explicit VR little endian file.
_ELEMENTS = {keyword: (tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword))) for keyword in (
    "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "InstanceNumber", "ImagePositionPatient", "SamplesPerPixel", "NumberOfFrames", "Rows", "Columns",
    "PixelSpacing", "BitsAllocated", "BitsStored", "PixelRepresentation", "WindowCenter", "WindowWidth",
    "RescaleIntercept", "RescaleSlope",
)}
_TEXT_VRS = frozenset({"UI", "CS", "LO", "SH", "DS", "IS"})


def _values(ds: pydicom.Dataset, keyword: str, raw_ok: bool = True) -> list:
    """All values of one element as a list ([] when absent or empty).

    pydicom converts each element on first access (~10 µs each, half the cost of a header read); the
    plain cases (little endian, the standard VR, ASCII text or uint16) are read here straight from the
    raw bytes: text values come back as stripped ``str``, US values as ``int``, which is what the
    callers then convert.  Anything else (big endian, another VR, non-ASCII text, an element pydicom
    already converted) goes through pydicom's own conversion.
    """
    tag, vr = _ELEMENTS[keyword]
    elem = ds.get_item(tag)
    if elem is None:
        return []
    if raw_ok and isinstance(elem, RawDataElement) and elem.is_little_endian and elem.VR in (vr, None):
        raw = elem.value
        if isinstance(raw, bytes):  # None for a deferred value, which pydicom reads below
            if vr in _TEXT_VRS and raw.isascii():
                return [v.strip(" \x00") for v in raw.decode("ascii").split("\\")] if raw.strip(b" \x00") else []
            if vr == "US" and len(raw) % 2 == 0:
                return list(struct.unpack(f"<{len(raw) // 2}H", raw))
    value = ds[tag].value
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def _first(ds: pydicom.Dataset, keyword: str, kind=None):
    """First value of an element: text (``kind=None``), or a number via :func:`_number`."""
    values = _values(ds, keyword)
    if not values:
        return None
    if kind is int and isinstance(values[0], str) and not values[0].lstrip("+-").isdigit():
        values = _values(ds, keyword, raw_ok=False)  # e.g. IS "2.0": pydicom's own rules decide
    return _text(values[0]) if kind is None else _number(values[0], kind)


def needs_wrap_fix(bits_stored: int | None, pixel_representation: int | None, intercept: float) -> bool:
    """True for the RSNA slices whose 12-bit unsigned values wrap around (intercept > -100)."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


def to_hu(
    pixels: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    bits_stored: int | None = None,
    pixel_representation: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stored pixel values -> Hounsfield units (float32), same shape (written into ``out`` if given).

    HU = x * slope + intercept, where for the RSNA wrap-around slices (12 bits
    stored, unsigned, intercept > -100) ``x = (pixels + 1000) mod 4096`` and the
    intercept becomes -1000: those files store HU modulo 4096.
    """
    hu = np.empty(pixels.shape, np.float32) if out is None else out
    hu[...] = pixels  # integers below 2^24: exact in float32
    if needs_wrap_fix(bits_stored, pixel_representation, intercept):
        hu += np.float32(1000)
        np.subtract(hu, np.float32(4096), out=hu, where=hu >= 4096)
        intercept = -1000.0
    if slope != 1:
        hu *= np.float32(slope)
    if intercept != 0:
        hu += np.float32(intercept)
    return hu


#: Little-endian tags of the pixel data elements, as they appear in the file.
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")


def _dcmread(fp, stop_before_pixels: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # No 128-byte preamble + "DICM": a raw dataset (seen in the wild) still
        # reads with force=True; _header() then insists on the tags we need.
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:
            # pydicom detected the encoding while parsing; record it so pixels can decode.
            implicit, little = ds.original_encoding
            if little:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        return ds


def _open(path: str | Path, stop_before_pixels: bool, data: bytes | None = None) -> tuple[pydicom.Dataset, bool]:
    """dcmread with every failure mapped to a DicomReadError naming the file.

    Returns the dataset and whether the file holds a pixel data element (a
    header-only read stops just before it, so we peek at the next tag).
    ``data`` is the file's content where it does not lie on a local disk (a zip member, an object).
    """
    try:
        fp = open(path, "rb") if data is None else io.BytesIO(data)
    except FileNotFoundError:
        raise
    except IsADirectoryError as exc:
        raise NotDicomError(path, "is a directory") from exc
    except OSError as exc:  # permission denied, symlink loop, I/O error, ...
        raise UnreadableFileError(path, f"cannot open: {exc.strerror or exc}") from exc
    try:
        with fp:
            if (len(data) if data is not None else os.fstat(fp.fileno()).st_size) == 0:
                raise EmptyFileError(path, "the file has 0 bytes")
            ds = _dcmread(fp, stop_before_pixels)
            if stop_before_pixels:
                has_pixels = fp.read(4) in _PIXEL_TAG_BYTES
            else:
                has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
            return ds, has_pixels
    except DicomReadError:
        raise
    except (EOFError, struct.error) as exc:
        raise TruncatedFileError(path, f"file ends inside the header ({exc})") from exc
    except InvalidDicomError as exc:
        raise NotDicomError(path, str(exc)) from exc
    except (*_PARSE_ERRORS, OSError) as exc:
        raise InvalidHeaderError(path, f"header does not parse: {exc}") from exc


def _header(ds: pydicom.Dataset, has_pixels: bool, path: str | Path) -> SliceHeader:
    """Pull the fields we use out of a dataset; pydicom parses values lazily, so errors surface here."""
    try:
        study_uid = _first(ds, "StudyInstanceUID")
        if study_uid is None:
            if len(ds) == 0 and ds.get("file_meta") is not None and len(ds.file_meta):
                raise TruncatedFileError(path, "file ends right after its file meta information")
            if len(ds) == 0 or "SOPClassUID" not in ds and "Modality" not in ds:
                raise NotDicomError(path, "no DICOM data elements found")
            # Elements are stored in tag order: if the last one read comes before (0020,000D) and no
            # pixel data follows, the file stopped early rather than lacking the tag.
            if not has_pixels and max(ds.keys()) < 0x0020000D:
                raise TruncatedFileError(path, f"file ends at element {max(ds.keys())}, before StudyInstanceUID")
            raise MissingTagError(path, "StudyInstanceUID is missing; slices cannot be grouped into studies")
        position = _values(ds, "ImagePositionPatient")
        spacing = _values(ds, "PixelSpacing")
        if len(spacing) == 1:
            spacing = spacing * 2
        slope = _first(ds, "RescaleSlope", float)
        intercept = _first(ds, "RescaleIntercept", float)
        file_meta = getattr(ds, "file_meta", None)
        return SliceHeader(
            image_id=image_id_of(path),
            path=str(path),
            study_uid=study_uid,
            series_uid=_first(ds, "SeriesInstanceUID") or study_uid,
            patient_id=_first(ds, "PatientID"),
            sop_uid=_first(ds, "SOPInstanceUID"),
            modality=_first(ds, "Modality"),
            z=_number(position[2]) if len(position) >= 3 else None,
            instance_number=_first(ds, "InstanceNumber", int),
            rows=_first(ds, "Rows", int),
            cols=_first(ds, "Columns", int),
            pixel_spacing_row=_number(spacing[0]) if len(spacing) > 0 else None,
            pixel_spacing_col=_number(spacing[1]) if len(spacing) > 1 else None,
            slope=1.0 if slope is None or slope == 0 else slope,
            intercept=0.0 if intercept is None else intercept,
            bits_stored=_first(ds, "BitsStored", int),
            pixel_representation=_first(ds, "PixelRepresentation", int),
            samples_per_pixel=_first(ds, "SamplesPerPixel", int) or 1,
            n_frames=_first(ds, "NumberOfFrames", int) or 1,
            transfer_syntax=_text(file_meta.get("TransferSyntaxUID")) if file_meta is not None else None,
            window_center=_first(ds, "WindowCenter", float),
            window_width=_first(ds, "WindowWidth", float),
            has_pixels=has_pixels,
        )
    except DicomReadError:
        raise
    except (EOFError, struct.error, OSError) as exc:
        # pydicom parses values lazily; a value cut off by the end of the file fails here.
        raise TruncatedFileError(path, f"file ends inside the header ({exc})") from exc
    except _PARSE_ERRORS as exc:
        raise InvalidHeaderError(path, f"bad header value: {exc}") from exc


def _read(path: str | Path, want_pixels: bool, reuse: bool, finish, data: bytes | None = None):
    """``finish(dataset, has_pixels)`` on the plain walk of the file; on pydicom's reading where the walk
    declines or anything fails on it (pydicom then words the error)."""
    if data is None:
        plain = read_plain(path, want_pixels=want_pixels, reuse=reuse)
    else:
        plain = parse(data, want_pixels)
    if plain is not None:
        try:
            return finish(plain, plain.has_pixels)
        except (NotPlain, DicomReadError):
            pass
    return finish(*_open(path, stop_before_pixels=not want_pixels, data=data))


def read_header(path: str | Path, data: bytes | None = None) -> SliceHeader:
    """Header fields of one file, without decoding pixels.

    ``data``: the file's bytes where they do not lie at ``path`` on a local disk (``path`` then only
    names the file); a prefix holding the whole header is enough.
    """
    return _read(path, False, False, lambda ds, has_pixels: _header(ds, has_pixels, path), data)


def check_slice(header: SliceHeader) -> None:
    """Raise unless the header describes one monochrome CT frame the cache can hold."""
    path = header.path
    if header.modality is not None and header.modality.upper() != "CT":
        raise UnsupportedImageError(path, f"modality {header.modality!r} is not CT")
    if not header.has_pixels:
        raise NoPixelDataError(path, "the file has no PixelData element")
    if header.samples_per_pixel != 1:
        raise UnsupportedImageError(path, f"{header.samples_per_pixel} samples per pixel (colour); a CT slice has 1")
    if header.n_frames != 1:
        raise UnsupportedImageError(path, f"{header.n_frames} frames; a CT slice has 1")
    if not header.rows or not header.cols:
        raise MissingTagError(path, "Rows/Columns are missing or zero")


_PIXEL_DATA = 0x7FE00010
_NATIVE_LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


def _native_pixels(ds: pydicom.Dataset, header: SliceHeader) -> np.ndarray | None:
    """Uncompressed 16-bit pixels straight from the bytes (pydicom's pixel_array adds ~0.15 ms/slice).

    Only where the result is certainly what pixel_array gives: little endian, 16 bits allocated, one
    frame and sample, and no sign extension or masking to do. Anything else returns None.
    """
    if header.transfer_syntax not in _NATIVE_LITTLE_ENDIAN or _first(ds, "BitsAllocated", int) != 16:
        return None
    data = ds.get_item(_PIXEL_DATA)
    data = data.value if data is not None else None
    n = header.rows * header.cols
    if not isinstance(data, (bytes, memoryview)) or len(data) < 2 * n:
        return None  # pixel_array raises the precise error
    signed = header.pixel_representation == 1
    if signed and header.bits_stored != 16:
        return None  # pixel_array sign-extends from BitsStored
    pixels = np.frombuffer(data, "<i2" if signed else "<u2", count=n).reshape(header.rows, header.cols)
    if not signed and header.bits_stored is not None and header.bits_stored < 16 and pixels.max() >> header.bits_stored:
        return None  # bits above BitsStored are set: leave them to pixel_array
    return pixels


def _decode(ds: pydicom.Dataset, header: SliceHeader) -> np.ndarray:
    path = header.path
    pixels = _native_pixels(ds, header)
    if pixels is not None:
        return pixels
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        if "plugin" in str(exc).lower() or "decod" in str(exc).lower() or isinstance(exc, NotImplementedError):
            raise UnsupportedTransferSyntaxError(
                path, f"cannot decode transfer syntax {header.transfer_syntax}: {exc}"
            ) from exc
        raise PixelDecodeError(path, str(exc)) from exc
    except (EOFError, struct.error) as exc:
        raise TruncatedFileError(path, f"pixel data is truncated ({exc})") from exc
    except (*_PARSE_ERRORS, OSError) as exc:
        message = str(exc)
        if "less than expected" in message or "truncat" in message or "insufficient" in message.lower():
            raise TruncatedFileError(path, f"pixel data is truncated: {message}") from exc
        raise PixelDecodeError(path, message) from exc
    if pixels.shape != (header.rows, header.cols):
        raise UnsupportedImageError(path, f"decoded pixels have shape {pixels.shape}, expected ({header.rows}, {header.cols})")
    return pixels


def read_slice(path: str | Path, reuse: bool = False, data: bytes | None = None) -> tuple[SliceHeader, np.ndarray]:
    """Header and HU pixels (float32, shape (rows, cols)) of one single-frame CT slice.

    Plain files (every RSNA file) are walked by :mod:`ichprep.plainread`; anything else, and any file
    that fails there, is read with pydicom, which then words the error.  With ``reuse`` the file and
    the HU image live in this thread's scratch buffers (:mod:`ichprep.scratch`): the returned image is
    then valid only until the next ``read_slice(..., reuse=True)`` in this thread (the converter's loop).
    ``data``: the whole file's bytes where they do not lie at ``path`` on a local disk (a zip member).
    """
    return _read(path, True, reuse, lambda ds, has_pixels: _slice(ds, has_pixels, path, reuse), data)


def _slice(ds, has_pixels: bool, path: str | Path, reuse: bool = False) -> tuple[SliceHeader, np.ndarray]:
    header = _header(ds, has_pixels, path)
    check_slice(header)
    pixels = _decode(ds, header)
    out = scratch.array("hu", pixels.shape, np.float32) if reuse else None
    hu = to_hu(pixels, header.slope, header.intercept, header.bits_stored, header.pixel_representation, out=out)
    return header, hu
