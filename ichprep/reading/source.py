"""Where the DICOM archive lies: a folder, a zip file (or a folder inside one), or an fsspec URL.

A SOURCE is written as

- ``stage_2_train`` or ``/data/rsna/stage_2_train``: a local folder;
- ``s3://bucket/stage_2_train/`` (``gs://``, ``file://``, ...): every object below a prefix;
- ``rsna.zip`` or ``rsna.zip::rsna-intracranial-hemorrhage-detection/stage_2_train``: a zip file, whole or one
  folder inside it; the zip itself may be local or a URL (``s3://bucket/rsna.zip::top/stage_2_train``);
- a folder (or prefix) of zips, e.g. CQ500's download, one ``CQ500-CT-<N>.zip`` per study: a folder's ``*.zip``
  files are listed member by member (``/data/cq500/CQ500-CT-1.zip::CQ500CT1 CQ500CT1/.../CT000000.dcm``) next to
  its loose ``*.dcm`` files; a zip inside a zip is not followed.  A zip of the folder whose central directory
  cannot be read becomes one member, its own path, that the scan rejects as ``bad_zip_member`` saying why
  (logged at listing too): one bad download never stops the run.

The driver lists a source once (:func:`list_members`).  For a zip that is one read of the central
directory, and every member row records where its bytes are (local header offset, compressed size,
method, CRC-32), so a worker reads exactly that byte range (a seek on a local or shared disk, one ranged
GET on an object store) and never parses the central directory itself.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter
from typing import NamedTuple

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem
from isal import isal_zlib

from .. import scratch
from ..errors import SizeMismatchError, SourceError, TruncatedFileError, ZipMemberError
from .limits import INFLATE_MARGIN, ReadLimits

logger = logging.getLogger(__name__)

ZIP_SEP = "::"
DICOM_SUFFIX = ".dcm"
ZIP_SUFFIX = ".zip"
#: NIfTI volumes (:mod:`ichprep.reading.nifti`): a folder's ``*.nii`` and ``*.nii.gz`` files are listed too.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
_LISTED = (DICOM_SUFFIX, *VOLUME_SUFFIXES)
STORED, DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
#: Columns a zip member adds to the scan table (null for other sources).
ZIP_COLUMNS = ("zip_offset", "zip_csize", "zip_method", "zip_crc")

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the zip local file header (APPNOTE 4.3.7)
_LOCAL_MAGIC = b"PK\x03\x04"
_EXTRA_SLACK = 256  # local extra fields are rarely longer: the header and the data then come in one read
_DEFLATE_HEAD_SLACK = 1024  # incompressible data grows by at most ~0.1 % under deflate


class Member(NamedTuple):
    """One file of a source: its path (as reported and recorded) and, for a zip member, where its bytes are."""

    path: str
    size: int | None = None
    offset: int | None = None  # zip: offset of the local file header
    csize: int | None = None  # zip: compressed size
    method: int | None = None  # zip: 0 stored, 8 deflated
    crc: int | None = None  # zip: CRC-32 of the uncompressed bytes


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE (see the module docstring); local paths are absolute, for workers elsewhere.

    ``limits`` bound what a worker reads of each of its files (:mod:`ichprep.reading.limits`).
    """

    url: str
    inner: str = ""
    is_zip: bool = False
    limits: ReadLimits = ReadLimits()

    def __str__(self) -> str:
        return f"{self.url}{ZIP_SEP}{self.inner}" if self.is_zip else self.url

    @property
    def is_local(self) -> bool:
        return isinstance(_filesystem(self.url).fs, LocalFileSystem)

    @property
    def by_path(self) -> bool:
        """A local folder: its loose files are read by path (see :func:`by_path`), everything else by
        :func:`read_member`."""
        return self.is_local and not self.is_zip

    @property
    def prefix(self) -> str:
        """What every member path starts with; the rest is the member's name relative to the source."""
        if self.is_zip:
            return f"{self.url}{ZIP_SEP}{self.inner}/" if self.inner else f"{self.url}{ZIP_SEP}"
        return self.url.rstrip("/") + "/"

    def relative(self, path: str) -> str:
        """A member path relative to the source: identical for the same archive as folder, zip or bucket."""
        if path.startswith(self.prefix):
            return path[len(self.prefix) :]
        return os.path.relpath(path, self.url)  # a scan table written from another spelling of the folder

    def relative_all(self, paths: list[str]) -> list[str]:
        """:meth:`relative` of many paths (the prefix computed once)."""
        prefix = self.prefix
        n = len(prefix)
        return [p[n:] if p.startswith(prefix) else self.relative(p) for p in paths]


#: The limits of plain local paths given without a Source.
DEFAULT_LIMITS = ReadLimits()


