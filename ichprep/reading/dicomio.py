"""Reading one DICOM slice: header fields, and pixels as Hounsfield units.

Two entry points, both raising :class:`~ichprep.errors.DicomReadError`
subclasses (never a bare ``KeyError``/``AttributeError``) that name the file:

* :func:`read_header` reads the header only (no pixel decode) for the scan.
* :func:`read_slice` reads header and pixels and returns HU as float32.

A read is one straight line: :func:`_dataset` picks the reader once (ichkit's own walk,
:mod:`ichprep.reading.plainread`, for plain files such as every RSNA file; ``pydicom.dcmread`` for the
rest), then :func:`_header`, :func:`check_slice`, :func:`_pixels` and :func:`to_hu`.  Errors are
classified by exception type and by facts checked before decoding (no decoder for the transfer
syntax, uncompressed pixel data shorter than the header says), never by an exception's text.

HU conversion (:func:`to_hu`) is a pure function of the stored pixels and
four header values, including the RSNA 12-bit wrap-around fix.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .. import scratch
from ..errors import (
    DicomReadError,
    EmptyFileError,
    HeaderTooLongError,
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
from .limits import HEADER_BYTES
from .plainread import PlainDataset, parse, read_plain

logger = logging.getLogger(__name__)

#: What pydicom raises on malformed bytes while parsing values (found by fuzzing; see tests/prep/test_hostile.py).
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    UnicodeError,
    OverflowError,
    NotImplementedError,
    RecursionError,
    MemoryError,
    BytesLengthException,
)

#: Pixel data elements; any of them makes an image.
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Little-endian tags of the pixel data elements, as they appear in the file.
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
_PIXEL_DATA = 0x7FE00010
_NATIVE_LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
#: BitsAllocated values pydicom accepts (1 or a multiple of 8 up to 64); it refuses any other itself.
_VALID_BITS_ALLOCATED = frozenset({1, *range(8, 65, 8)})

#: Either reader's dataset: both answer get_item, in, len, keys, file_meta, ds[tag] and pixel_array.
AnyDataset = PlainDataset | pydicom.Dataset


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
    # What choosing a series needs (ichprep.reading.series): one value per file, joined with "\\" where multi-valued.
    sop_class_uid: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    image_type: str | None = None
    kernel: str | None = None
    contrast: str | None = None
    slice_thickness: float | None = None
    normal_x: float | None = None
    normal_y: float | None = None
    normal_z: float | None = None
    position: float | None = None  # ImagePositionPatient projected on the slice normal (z where no orientation)

    def to_row(self) -> dict:
        return dict(self.__dict__)  # the fields, flat: asdict's recursive copy costs more than the rest of a scan row

    @property
    def wrap12(self) -> bool:
        return needs_wrap_fix(self.bits_stored, self.pixel_representation, self.intercept)


class Slice(NamedTuple):
    """One slice as :func:`read_slice` returns it."""

    header: SliceHeader
    hu: np.ndarray  # float32, (rows, cols)


class Opened(NamedTuple):
    """A file's dataset, from whichever reader read it, and whether the file holds a pixel data element."""

    dataset: AnyDataset
    has_pixels: bool


def read_header(path: str | Path, data: bytes | None = None) -> SliceHeader:
    """Header fields of one file, without decoding pixels.

    Parameters
    ----------
    path : str | Path
        The file; where ``data`` is given, only its name (the image id and error messages use it).
    data : bytes, optional
        The file's bytes where they do not lie at ``path`` on a local disk (a zip member, an
        object); a prefix holding the whole header is enough.

    Returns
    -------
    SliceHeader
        The fields ichkit uses; ``has_pixels`` says whether a pixel data element follows.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (and no ``data`` is given).
    DicomReadError
        A subclass naming the file and the reason: empty, unreadable, not DICOM, truncated,
        a bad header value, or no StudyInstanceUID.
    """
    ds, has_pixels = _dataset(path, want_pixels=False, data=data)
    return _header(ds, has_pixels, path)


