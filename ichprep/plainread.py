"""The plain case of a DICOM file, walked without pydicom: 0.03 ms a file instead of pydicom's 0.18 ms.

Every RSNA file is this case: a Part 10 file (128-byte preamble, ``DICM``), implicit or explicit VR
little endian, and top-level elements of defined length up to the pixel data.  :func:`read_plain`
walks such a file's elements with ``struct`` and hands back a :class:`PlainDataset` that answers only
what ichprep asks of a header: raw elements by tag (``get_item``, as pydicom's own) and the transfer
syntax.  It returns None for anything else (no preamble, another transfer syntax, an undefined length,
a sequence of unexpected shape, elements out of order, a file cut short), and a :class:`PlainDataset`
raises :class:`NotPlain` where only pydicom can answer (``pixel_array``, converted values).  The
caller then reads the file again with pydicom, so every error message and every unusual file still
goes through pydicom; this module only ever speeds up files it reads exactly as pydicom would
(tests/test_plainread.py compares the two on every file of the synthetic set and of pydicom's own).
"""

from __future__ import annotations

import os
from struct import unpack_from

from pydicom.dataelem import RawDataElement

from . import scratch

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


class NotPlain(Exception):
    """Only pydicom can answer this; read the file with pydicom instead."""


class _Unplain(Exception):
    """The walk met something outside the plain case."""


class PlainDataset:
    """Top-level elements of a plain file as pydicom ``RawDataElement`` s (values not converted)."""

    def __init__(self, elements: dict[int, RawDataElement], transfer_syntax: str, has_pixels: bool):
        self._elements = elements
        self.file_meta = {"TransferSyntaxUID": transfer_syntax}
        self.has_pixels = has_pixels

    def get_item(self, tag: int) -> RawDataElement | None:
        return self._elements.get(tag)

    def __getitem__(self, tag):
        raise NotPlain(f"element {tag} needs pydicom's value conversion")

    def __len__(self):
        raise NotPlain("len() of a plain dataset")

    def __contains__(self, key):
        raise NotPlain("membership test on a plain dataset")

    def __getattr__(self, name):  # pixel_array, get, keys, ...: pydicom's
        raise NotPlain(f"{name} needs pydicom")


def _walk(data: bytes | memoryview, pos: int, implicit: bool, meta: bool, want_pixels: bool):
    """Elements from ``pos``: {tag: (vr, offset, length)}, then where group 2 ends (``meta``) or the pixel element."""
    elements: dict[int, tuple[str | None, int, int]] = {}
    n, last = len(data), -1
    while pos + 8 <= n:
        group, number = unpack_from("<HH", data, pos)
        if meta and group != 2:
            return elements, pos
        tag = group << 16 | number
        if tag <= last:
            raise _Unplain("elements out of order")
        last = tag
        if implicit:
            vr, (length,) = None, unpack_from("<I", data, pos + 4)
            pos += 8
        else:
            vr = bytes(data[pos + 4 : pos + 6]).decode("latin-1")
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    raise _Unplain("file ends in an element header")
                (length,) = unpack_from("<I", data, pos + 8)
                pos += 12
            elif vr in _VRS:
                (length,) = unpack_from("<H", data, pos + 6)
                pos += 8
            else:
                raise _Unplain(f"unknown VR {vr!r}")
        if tag in PIXEL_TAGS:
            if want_pixels and (length == _UNDEFINED or pos + length > n):
                raise _Unplain("encapsulated or truncated pixel data")
            return elements, (tag, vr, pos, length)
        if length == _UNDEFINED or pos + length > n:
            raise _Unplain("undefined length or a value past the end of the data")
        elements[tag] = (vr, pos, length)
        pos += length
    if pos != n:
        raise _Unplain("file ends in an element header")
    return elements, (pos if meta else None)


def parse(data: bytes | memoryview, want_pixels: bool = True) -> PlainDataset | None:
    """A :class:`PlainDataset` for the bytes of a plain file, else None.

    With ``want_pixels`` the pixel data value must be complete (it is then the PixelData element, as a
    memoryview into ``data``); without it the walk stops at the pixel data tag.  Other values are copied.
    """
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        return None
    try:
        meta, start = _walk(data, 132, implicit=False, meta=True, want_pixels=False)
        if TRANSFER_SYNTAX not in meta or not isinstance(start, int):
            return None
        _, offset, length = meta[TRANSFER_SYNTAX]
        syntax = bytes(data[offset : offset + length]).decode("ascii").strip(" \x00")
        if syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
            return None
        implicit = syntax == _IMPLICIT_LE
        if implicit and bytes(data[start + 4 : start + 6]).decode("latin-1") in _VRS:
            return None  # declared implicit but written explicit: pydicom sorts that out
        found, pixels = _walk(data, start, implicit, meta=False, want_pixels=want_pixels)
    except (_Unplain, UnicodeDecodeError):
        return None
    elements = {tag: RawDataElement(tag, vr, length, bytes(data[offset : offset + length]), offset, implicit, True, True)
                for tag, (vr, offset, length) in found.items()}
    if pixels is not None:
        tag, vr, offset, length = pixels
        value = memoryview(data)[offset : offset + length] if want_pixels else None
        elements[tag] = RawDataElement(tag, vr, length, value, offset, implicit, True, True)
    return PlainDataset(elements, syntax, has_pixels=pixels is not None)


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
            if (not want_pixels and len(data) == HEAD_BYTES and (plain is None or not plain.has_pixels)
                    and data[128:132] == b"DICM"):
                plain = parse(data + f.read(), want_pixels)  # a DICOM header longer than HEAD_BYTES
            return plain
    except FileNotFoundError:
        raise
    except OSError:
        return None