def limits_of(source: Source | None) -> ReadLimits:
    """What a worker reads of each file of ``source`` (None: plain local paths, the defaults)."""
    return source.limits if source is not None else DEFAULT_LIMITS


def declared_size(path: str, source: Source | None, member: Member | None) -> int | None:
    """A member's size before reading it: from the listing (zip, bucket), else a local file's stat; None when
    neither tells (the read then says why)."""
    if member is not None and member.size is not None:
        return member.size
    if not by_path(source, member):
        return None
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def by_path(source: Source | None, member: Member | None) -> bool:
    """Whether a worker reads ``member`` by its path (a loose file of a local folder) or by :func:`read_member`.

    ``source`` None means plain local paths.  A member with a zip offset lies in a zip (of a zip SOURCE, or of
    a folder of zips) and is read from that zip's byte range.
    """
    return source is None or (source.by_path and (member is None or member.offset is None))


class _FS(NamedTuple):
    fs: fsspec.AbstractFileSystem
    path: str


@lru_cache(maxsize=64)
def _filesystem(url: str) -> _FS:
    """fsspec's filesystem and path for a URL or local path, made once per process."""
    fs, path = fsspec.core.url_to_fs(url)
    return _FS(fs, path)


def _absolute(url: str) -> str:
    """Local paths (``file://`` URLs too) as absolute plain paths, so every spelling names one file alike."""
    fs, path = _filesystem(url)
    return path if isinstance(fs, LocalFileSystem) else url


def parse_source(text: str | os.PathLike | Source, limits: ReadLimits | None = None) -> Source:
    """The :class:`Source` named by ``text`` (see the module docstring for the forms).

    Parameters
    ----------
    text : str, PathLike or Source
        A folder, ``ZIP`` or ``ZIP::FOLDER/IN/ZIP``, or an fsspec URL; a :class:`Source` is returned as is
        (with ``limits`` where they are given).
    limits : ReadLimits, optional
        What a worker reads of each file [default: :class:`ReadLimits`'s defaults].

    Returns
    -------
    Source
        Local paths made absolute (workers may run elsewhere); a local file that is not a folder is
        taken as a zip, checked when it is listed.

    Raises
    ------
    SourceError
        Nothing exists at ``text``, or the part before ``::`` is not a file.
    """
    if isinstance(text, Source):
        return text if limits is None else dataclasses.replace(text, limits=limits)
    limits = limits or ReadLimits()
    text = str(text)
    if ZIP_SEP in text:
        url, inner = text.split(ZIP_SEP, 1)
        url, inner = _absolute(url), inner.strip("/")
        fs, path = _filesystem(url)
        if not fs.isfile(path):
            raise SourceError(f"{url} does not exist or is not a file (the part before '{ZIP_SEP}' must be a zip file)")
        return Source(url, inner, is_zip=True, limits=limits)
    url = _absolute(text)
    fs, path = _filesystem(url)
    if fs.isdir(path):
        return Source(url, limits=limits)
    if fs.isfile(path):
        return Source(url, "", is_zip=True, limits=limits)
    raise SourceError(
        f"{text} does not exist: give a folder, a zip file (ZIP or ZIP{ZIP_SEP}FOLDER) or a URL (s3://bucket/prefix/)"
    )


# ---------------------------------------------------------------- listing (the driver, once)


def list_members(source: Source) -> list[Member]:
    """Every ``*.dcm`` file of the source, and of a folder every member ``*.dcm`` of its ``*.zip`` files and
    every NIfTI volume (``*.nii``, ``*.nii.gz``), sorted by path.

    A local folder is walked without following symlinked folders (so loops cannot hang us) and without
    sizes for its loose files (the workers stat them); a bucket listing and a zip's central directory give
    sizes.  An unreadable zip of a folder is one member with no zip method (see :func:`_folder_zip`).
    """
    if source.is_zip:
        return _zip_members(source)
    fs, root = _filesystem(source.url)
    found, zips = [], []
    if source.is_local:
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs.sort()
            for name in files:
                lower = name.lower()
                if lower.endswith(_LISTED):
                    found.append(Member(os.path.join(folder, name)))
                elif lower.endswith(ZIP_SUFFIX):
                    zips.append((os.path.join(folder, name), None))
    else:
        prefix, cut = source.prefix, len(root.rstrip("/")) + 1
        # fsspec paths lack the protocol: rebuild each member's URL from the source's own spelling.
        for name, info in fs.find(root, detail=True).items():
            lower = name.lower()
            if lower.endswith(_LISTED):
                found.append(Member(prefix + name[cut:], int(info["size"])))
            elif lower.endswith(ZIP_SUFFIX):
                zips.append((prefix + name[cut:], int(info["size"])))
    for url, size in zips:
        found.extend(_folder_zip(url, size))
    return sorted(found, key=attrgetter("path"))  # by path alone: a stand-in's None fields never get compared


