"""NIfTI volumes (``.nii``, ``.nii.gz``) as slices ichprep can scan and convert; CT-ICH's per-slice labels.

One volume is one study and one series (CT-ICH, PhysioNet: ``ct_scans/049.nii``).  Its slices are named
like files: ``<volume path>#<k>`` (:data:`FRAME_SEP`, :func:`split_frame`), k the 0-based voxel index
along the slice axis, and the image id is ``<volume id>_<k+1:03d>`` (``049_001``), CT-ICH's SliceNumber
being k + 1.

Mapping a volume onto DICOM's conventions (NIfTI world space is RAS+, DICOM patient space is LPS+:
``x_LPS = -x_RAS``, ``y_LPS = -y_RAS``, ``z_LPS = z_RAS``):

* slice axis: the voxel axis whose (normalised) affine column is nearest to world z, i.e. the largest
  ``|affine[2, axis]|``; of the other two, the one nearer world x gives the image columns and the
  other the rows (the pairing with the larger ``|x| + |y|`` components);
* orientation: :func:`read_volume_slice` returns every slice as a DICOM axial image with
  ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` would be shown: the column index grows toward the
  patient's left (LPS +x) and the row index toward posterior (LPS +y), whatever the affine's axis
  order and signs (an in-plane axis whose LPS direction points the other way is flipped);
* geometry: the slice normal is the cross product of the row and column directions (in LPS, as
  DICOM's), ``z`` is the world z of the slice centre and ``position`` that centre projected on the
  normal, so the scan orders a volume's slices as it orders a DICOM series';
* HU: the data array with the header's ``scl_slope``/``scl_inter`` applied (nibabel's scaling rule),
  so scan rows carry slope 1 and intercept 0.

The scan reads the header only (348 or 540 bytes; a ``.nii.gz`` is inflated no further than that).
Reading a slice inflates and scales the whole volume once and keeps it for the thread's next slice of
the same volume (one volume per thread), since slices are read in order, volume after volume.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import os
import re
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
from isal import igzip, isal_zlib
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from .. import scratch
from ..errors import (
    EmptyFileError,
    InvalidHeaderError,
    NotDicomError,
    PixelDecodeError,
    TruncatedFileError,
    UnreadableFileError,
    UnsupportedImageError,
)
from .dicomio import to_hu
from .limits import ReadLimits
from .source import VOLUME_SUFFIXES as VOLUME_SUFFIXES  # re-exported: the suffixes are listed there
from .source import read_csv

logger = logging.getLogger(__name__)

#: File name endings of a volume (compared case-insensitively).
#: Separates a volume's path from a slice index in a slice's path (``ct_scans/049.nii#0``).
FRAME_SEP = "#"

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"  # at offset 344: single-file NIfTI-1
_NIFTI1_PAIR_MAGIC = b"ni1\x00"  # a .hdr of a .hdr/.img pair
_NIFTI2_MAGIC = b"n+2\x00"  # at offset 4
_HEADER_BYTES = 540  # the larger of the two header sizes (NIfTI-2)
#: What a scan reads of a volume that is not on a local disk: the header, gzip's own header and slack.
VOLUME_HEAD_BYTES = 1 << 16
_ERROR_LEVEL = 40  # nibabel's problem level from which a header is refused rather than fixed (its default)
_SAMPLE = 1 << 16  # bytes of each end of in-memory data hashed into the per-thread cache key
_FRAME = re.compile(r"^(?P<volume>.+)" + re.escape(FRAME_SEP) + r"(?P<k>[0-9]+)$")
_VOLUME_NAME = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


class NotNiftiError(NotDicomError):
    """A ``.nii``/``.nii.gz`` file that is not a single-file NIfTI-1 or NIfTI-2 image."""

    reason = "not_nifti"


class SliceLayout(NamedTuple):
    """Where a volume's slices lie in its voxel axes and in patient space (LPS, unit vectors)."""

    slice_axis: int
    row_axis: int  # voxel axis along which the image row index runs (toward posterior)
    col_axis: int  # voxel axis along which the image column index runs (toward the patient's left)
    flip_rows: bool  # the row axis runs anterior -> posterior only after reversing it
    flip_cols: bool
    row_direction: tuple[float, float, float]  # DICOM's first ImageOrientationPatient triplet (along a row)
    col_direction: tuple[float, float, float]  # the second (down a column)
    normal: tuple[float, float, float]  # row_direction x col_direction


