"""The plain case of a DICOM file, walked by ichkit's own reader instead of ``pydicom.dcmread``.

Every RSNA file is this case: a Part 10 file (128-byte preamble, ``DICM``), implicit or explicit VR
little endian, and top-level elements of defined length up to the pixel data.  :func:`read_plain`
walks such a file's elements with ``struct`` and returns a :class:`PlainDataset`; for anything else
(no preamble, another transfer syntax, an undefined length, elements out of order, a file cut short)
it returns None and the caller reads the file with pydicom.  A :class:`PlainDataset` holds pydicom
``RawDataElement`` s, so the values it hands to pydicom (for conversion or pixel decoding) are the
ones ``dcmread`` would have read (tests/prep/reading/test_plainread.py compares the two on every file of the
synthetic set and of pydicom's own).
"""

from __future__ import annotations

import os
from functools import cached_property
from struct import unpack_from
from typing import NamedTuple

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

from .. import scratch
from .limits import HEADER_BYTES

#: Explicit VR codes (PS3.5 table 6.2-1) and those with a 4-byte length after 2 reserved bytes.
_VRS = frozenset(
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: (7FE0,0008) FloatPixelData, (7FE0,0009) DoubleFloatPixelData, (7FE0,0010) PixelData: the walk stops there.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
TRANSFER_SYNTAX = 0x00020010
_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_UNDEFINED = 0xFFFFFFFF
#: A header-only read looks at this many bytes first (RSNA headers take ~1.3 kB; longer ones are read whole).
HEAD_BYTES = 1 << 14


class PlainDataset:
    """Top-level elements of a plain file as pydicom ``RawDataElement`` s (values not converted).

    It answers what ichprep's header and pixel code asks, with the names pydicom's ``Dataset`` uses:
    ``get_item``, ``in``, ``len``, ``keys`` and ``file_meta`` from the walk itself; ``ds[tag]`` (a
    converted value) and ``pixel_array`` from pydicom, on a ``Dataset`` of the same raw elements.
    A header-only walk holds no pixel element, as pydicom's ``stop_before_pixels`` holds none.
    """

    def __init__(self, elements: dict[int, RawDataElement], transfer_syntax: str, has_pixels: bool):
        self._elements = elements
        self.file_meta = {"TransferSyntaxUID": transfer_syntax}
        self.has_pixels = has_pixels

    def get_item(self, tag: int) -> RawDataElement | None:
        return self._elements.get(tag)

    def __contains__(self, tag: int) -> bool:
        return tag in self._elements

    def __len__(self) -> int:
        return len(self._elements)

    def keys(self):
        return self._elements.keys()

    def __getitem__(self, tag: int) -> DataElement:
        """The element converted by pydicom (character set, VR lookup), for values the raw bytes do not answer."""
        return self._pydicom[tag]

    @property
    def pixel_array(self) -> np.ndarray:
        """pydicom's decoding of the pixel data, for pixels ichprep does not read from the bytes itself."""
        return self._pydicom.pixel_array

    @cached_property
    def _pydicom(self) -> Dataset:
        """The same raw elements as a pydicom Dataset; pydicom converts them as it would after ``dcmread``."""
        ds = Dataset(
            {
                BaseTag(tag): elem._replace(tag=BaseTag(tag), value=_own_bytes(elem.value))
                for tag, elem in self._elements.items()
            }
        )
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = self.file_meta["TransferSyntaxUID"]
        ds.set_original_encoding(self.file_meta["TransferSyntaxUID"] == _IMPLICIT_LE, True)
        return ds


def _own_bytes(value):
    """A copy of a value that views the file's buffer (a scratch buffer is reused by the next read)."""
    return bytes(value) if isinstance(value, memoryview) else value


class _Walk(NamedTuple):
    """Where a walk over consecutive elements got to."""

    elements: dict[int, tuple[str | None, int, int]]  # tag -> (VR, value offset, value length)
    stop: int  # offset of the first element not walked (end of group 2 for the file meta)
    pixels: tuple[int, str | None, int, int] | None  # (tag, VR, value offset, value length) of the pixel element


def _walk(data: bytes | memoryview, pos: int, implicit: bool, meta: bool, want_pixels: bool) -> _Walk | None:
    """Elements from ``pos`` up to where group 2 ends (``meta``) or the pixel element; None outside the plain case."""
    elements: dict[int, tuple[str | None, int, int]] = {}
    n, last = len(data), -1
    while pos + 8 <= n:
        group, number = unpack_from("<HH", data, pos)
        if meta and group != 2:
            return _Walk(elements, pos, None)
        tag = group << 16 | number
        if tag <= last:
            return None  # elements out of order
        last = tag
        if implicit:
            vr, (length,), header = None, unpack_from("<I", data, pos + 4), 8
        else:
            vr = bytes(data[pos + 4 : pos + 6]).decode("latin-1")
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    return None  # the file ends in an element header
                (length,), header = unpack_from("<I", data, pos + 8), 12
            elif vr in _VRS:
                (length,), header = unpack_from("<H", data, pos + 6), 8
            else:
                return None  # an unknown VR
        pos += header
        if tag in PIXEL_TAGS:
            if want_pixels and (length == _UNDEFINED or pos + length > n):
                return None  # encapsulated or truncated pixel data
            return _Walk(elements, pos, (tag, vr, pos, length))
        if length == _UNDEFINED or pos + length > n:
            return None  # an undefined length, or a value past the end of the data
        elements[tag] = (vr, pos, length)
        pos += length
    if pos != n:
        return None  # the file ends in an element header
    return _Walk(elements, pos, None)


def _transfer_syntax(data: bytes | memoryview, meta: _Walk) -> str | None:
    """The file meta's transfer syntax UID where it is ASCII text."""
    if TRANSFER_SYNTAX not in meta.elements:
        return None
    _, offset, length = meta.elements[TRANSFER_SYNTAX]
    raw = bytes(data[offset : offset + length])
    return raw.decode("ascii").strip(" \x00") if raw.isascii() else None


def parse(data: bytes | memoryview, want_pixels: bool = True) -> PlainDataset | None:
    """A :class:`PlainDataset` for the bytes of a plain file, else None.

    With ``want_pixels`` the pixel data value must be complete (it is then the pixel data element, a
    memoryview into ``data``); without it the walk stops at the pixel data tag and keeps no pixel
    element.  Other values are copied.
    """
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        return None
    meta = _walk(data, 132, implicit=False, meta=True, want_pixels=False)
    syntax = _transfer_syntax(data, meta) if meta is not None else None
    if syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
        return None
    implicit = syntax == _IMPLICIT_LE
    if implicit and bytes(data[meta.stop + 4 : meta.stop + 6]).decode("latin-1") in _VRS:
        return None  # declared implicit but written explicit: pydicom sorts that out
    walk = _walk(data, meta.stop, implicit, meta=False, want_pixels=want_pixels)
    if walk is None:
        return None
    elements = {
        tag: RawDataElement(tag, vr, length, bytes(data[offset : offset + length]), offset, implicit, True, True)
        for tag, (vr, offset, length) in walk.elements.items()
    }
    if walk.pixels is not None and want_pixels:
        tag, vr, offset, length = walk.pixels
        value = memoryview(data)[offset : offset + length]
        elements[tag] = RawDataElement(tag, vr, length, value, offset, implicit, True, True)
    return PlainDataset(elements, syntax, has_pixels=walk.pixels is not None)


def read_plain(path, want_pixels: bool = True, reuse: bool = False) -> PlainDataset | None:
    """:func:`parse` of a file; None when it is not plain or cannot be opened (pydicom then says why).

    A missing file raises FileNotFoundError, as pydicom's path does.  With ``reuse`` the file is read
    into this thread's scratch buffer (:mod:`ichprep.scratch`): the pixel data then stays valid only
    until the next such read in this thread.
    """
    try:
        with open(path, "rb") as f:
            if want_pixels and reuse:
                view = scratch.byte_buffer("file", os.fstat(f.fileno()).st_size)
                data = view[: f.readinto(view)]
            else:
                data = f.read() if want_pixels else f.read(HEAD_BYTES)
            plain = parse(data, want_pixels)
            if (
                not want_pixels
                and len(data) == HEAD_BYTES
                and (plain is None or not plain.has_pixels)
                and data[128:132] == b"DICM"
            ):
                data += f.read(HEADER_BYTES - HEAD_BYTES)  # a header longer than HEAD_BYTES
                plain = parse(data, want_pixels)
                if plain is not None and not plain.has_pixels and len(data) == HEADER_BYTES:
                    return None  # cut inside the header: pydicom's path words it (header_too_long)
            return plain
    except FileNotFoundError:
        raise
    except OSError:  # permission denied, a symlink loop, ...: pydicom's path words the error
        return None