def _folder_zip(url: str, size: int | None) -> list[Member]:
    """The members of one zip of a folder; one stand-in member, offset 0 and no method, if it is unreadable.

    The stand-in carries the zip's own path, so the scan reports the zip and why (:func:`_zip_read`) and
    the run goes on with the other zips.
    """
    try:
        return _zip_members(Source(url, "", is_zip=True))  # listing only: limits apply when members are read
    except SourceError as exc:
        logger.warning("%s: its members are left out: %s", url, exc)
        return [Member(url, size, offset=0)]


def _zip_infos(url: str) -> list[zipfile.ZipInfo]:
    """The central directory of the zip at ``url``."""
    fs, path = _filesystem(url)
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        return archive.infolist()


def _zip_members(source: Source) -> list[Member]:
    fs, path = _filesystem(source.url)
    inner = f"{source.inner}/" if source.inner else ""
    try:
        infos = _zip_infos(source.url)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        if fs.cat_file(path, start=0, end=4) != _LOCAL_MAGIC:
            raise SourceError(
                f"{source.url} is neither a folder nor a zip file: give the folder that holds the "
                "DICOM files, a zip, or a URL prefix"
            ) from exc
        raise SourceError(f"{source.url} is not a readable zip file (truncated or damaged?): {exc}") from exc
    members = [
        Member(
            f"{source.url}{ZIP_SEP}{info.filename}",
            info.file_size,
            info.header_offset,
            info.compress_size,
            info.compress_type,
            info.CRC,
        )
        for info in infos
        if info.filename.startswith(inner) and info.filename.lower().endswith(DICOM_SUFFIX) and not info.is_dir()
    ]
    if not members and inner and not any(info.filename.startswith(inner) for info in infos):
        raise SourceError(
            f"{source.url} holds no folder {source.inner!r}; its top-level entries are: "
            + ", ".join(sorted({i.filename.split("/", 1)[0] for i in infos})[:10])
        )
    return sorted(members)


# ---------------------------------------------------------------- reading (a worker, per file)


def read_member(source: Source, member: Member, head: int | None = None, reuse: bool = False) -> bytes | memoryview:
    """The bytes of one member of ``source``, whole or its first bytes.

    Parameters
    ----------
    source : Source
        Where the member lies (:func:`parse_source`).
    member : Member
        One row of :func:`list_members` (for a zip, with where its bytes are).
    head : int, optional
        Read at least the first ``head`` bytes where the member has that many, not the whole member.
    reuse : bool, optional
        Read a whole stored zip member into this thread's scratch buffer (:mod:`ichprep.scratch`),
        valid until the next such read, instead of new memory.

    Returns
    -------
    bytes or memoryview
        The member's bytes; a whole zip member has passed its CRC-32 check.

    Raises
    ------
    DicomReadError
        Each naming the member: :class:`TooLargeError` or :class:`SuspiciousRatioError` (its declared
        sizes are over ``source.limits``; nothing is read), :class:`SizeMismatchError` (its data inflate
        past its declared size), :class:`ZipMemberError` (damaged, encrypted, an unsupported compression
        method, CRC-32 mismatch) or :class:`TruncatedFileError` (the zip ends inside it).
    FileNotFoundError
        A file or object of a folder or URL source is gone.
    """
    zipped = member.offset is not None
    source.limits.check_file(member.path, member.size, member.csize if zipped else None)
    if head is not None and member.size is not None and head >= member.size:
        head = None  # the whole member, CRC-checked, for the price of its head
    if source.is_zip:
        return _zip_read(source.url, member, head, reuse)
    if zipped:  # a member of one of the folder's zips: that zip is the path before '::'
        return _zip_read(member.path.split(ZIP_SEP, 1)[0], member, head, reuse)
    fs, root = _filesystem(source.url)
    path = f"{root.rstrip('/')}/{source.relative(member.path)}"  # the cached root: no URL parse per member
    if head is not None:
        return fs.cat_file(path, start=0, end=head)
    return fs.cat_file(path)


def _read_range(url: str, start: int, length: int, into: memoryview | None = None) -> bytes | memoryview:
    """``length`` bytes at ``start`` of a local file (one handle per thread) or an object (one ranged GET)."""
    fs, path = _filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        return fs.cat_file(path, start=start, end=start + length)
    f = _local_handle(path)
    f.seek(start)
    if into is None:
        return f.read(length)
    return into[: f.readinto(into[:length])]