class VolumeHeader(NamedTuple):
    """What the scan and the reader need of one volume's header."""

    path: str
    shape: tuple[int, int, int]  # voxel axes; a trailing length-1 4th axis is dropped
    dtype: np.dtype
    affine: np.ndarray  # 4x4, voxel centre -> RAS mm
    offset: int  # vox_offset: where the data start in the (inflated) file
    slope: float
    inter: float
    layout: SliceLayout

    @property
    def nbytes(self) -> int:
        """The voxel data's size, inflated."""
        return math.prod(self.shape) * self.dtype.itemsize


class _LastVolume:
    """The thread's last decoded volume: its cache key and HU array in the file's voxel order."""

    key: tuple | None = None
    header: VolumeHeader | None = None
    hu: np.ndarray | None = None


# --- names -------------------------------------------------------------------------------------------


def is_volume(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI volume (``.nii``, ``.nii.gz``, any case) or one slice of one (``...#k``)."""
    volume, _ = split_frame(str(path))
    return _VOLUME_NAME.search(volume) is not None


def split_frame(path: str) -> tuple[str, int | None]:
    """``"a/049.nii#3"`` -> ``("a/049.nii", 3)``; a path without a ``#<digits>`` tail -> ``(path, None)``."""
    match = _FRAME.match(str(path))
    if match is None:
        return str(path), None
    return match["volume"], int(match["k"])


def volume_id(path: str | os.PathLike) -> str:
    """The volume's file name without ``.nii``/``.nii.gz`` (``ct_scans/049.nii.gz`` -> ``049``)."""
    volume, _ = split_frame(str(path))
    name = re.split(r"[/\\]", volume)[-1].rsplit("::", 1)[-1]  # a zip member's path is ZIP::PATH
    return _VOLUME_NAME.sub("", name)


def slice_path(path: str, k: int) -> str:
    """The path naming slice ``k`` (0-based) of volume ``path``."""
    return f"{path}{FRAME_SEP}{k}"


# --- header ------------------------------------------------------------------------------------------


def read_volume_header(path: str | os.PathLike, data: bytes | None = None) -> VolumeHeader:
    """The header of one volume (header bytes only), checked; raises a DicomReadError subclass naming the file."""
    path = str(path)
    with _opened(path, data) as stream:
        return _parse_header(path, _read_head(path, stream), checked_size=data is None)


@contextlib.contextmanager
def _opened(path: str, data: bytes | None, *, fast: bool = False) -> Iterator[BinaryIO]:
    """The volume's bytes, inflated where they are gzip (by their magic, not the name); closed on exit.

    ``fast``: inflate with ISA-L (a whole volume); otherwise zlib, which reads the compressed file in 8 kB
    steps, so a header read inflates only the start.
    """
    with contextlib.ExitStack() as stack:
        if data is None:
            try:
                raw: BinaryIO = stack.enter_context(open(path, "rb"))
            except FileNotFoundError:
                raise  # the scan records "missing" for it, as for a DICOM file
            except OSError as exc:
                raise UnreadableFileError(path, f"cannot open: {exc}") from exc
        else:
            raw = io.BytesIO(data)
        try:
            magic = raw.read(2)
            raw.seek(0)
        except OSError as exc:
            raise UnreadableFileError(path, f"cannot read: {exc}") from exc
        if magic == _GZIP_MAGIC:
            inflate = igzip.IGzipFile if fast else gzip.GzipFile
            yield stack.enter_context(inflate(fileobj=raw, mode="rb"))  # leaves raw open: the stack closes it
        else:
            yield raw


def _read_head(path: str, stream: BinaryIO) -> bytes:
    try:
        return stream.read(_HEADER_BYTES)
    except EOFError as exc:
        raise TruncatedFileError(path, f"gzip stream ends inside the header ({exc})") from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise NotNiftiError(path, f"not a readable gzip file ({exc})") from exc
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot read: {exc}") from exc


def _parse_header(path: str, head: bytes, *, checked_size: bool) -> VolumeHeader:
    """Header fields from the file's first bytes; ``checked_size``: ``path`` is the local file, compare its size."""
    if not head:
        raise EmptyFileError(path, "file is empty")
    if head[4:8] == _NIFTI2_MAGIC:
        klass, size = nib.Nifti2Header, 540
    elif head[344:348] == _NIFTI1_MAGIC:
        klass, size = nib.Nifti1Header, 348
    elif head[344:348] == _NIFTI1_PAIR_MAGIC:
        raise NotNiftiError(path, "a NIfTI-1 pair header (.hdr/.img), not a single-file .nii")
    elif len(head) < 348:
        raise TruncatedFileError(path, f"{len(head)} bytes, shorter than a NIfTI-1 header (348)")
    else:
        raise NotNiftiError(path, "no NIfTI magic ('n+1' at byte 344 or 'n+2' at byte 4)")
    if len(head) < size:
        raise TruncatedFileError(path, f"{len(head)} bytes, shorter than the {size}-byte header")
    if size not in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
        raise InvalidHeaderError(path, f"sizeof_hdr is not {size}")  # it also tells the byte order
    try:
        header = klass(head[:size], check=False)
        header.check_fix(logger=logger, error_level=_ERROR_LEVEL)  # fixable problems are logged and fixed
        affine = header.get_best_affine()
        dtype = header.get_data_dtype()
        shape = header.get_data_shape()
        offset = int(header.get_data_offset())
        slope, inter = header.get_slope_inter()
    except (HeaderDataError, WrapStructError, ValueError, np.linalg.LinAlgError) as exc:
        raise InvalidHeaderError(path, f"bad NIfTI header: {exc}") from exc
    shape = _volume_shape(path, shape)
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise UnsupportedImageError(path, f"voxels of type {dtype} are not one real number (RGB, complex)")
    if not np.all(np.isfinite(affine)):
        raise InvalidHeaderError(path, "the voxel-to-world affine has non-finite values")
    if checked_size:
        _check_size(path, offset + math.prod(shape) * dtype.itemsize)
    return VolumeHeader(
        path=path,
        shape=shape,
        dtype=dtype,
        affine=affine,
        offset=offset,
        slope=1.0 if slope is None else float(slope),  # None: no scaling (nibabel's reading)
        inter=0.0 if inter is None else float(inter),
        layout=layout_of(affine, path=path),
    )


def _volume_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise UnsupportedImageError(path, f"a {len(shape)}-D image {shape}, not a volume")
    if any(n <= 0 for n in shape):
        raise InvalidHeaderError(path, f"dimensions {shape} are not all positive")
    extra = math.prod(shape[3:])
    if extra != 1:
        raise UnsupportedImageError(path, f"a {len(shape)}-D image {shape} holds {extra} volumes, not one")
    return tuple(int(n) for n in shape[:3])


def _check_size(path: str, needed: int) -> None:
    """A local uncompressed file must hold the data its header announces (a gzip one is only known on reading)."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == _GZIP_MAGIC
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot read: {exc}") from exc
    if not compressed and size < needed:
        raise TruncatedFileError(path, f"{size} bytes, the header announces {needed}")


def layout_of(affine: np.ndarray, *, path: str = "<affine>") -> SliceLayout:
    """Slice axis, image axes and flips, and DICOM-style directions, of a voxel-to-RAS affine (see module doc)."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3, :3]
    lengths = np.linalg.norm(lps, axis=0)
    if not np.all(lengths > 1e-6):
        raise InvalidHeaderError(path, f"voxel axes of lengths {lengths.round(6).tolist()} mm: the affine is singular")
    unit = lps / lengths
    slice_axis = int(np.argmax(np.abs(unit[2])))
    a, b = (axis for axis in range(3) if axis != slice_axis)
    if abs(unit[0, a]) + abs(unit[1, b]) >= abs(unit[0, b]) + abs(unit[1, a]):
        col_axis, row_axis = a, b
    else:
        col_axis, row_axis = b, a
    flip_cols = bool(unit[0, col_axis] < 0)  # the column index must grow toward LPS +x (patient left)
    flip_rows = bool(unit[1, row_axis] < 0)  # the row index toward LPS +y (posterior)
    row_direction = unit[:, col_axis] * (-1 if flip_cols else 1)
    col_direction = unit[:, row_axis] * (-1 if flip_rows else 1)
    normal = np.cross(row_direction, col_direction)
    norm = np.linalg.norm(normal)
    if not norm > 1e-6:
        raise InvalidHeaderError(path, "the in-plane voxel axes are parallel: the affine is singular")
    return SliceLayout(
        slice_axis=slice_axis,
        row_axis=row_axis,
        col_axis=col_axis,
        flip_rows=flip_rows,
        flip_cols=flip_cols,
        row_direction=tuple(float(v) for v in row_direction),
        col_direction=tuple(float(v) for v in col_direction),
        normal=tuple(float(v) for v in normal / norm),
    )


# --- scan --------------------------------------------------------------------------------------------


def scan_volume(
    path: str | os.PathLike,
    data: bytes | None = None,
    *,
    limits: ReadLimits | None = None,
    stored: int | None = None,
) -> list[dict]:
    """One scan row per slice of a volume, from its header alone.

    Parameters
    ----------
    path : str
        The volume; where ``data`` is given, only its name.
    data : bytes, optional
        The file's bytes (whole, or a prefix holding the header) where they are not at ``path``.
    limits : ReadLimits, optional
        The voxel bytes the header announces, and their ratio to ``stored`` (the file's size), are checked
        against them [default: :class:`ReadLimits`'s defaults].
    stored : int, optional
        The file's size in bytes, where known.

    Returns
    -------
    list of dict
        The scan table's columns, slices in voxel order (k = 0, 1, ...), ``status`` ``"ok"``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (and no ``data`` is given).
    DicomReadError
        A subclass naming the file and the reason: empty, unreadable, not NIfTI, truncated, a bad header
        or affine, a 2-D image, several volumes, voxels that are not real numbers, over ``limits``.
    """
    header = read_volume_header(path, data)
    (limits or ReadLimits()).check_volume(header.path, header.nbytes, stored)
    path, layout, affine = header.path, header.layout, header.affine
    if header.dtype.itemsize == 1 and header.slope == 1 and header.inter == 0:
        # CT values span -1024..3000 HU; one unscaled byte per voxel is a segmentation (CT-ICH's masks/).
        raise UnsupportedImageError(
            path, f"{header.dtype} voxels: a mask or label volume, not CT in HU (give the folder of the CT volumes)"
        )
    vid = volume_id(path)
    voxel = np.linalg.norm(affine[:3, :3], axis=0)  # mm per voxel step along each voxel axis
    centre = np.empty(4)
    centre[[layout.row_axis, layout.col_axis]] = (
        (header.shape[layout.row_axis] - 1) / 2,
        (header.shape[layout.col_axis] - 1) / 2,
    )
    centre[3] = 1.0
    normal = np.array(layout.normal)
    rows = []
    for k in range(header.shape[layout.slice_axis]):
        centre[layout.slice_axis] = k
        world = affine @ centre
        lps = np.array([-world[0], -world[1], world[2]])
        rows.append(
            {
                "image_id": f"{vid}_{k + 1:03d}",
                "path": slice_path(path, k),
                "frame": k,
                "study_uid": vid,
                "series_uid": vid,
                "patient_id": vid,
                "sop_uid": None,
                "modality": "CT",
                "sop_class_uid": None,
                "image_type": None,
                "series_number": None,
                "series_description": None,
                "kernel": None,
                "contrast": None,
                "slice_thickness": float(voxel[layout.slice_axis]),
                "z": float(lps[2]),
                "instance_number": k + 1,
                "rows": header.shape[layout.row_axis],
                "cols": header.shape[layout.col_axis],
                "pixel_spacing_row": float(voxel[layout.row_axis]),  # DICOM PixelSpacing[0]: between rows
                "pixel_spacing_col": float(voxel[layout.col_axis]),
                "slope": 1.0,
                "intercept": 0.0,
                "bits_stored": None,
                "pixel_representation": None,
                "samples_per_pixel": 1,
                "n_frames": 1,
                "transfer_syntax": None,
                "window_center": None,
                "window_width": None,
                "has_pixels": True,
                "normal_x": layout.normal[0],
                "normal_y": layout.normal[1],
                "normal_z": layout.normal[2],
                "position": float(lps @ normal),
                "status": "ok",
                "error": None,
            }
        )
    return rows


# --- pixels ------------------------------------------------------------------------------------------


def read_volume_slice(
    path_with_frame: str, *, data: bytes | None = None, limits: ReadLimits | None = None
) -> np.ndarray:
    """HU (float32, a new array of shape (rows, cols)) of slice k of ``<volume>#<k>``, oriented as DICOM's.

    Row index toward posterior, column index toward the patient's left (see module doc).  ``data``: the
    whole file's bytes where they are not at the path.  The decoded volume is kept for this thread's
    next call with the same volume (keyed by path and size and mtime, or by a hash of ``data``'s ends).

    Raises ValueError for a path without ``#<k>``, and a DicomReadError subclass for an unreadable
    volume, a truncated or corrupt data block, or a k outside the volume.
    """
    volume_path, k = split_frame(path_with_frame)
    if k is None:
        raise ValueError(f"{path_with_frame!r} names no slice: expected <volume>{FRAME_SEP}<index>")
    last: _LastVolume = scratch.reused("nifti.last_volume", _LastVolume)
    key = _cache_key(volume_path, data)
    if last.key != key or last.hu is None:
        last.key = last.header = last.hu = None  # drop the old volume before decoding the next
        header, hu = _decode_volume(volume_path, data, limits or ReadLimits())
        last.key, last.header, last.hu = key, header, hu
    header, hu = last.header, last.hu
    layout = header.layout
    n = header.shape[layout.slice_axis]
    if not 0 <= k < n:
        raise InvalidHeaderError(volume_path, f"slice {k} is outside the volume's {n} slices")
    index: list = [slice(None)] * 3
    index[layout.slice_axis] = k
    image = hu[tuple(index)]  # a view; the remaining two axes keep their order
    if layout.row_axis > layout.col_axis:
        image = image.T
    if layout.flip_rows:
        image = image[::-1, :]
    if layout.flip_cols:
        image = image[:, ::-1]
    return np.array(image, dtype=np.float32, order="C")  # a copy: the cached volume stays private


def _cache_key(path: str, data: bytes | None) -> tuple:
    if data is not None:
        view = memoryview(data)
        return ("data", path, len(view), zlib.crc32(view[:_SAMPLE]), zlib.crc32(view[-_SAMPLE:]))
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot stat: {exc}") from exc
    return ("file", path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _decode_volume(path: str, data: bytes | None, limits: ReadLimits) -> tuple[VolumeHeader, np.ndarray]:
    """The header and the whole volume as float32 HU, in the file's voxel order (one pass over the file)."""
    with _opened(path, data, fast=True) as stream:
        try:
            head = stream.read(_HEADER_BYTES)
        except (EOFError, gzip.BadGzipFile, zlib.error, isal_zlib.error) as exc:
            raise _inflate_error(path, exc) from exc
        header = _parse_header(path, head, checked_size=False)
        nbytes = header.nbytes
        limits.check_volume(path, nbytes, None)  # the scan checked the ratio; a file changed since is caught here
        try:
            stream.seek(header.offset)
            raw = stream.read(nbytes)
        except (EOFError, gzip.BadGzipFile, zlib.error, isal_zlib.error) as exc:
            raise _inflate_error(path, exc) from exc
        except OSError as exc:
            raise UnreadableFileError(path, f"cannot read the data: {exc}") from exc
    if len(raw) < nbytes:
        raise TruncatedFileError(path, f"data block is {len(raw)} bytes, the header announces {nbytes}")
    stored = np.frombuffer(raw, dtype=header.dtype).reshape(header.shape, order="F")  # NIfTI is Fortran order
    # stored * scl_slope + scl_inter, in place in one float32 array (nibabel's values; its float64 upcast
    # would double the memory for an image that ends up float32 anyway)
    return header, to_hu(stored, header.slope, header.inter)


def _inflate_error(path: str, exc: Exception):
    if isinstance(exc, EOFError):
        return TruncatedFileError(path, f"gzip stream ends early ({exc})")
    return PixelDecodeError(path, f"gzip data do not inflate ({exc})")


#: Columns of a ``--volume-ids`` CSV: the volume (file name or id), its study, and optionally its patient.
VOLUME_ID_COLUMNS = ("volume", "study", "patient")


def read_volume_ids(path: str | os.PathLike) -> pd.DataFrame:
    """A mapping CSV (``volume,study[,patient]``) as a table indexed by volume id (``049.nii.gz`` -> ``049``).

    Raises ValueError naming the file and the lines of missing or repeated volumes.
    """
    table = read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [str(c).strip().lower() for c in table.columns]
    if not {"volume", "study"} <= set(table.columns):
        raise ValueError(f"{path}: a volume-ids CSV needs columns volume,study[,patient]; it has {list(table.columns)}")
    table = table.assign(volume=[volume_id(v.strip()) for v in table["volume"]], study=table["study"].str.strip())
    bad = table.index[(table["volume"] == "") | (table["study"] == "") | table["volume"].duplicated(keep=False)]
    if len(bad):
        lines = ", ".join(str(i + 2) for i in bad[:5])
        raise ValueError(f"{path}: empty or repeated volume, or empty study, at line(s) {lines}")
    patient = table["patient"].str.strip() if "patient" in table else table["study"]
    return pd.DataFrame(
        {"study_uid": table["study"].to_numpy(), "patient_id": patient.to_numpy()}, index=table["volume"]
    )


def apply_volume_ids(table: pd.DataFrame, ids: pd.DataFrame) -> pd.DataFrame:
    """Volume slices' study, series and patient from ``ids`` (:func:`read_volume_ids`); others keep file names."""
    frames = table["frame"].notna()
    volumes = table.loc[frames, "path"].astype(str).map(volume_id)
    known = volumes.isin(ids.index)
    missing = sorted(set(volumes[~known]))
    if missing:
        logger.warning(
            "%d volumes are not in the volume-ids CSV and keep their file names: %s", len(missing), missing[:5]
        )
    rows = volumes[known]
    table = table.copy()
    for column in ("study_uid", "series_uid"):
        table.loc[rows.index, column] = ids.loc[rows.to_numpy(), "study_uid"].to_numpy()
    table.loc[rows.index, "patient_id"] = ids.loc[rows.to_numpy(), "patient_id"].to_numpy()
    return table