def read_slice(path: str | Path, reuse: bool = False, data: bytes | None = None) -> Slice:
    """Header and HU pixels of one single-frame CT slice.

    Parameters
    ----------
    path : str | Path
        The file; where ``data`` is given, only its name (the image id and error messages use it).
    reuse : bool, optional
        Read the file into, and write HU into, this thread's scratch buffers
        (:mod:`ichprep.scratch`): the returned image is then valid only until the next
        ``read_slice(..., reuse=True)`` in this thread (the converter's loop).
    data : bytes, optional
        The whole file's bytes where they do not lie at ``path`` on a local disk (a zip member).

    Returns
    -------
    Slice
        ``(header, hu)``: the :class:`SliceHeader` and the HU image, float32 of shape (rows, cols).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (and no ``data`` is given).
    DicomReadError
        A subclass naming the file and the reason: any of :func:`read_header`'s, not one
        monochrome CT frame, no pixel data, a transfer syntax without a decoder, truncated
        pixel data, or pixels that do not decode.
    """
    ds, has_pixels = _dataset(path, want_pixels=True, reuse=reuse, data=data)
    return _slice(ds, has_pixels, path, reuse=reuse)


def _slice(ds: AnyDataset, has_pixels: bool, path: str | Path, reuse: bool = False) -> Slice:
    """Header, then pixels, then HU, from an opened dataset."""
    header = _header(ds, has_pixels, path)
    check_slice(header)
    pixels = _pixels(ds, header)
    out = scratch.array("hu", pixels.shape, np.float32) if reuse else None
    hu = to_hu(pixels, header.slope, header.intercept, header.bits_stored, header.pixel_representation, out=out)
    return Slice(header, hu)


def _dataset(path: str | Path, *, want_pixels: bool, reuse: bool = False, data: bytes | None = None) -> Opened:
    """The one place that picks the reader: ichkit's plain walk where the file is plain, else pydicom.

    The walk reads a plain file exactly as pydicom would (tests/prep/reading/test_plainread.py), so the choice
    never changes a result; whatever is not plain (compressed, big endian, no preamble, damaged)
    is pydicom's to read and to word the error for.
    """
    if data is None:
        plain = read_plain(path, want_pixels=want_pixels, reuse=reuse)
    else:
        plain = parse(data, want_pixels=want_pixels)
    if plain is not None:
        return Opened(plain, plain.has_pixels)
    return _open(path, stop_before_pixels=not want_pixels, data=data)


def _open(path: str | Path, stop_before_pixels: bool, data: bytes | None = None) -> Opened:
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
    size = 0
    try:
        with fp:
            size = len(data) if data is not None else os.fstat(fp.fileno()).st_size
            if size == 0:
                raise EmptyFileError(path, "the file has 0 bytes")
            stream = io.BytesIO(fp.read(HEADER_BYTES)) if stop_before_pixels and data is None else fp
            ds = _dcmread(stream, stop_before_pixels)
            if stop_before_pixels:
                has_pixels = stream.read(4) in _PIXEL_TAG_BYTES
                if not has_pixels and size >= HEADER_BYTES:  # a header read parses at most HEADER_BYTES
                    raise _too_long(path, "")
            else:
                has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
            return Opened(ds, has_pixels)
    except DicomReadError:
        raise
    except (EOFError, struct.error) as exc:
        if stop_before_pixels and size >= HEADER_BYTES:
            raise _too_long(path, f" ({exc})") from exc
        raise TruncatedFileError(path, f"file ends inside the header ({exc})") from exc
    except InvalidDicomError as exc:
        raise NotDicomError(path, str(exc)) from exc
    except (*_PARSE_ERRORS, OSError) as exc:
        raise InvalidHeaderError(path, f"header does not parse: {exc}") from exc


def _too_long(path: str | Path, why: str) -> HeaderTooLongError:
    reads = f"no pixel data within the first {HEADER_BYTES} bytes, which a header read takes"
    return HeaderTooLongError(path, reads + why)