def _local_handle(path: str):
    """This thread's open handle on a local zip, reopened when the file at ``path`` is replaced or another zip
    is read."""
    stat = os.stat(path)
    identity = (path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    slot = scratch.reused("zip-handle", dict)  # one handle per thread: a folder of 500 zips must not hold 500 open
    if slot.get("identity") != identity:
        if "file" in slot:
            slot["file"].close()
        slot.update(identity=identity, file=open(path, "rb"))
    return slot["file"]


def _zip_read(url: str, member: Member, head: int | None, reuse: bool) -> bytes | memoryview:
    """Read ``member`` of the zip at ``url`` from its byte range (see :func:`read_member`)."""
    path = member.path
    if member.method not in (STORED, DEFLATED):
        if member.method is None:  # the stand-in for an unreadable zip of a folder (_folder_zip)
            raise ZipMemberError(path, _zip_damage(url))
        raise ZipMemberError(path, f"compression method {member.method} is not supported (stored or deflated only)")
    if head is None:
        want = member.csize
    else:
        want = min(member.csize, head + (_DEFLATE_HEAD_SLACK if member.method == DEFLATED else 0))
    span = _LOCAL_HEADER.size + _EXTRA_SLACK + want
    into = scratch.byte_buffer("zip", span) if reuse and member.method == STORED and head is None else None
    raw = _read_range(url, member.offset, span, into)
    if len(raw) < _LOCAL_HEADER.size:
        raise TruncatedFileError(path, f"the zip ends inside this member's local header (offset {member.offset})")
    fields = _LOCAL_HEADER.unpack_from(raw)
    if fields[0] != _LOCAL_MAGIC:
        raise ZipMemberError(path, f"no local file header at offset {member.offset}: the zip is damaged")
    if fields[3] & 0x1:
        raise ZipMemberError(path, "the member is encrypted")
    start = _LOCAL_HEADER.size + fields[10] + fields[11]
    if start + want > len(raw):  # a long extra field: fetch the data on its own
        raw = _read_range(url, member.offset + start, want, into)
        start = 0
    data = memoryview(raw)[start : start + want]
    if len(data) < want:
        raise TruncatedFileError(path, f"the zip ends inside this member ({len(data)} of {want} bytes)")
    if member.method == DEFLATED:
        # Never more out than asked for: the declared size plus a margin, or the head.
        cap = (member.size or 0) + INFLATE_MARGIN if head is None else head
        try:
            data = isal_zlib.decompressobj(-15).decompress(data, cap)
        except isal_zlib.error as exc:
            raise ZipMemberError(path, f"deflated data does not inflate: {exc}") from exc
        if head is None and len(data) > (member.size or 0):
            raise SizeMismatchError(
                path,
                f"the member's data inflate past the {member.size} bytes its header declares "
                "(stopped there; the zip is damaged or hostile)",
            )
    if head is None:
        if len(data) != member.size or isal_zlib.crc32(data) != member.crc:
            raise ZipMemberError(
                path,
                f"the member fails its CRC-32 check ({len(data)} bytes, expected {member.size}): the zip is damaged",
            )
    return data


def _zip_damage(url: str) -> str:
    """Why the zip at ``url`` cannot be listed, for the scan's report."""
    try:
        _zip_infos(url)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        return f"not a readable zip file (truncated, damaged or no zip at all; none of its members is scanned): {exc}"
    return "the zip was unreadable when the source was listed and is readable now: scan again"


def read_file(text: str | os.PathLike) -> bytes:
    """One whole file given as a local path, a URL, or ``ZIP::PATH/IN/ZIP`` (a CSV inside the archive)."""
    text = str(text)
    if ZIP_SEP not in text:
        fs, path = _filesystem(_absolute(text))
        if not fs.isfile(path):
            raise SourceError(f"{text} does not exist or is not a file")
        return fs.cat_file(path)
    url, name = text.split(ZIP_SEP, 1)
    fs, path = _filesystem(_absolute(url))
    try:
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            return archive.read(name.strip("/"))
    except KeyError as exc:
        raise SourceError(f"{url} holds no file {name!r}") from exc
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise SourceError(f"cannot read {name!r} from {url}: {exc}") from exc


def read_csv(text: str | os.PathLike, **options) -> pd.DataFrame:
    """:func:`pandas.read_csv` of a file named as for :func:`read_file`."""
    return pd.read_csv(io.BytesIO(read_file(text)), **options)


def members_of(table: pd.DataFrame) -> list[Member]:
    """The members a scan table's rows name (path, file_size and the zip columns), in row order."""
    columns = [table["path"].astype(str).tolist(), _ints(table["file_size"])]
    columns += [_ints(table[name]) if name in table else [None] * len(table) for name in ZIP_COLUMNS]
    return [Member(*row) for row in zip(*columns)]


def _ints(column: pd.Series) -> list[int | None]:
    """Python ints, None where missing (one vectorised conversion, not a check per value)."""
    return column.astype("Int64").astype(object).where(column.notna(), None).tolist()
