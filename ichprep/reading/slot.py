"""The HU image of one slot of a store: one file's slice, or a slab's mean over its member slices.

A slot is a :class:`~ichprep.reading.source.Member` (one DICOM file, or one slice ``VOLUME#k`` of a
NIfTI volume) or a tuple of them (a slab of
consecutive thin slices, :mod:`ichprep.reading.slabs`).  Every member is read the way its source says
(a local file by path, a zip member or an object by its bytes), so this is the one path from a
slot's files to the HU image the converter windows.
"""

from __future__ import annotations

import numpy as np

from .. import scratch
from ..errors import UnsupportedImageError
from .dicomio import read_slice
from .nifti import is_volume, read_volume_slice, split_frame
from .source import Member, Source, by_path, limits_of, read_member

Slot = Member | tuple[Member, ...]


def member_hu(member: Member, source: Source | None, reuse: bool = False) -> np.ndarray:
    """HU of one member: a DICOM file, or one slice (``VOLUME#k``) of a NIfTI volume.

    With ``reuse`` the image is valid until the next ``reuse=True`` read in this thread.
    """
    limits = limits_of(source)
    if is_volume(member.path):
        volume, _ = split_frame(member.path)
        data = None if by_path(source, member) else read_member(source, member._replace(path=volume))
        return read_volume_slice(member.path, data=data, limits=limits)
    if by_path(source, member):
        limits.check_file(member.path, member.size)  # its size when scanned: read_member checks the others
        return read_slice(member.path, reuse=reuse).hu
    return read_slice(member.path, reuse=reuse, data=read_member(source, member, reuse=reuse)).hu


def slot_hu(slot: Slot, source: Source | None, reuse: bool = False) -> np.ndarray:
    """HU of a slot: a member's slice, or the mean of a slab's member slices (float32, summed in float64).

    Raises
    ------
    DicomReadError
        A member that does not read (the slab fails with it), or members of different sizes.
    """
    if isinstance(slot, Member):
        return member_hu(slot, source, reuse=reuse)
    first = member_hu(slot[0], source, reuse=reuse)
    total = scratch.array("slab", first.shape, np.float64) if reuse else np.empty(first.shape, np.float64)
    total[...] = first
    for member in slot[1:]:
        hu = member_hu(member, source, reuse=reuse)
        if hu.shape != total.shape:
            raise UnsupportedImageError(
                member.path, f"slab member has shape {hu.shape}, the slab's first slice {total.shape}"
            )
        total += hu
    out = scratch.array("slab_mean", first.shape, np.float32) if reuse else np.empty(first.shape, np.float32)
    np.divide(total, len(slot), out=out, casting="same_kind")
    return out