def _dcmread(fp, stop_before_pixels: bool) -> pydicom.Dataset:
    """dcmread; a raw dataset without the 128-byte preamble and "DICM" (seen in the wild) is read with force=True."""
    head = fp.read(132)
    part10 = head[128:132] == b"DICM"
    if not part10 and head[:4] == bytes(4):
        # Group 0 at byte 0 is no file's first element; pydicom would walk every zero-length "element" to the end.
        raise InvalidDicomError("no 'DICM' at byte 128 and zeros where a raw dataset's first tag would be")
    fp.seek(0)
    ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=not part10)
    if not part10 and "TransferSyntaxUID" not in ds.file_meta:
        # pydicom detected the encoding while parsing; record it so pixels can decode.
        implicit, little = ds.original_encoding
        if little:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _header(ds: AnyDataset, has_pixels: bool, path: str | Path) -> SliceHeader:
    """Pull the fields we use out of a dataset; values are converted here, so their errors surface here."""
    try:
        study_uid = _first(ds, "StudyInstanceUID")
        if study_uid is None:
            raise _no_study_error(ds, has_pixels, path)
        position = _values(ds, "ImagePositionPatient")
        spacing = _values(ds, "PixelSpacing")
        if len(spacing) == 1:
            spacing = spacing * 2
        slope = _first(ds, "RescaleSlope", float)
        intercept = _first(ds, "RescaleIntercept", float)
        file_meta = getattr(ds, "file_meta", None)
        xyz = _vector(position, 3)
        normal = slice_normal(_vector(_values(ds, "ImageOrientationPatient"), 6) or [])
        return SliceHeader(
            image_id=image_id_of(path),
            path=str(path),
            study_uid=study_uid,
            series_uid=_first(ds, "SeriesInstanceUID") or study_uid,
            patient_id=_first(ds, "PatientID"),
            sop_uid=_first(ds, "SOPInstanceUID"),
            modality=_first(ds, "Modality"),
            z=xyz[2] if xyz is not None else None,
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
            sop_class_uid=_first(ds, "SOPClassUID"),
            series_number=_first(ds, "SeriesNumber", int),
            series_description=_first(ds, "SeriesDescription"),
            image_type=_joined(ds, "ImageType"),
            kernel=_joined(ds, "ConvolutionKernel"),
            contrast=_first(ds, "ContrastBolusAgent"),
            slice_thickness=_first(ds, "SliceThickness", float),
            normal_x=normal[0] if normal is not None else None,
            normal_y=normal[1] if normal is not None else None,
            normal_z=normal[2] if normal is not None else None,
            position=project(xyz, normal),
        )
    except DicomReadError:
        raise
    except (EOFError, struct.error, OSError) as exc:
        # pydicom reads a deferred value on first access; one cut off by the end of the file fails here.
        raise TruncatedFileError(path, f"file ends inside the header ({exc})") from exc
    except _PARSE_ERRORS as exc:
        raise InvalidHeaderError(path, f"bad header value: {exc}") from exc


def _no_study_error(ds: AnyDataset, has_pixels: bool, path: str | Path) -> DicomReadError:
    """Why a dataset has no StudyInstanceUID: a file cut short, not DICOM at all, or the tag is missing."""
    file_meta = getattr(ds, "file_meta", None)
    if len(ds) == 0 and file_meta is not None and len(file_meta):
        return TruncatedFileError(path, "file ends right after its file meta information")
    if len(ds) == 0 or _ELEMENTS["SOPClassUID"][0] not in ds and _ELEMENTS["Modality"][0] not in ds:
        return NotDicomError(path, "no DICOM data elements found")
    # Elements are stored in tag order: if the last one read comes before (0020,000D) and no
    # pixel data follows, the file stopped early rather than lacking the tag.
    if not has_pixels and max(ds.keys()) < 0x0020000D:
        return TruncatedFileError(path, f"file ends at element {Tag(max(ds.keys()))}, before StudyInstanceUID")
    return MissingTagError(path, "StudyInstanceUID is missing; slices cannot be grouped into studies")


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


def _pixels(ds: AnyDataset, header: SliceHeader) -> np.ndarray:
    """Stored pixel values, shape (rows, cols), of a slice that passed :func:`check_slice`."""
    bits_allocated = _bits_allocated(ds, header.path)
    _check_decodable(header, bits_allocated, _pixel_data(ds, header.path))
    pixels = _native_pixels(ds, header)
    if pixels is None:
        pixels = _decode(ds, header)
    if pixels.shape != (header.rows, header.cols):
        raise UnsupportedImageError(
            header.path, f"decoded pixels have shape {pixels.shape}, expected ({header.rows}, {header.cols})"
        )
    return pixels


def _bits_allocated(ds: AnyDataset, path: str | Path) -> int | None:
    """BitsAllocated, which only the pixel step reads (a bad value is a bad header)."""
    try:
        return _first(ds, "BitsAllocated", int)
    except _PARSE_ERRORS as exc:
        raise InvalidHeaderError(path, f"bad header value: {exc}") from exc


def _pixel_data(ds: AnyDataset, path: str | Path) -> bytes | memoryview | None:
    """The PixelData element's value (None when absent or not bytes); an element that does not parse cannot decode."""
    try:
        element = ds.get_item(_PIXEL_DATA)
    except _PARSE_ERRORS as exc:  # pydicom converts a raw element with an unknown VR on access
        raise PixelDecodeError(path, f"pixel data element does not parse: {exc}") from exc
    value = element.value if element is not None else None
    return value if isinstance(value, (bytes, memoryview)) else None


def _check_decodable(header: SliceHeader, bits_allocated: int | None, pixel_data: bytes | memoryview | None) -> None:
    """Raise where facts known before decoding say the pixels cannot decode."""
    if header.transfer_syntax is None:
        return  # pydicom's decoding says what is missing
    syntax = _syntax(header.transfer_syntax)
    if syntax.unsupported is not None:
        raise UnsupportedTransferSyntaxError(
            header.path, f"cannot decode transfer syntax {header.transfer_syntax}: {syntax.unsupported}"
        )
    if syntax.native and bits_allocated in _VALID_BITS_ALLOCATED and pixel_data is not None:
        _check_length(header, bits_allocated, len(pixel_data))


class _Syntax(NamedTuple):
    """What pydicom's decoders offer one transfer syntax."""

    unsupported: str | None  # why its pixels cannot decode here; None when a decoder is available
    native: bool  # uncompressed: the header gives the pixel data's length


@functools.lru_cache(maxsize=64)  # one lookup per transfer syntax, not per slice
def _syntax(uid: str) -> _Syntax:
    decoder = _decoder(uid)
    if decoder is None:
        return _Syntax(f"pydicom has no decoder for {UID(uid).name}", native=False)
    if not decoder.is_available:
        return _Syntax(f"no decoder plugin is installed ({'; '.join(decoder.missing_dependencies)})", native=False)
    return _Syntax(None, native=decoder.is_native)


def _decoder(uid: str):
    """pydicom's pixel decoder for a transfer syntax, None where pydicom has none."""
    try:
        return get_decoder(uid)
    except NotImplementedError:  # how get_decoder says "none"; pydicom offers no public lookup
        return None


def _check_length(header: SliceHeader, bits_allocated: int, actual: int) -> None:
    """Uncompressed pixel data shorter than Rows x Columns x BitsAllocated: the file was cut short."""
    expected = -(-header.rows * header.cols * bits_allocated // 8)
    padded = expected + expected % 2  # an odd length is padded to even in the file
    if actual < padded and actual != expected:
        # Worded as pydicom words it, so rejected.csv reads the same whichever reader read the file.
        raise TruncatedFileError(
            header.path,
            (
                f"pixel data is truncated: The number of bytes of pixel data is less than expected ({actual} vs "
                f"{padded} bytes) - the dataset may be corrupted, have an invalid group 0028 element value, or the "
                "transfer syntax may be incorrect"
            ),
        )


def _native_pixels(ds: AnyDataset, header: SliceHeader) -> np.ndarray | None:
    """Uncompressed 16-bit pixels straight from the bytes, without pydicom's decoder.

    Only where the result is certainly what pixel_array gives: little endian, 16 bits allocated, one
    frame and sample, and no sign extension or masking to do. Anything else returns None.
    """
    if header.transfer_syntax not in _NATIVE_LITTLE_ENDIAN or _first(ds, "BitsAllocated", int) != 16:
        return None
    data = ds.get_item(_PIXEL_DATA)
    data = data.value if data is not None else None
    n = header.rows * header.cols
    if not isinstance(data, (bytes, memoryview)) or len(data) < 2 * n:
        return None  # pydicom's decoder words the error
    signed = header.pixel_representation == 1
    if signed and header.bits_stored != 16:
        return None  # pixel_array sign-extends from BitsStored
    pixels = np.frombuffer(data, "<i2" if signed else "<u2", count=n).reshape(header.rows, header.cols)
    if not signed and header.bits_stored is not None and header.bits_stored < 16 and pixels.max() >> header.bits_stored:
        return None  # bits above BitsStored are set: leave them to pixel_array
    return pixels


def _decode(ds: AnyDataset, header: SliceHeader) -> np.ndarray:
    """pydicom's decoding (compressed, big endian, 8 or 32 bits, sign extension), errors classified by type."""
    path = header.path
    try:
        return ds.pixel_array
    except NotImplementedError as exc:  # the decoder does not handle this kind of pixel data
        raise UnsupportedTransferSyntaxError(
            path, f"cannot decode transfer syntax {header.transfer_syntax}: {exc}"
        ) from exc
    except (EOFError, struct.error) as exc:
        raise TruncatedFileError(path, f"pixel data is truncated ({exc})") from exc
    except (RuntimeError, *_PARSE_ERRORS, OSError) as exc:  # a decoder is there (checked) but the data do not decode
        raise PixelDecodeError(path, str(exc)) from exc


def slice_normal(orientation: list) -> tuple[float, float, float] | None:
    """Unit normal (row x column) of ImageOrientationPatient, turned toward the head; None unless 6 numbers.

    Turned so that z never decreases along it: positions then rise with z in every axial series,
    whichever way its rows and columns run.
    """
    if len(orientation) != 6 or any(v is None for v in orientation):
        return None
    rx, ry, rz, cx, cy, cz = orientation
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    norm = math.sqrt(nx * nx + ny * ny + nz * nz)
    if not norm > 1e-6:  # parallel or zero vectors: no plane
        return None
    sign = -1.0 if nz < 0 else 1.0
    return sign * nx / norm, sign * ny / norm, sign * nz / norm


def project(xyz: list | None, normal: tuple[float, float, float] | None) -> float | None:
    """A position along the slice normal; z itself where the orientation is unknown (so order is by z, as before).

    For an axial slice (normal (0, 0, 1)) the sum is z exactly: the other terms are zeros.
    """
    if xyz is None or any(v is None for v in xyz):
        return None
    if normal is None:
        return xyz[2]
    return xyz[0] * normal[0] + xyz[1] * normal[1] + xyz[2] * normal[2]


def image_id_of(path: str | Path) -> str:
    """The Kaggle image id is the file name without ``.dcm`` (not a header field)."""
    name = os.path.basename(path)
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
_ELEMENTS = {
    keyword: (tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword)))
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "Modality",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SeriesNumber",
        "SeriesDescription",
        "ImageType",
        "ConvolutionKernel",
        "ContrastBolusAgent",
        "SliceThickness",
        "SamplesPerPixel",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "PixelSpacing",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "WindowCenter",
        "WindowWidth",
        "RescaleIntercept",
        "RescaleSlope",
    )
}
_TEXT_VRS = frozenset({"UI", "CS", "LO", "SH", "DS", "IS"})


def _values(ds: AnyDataset, keyword: str, raw_ok: bool = True) -> list:
    """All values of one element as a list ([] when absent or empty).

    The plain cases (little endian, the standard VR, ASCII text or uint16) are read straight from the
    raw bytes, skipping pydicom's per-element conversion: text values come back as stripped ``str``,
    US values as ``int``, which is what the callers then convert.  Anything else (big endian, another
    VR, non-ASCII text, an element pydicom already converted) goes through pydicom's own conversion.
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


def _vector(values: list, n: int) -> list[float] | None:
    """The first ``n`` values as floats (one conversion each), None unless there are ``n``; non-finite is an error."""
    if len(values) < n or any(isinstance(v, str) and not v for v in values[:n]):
        return None
    floats = [float(v) for v in values[:n]]
    if not math.isfinite(sum(floats)):
        raise ValueError(f"non-finite number in {values[:n]!r}")
    return floats


def _joined(ds: AnyDataset, keyword: str) -> str | None:
    """A multi-valued text element as one string, values joined by a backslash as stored (ImageType)."""
    values = [t for t in (_text(v) for v in _values(ds, keyword)) if t is not None]
    return "\\".join(values) if values else None


def _first(ds: AnyDataset, keyword: str, kind=None):
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
