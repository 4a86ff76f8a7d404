"""Synthetic head-CT archives laid out like the outside archives a model trained on RSNA 2019 is judged on.

Two layouts beside synth.py's Kaggle one (:data:`LAYOUTS`), drawn with synth.py's planning and rendering
(head geometry, lesions, labels from the lesion pixels drawn) but from their own random streams (spawn
keys 20-31; synth.py uses 0-4), so the Kaggle layout's draws and bytes never change. Same arguments,
same bytes: UIDs are hashes of the seed, zips carry fixed dates, nothing comes from the clock.

**hospital** (CQ500-style, :func:`generate_hospital`)::

    OUT/CQ500CT<N> CQ500CT<N>/Unknown Study/CT <SeriesDescription>/CT000000.dcm, CT000001.dcm, ...
    OUT/reads.csv  OUT/series_truth.csv  OUT/study_truth.csv

or with ``as_zip`` one zip per study, ``OUT/CQ500-CT-<N>.zip``, holding that study's folder tree. File
names restart in every series. A study holds several of the :data:`SERIES_KINDS` (SeriesNumber in that
order, 1, 2, ...): ``localizer`` (1-2 scouts: a lateral one, IOP [0,1,0,0,0,-1], and an AP one,
[1,0,0,0,0,-1]; ImageType ORIGINAL\\PRIMARY\\LOCALIZER; no SliceThickness), ``thick_soft`` (5 mm,
soft-tissue kernel, no contrast: the series a model reads), ``bone`` (same positions, bone kernel,
sharpened and noisier), ``thin`` (0.625 or 1.25 mm, soft-tissue, HU linearly interpolated along z between
the 5 mm renderings, so its 5 mm average comes back close to them), ``contrast`` (5 mm, soft-tissue,
ContrastBolusAgent OMNIPAQUE, brain a little brighter), ``dose`` (one Secondary Capture screen save,
Modality CT, no geometry). About one study in five is *thin-only* (thin series, no 5 mm one). A tilted
study has every axial series' IOP rotated 12-20 degrees about the x axis (``[1, 0, 0, 0, cos, -sin]``),
positions stepping along the tilted normal; a *repeated position* is one extra file (last InstanceNumber,
other SOPInstanceUID and noise) at the position of another; a *gap* is one interior position left out
(its InstanceNumber is missing too). Both are put on the expected series. Kernels come from
:data:`VENDORS`. Study 0 always bleeds and is never thin-only; in an archive of two or more studies
every kind, a thin-only study, a tilt, a repeat and a gap appear at least once (so a study's series,
unlike its head and lesions, depend on the number of studies).

``series_truth.csv`` (:data:`SERIES_TRUTH_COLUMNS`) is this archive's ground truth per series, for tests
and demos: ``expected`` = 1 for the series a 5 mm non-contrast soft-tissue model should read (the
thick_soft one, or the thin one of a thin-only study). ``study_truth.csv`` (:data:`STUDY_TRUTH_COLUMNS`)
holds the true six labels per study, the OR of the per-slice labels of the 5 mm rendering.
``reads.csv`` (:data:`READS_COLUMNS`) has CQ500's form: per reader R1-R3 the :data:`READ_FINDINGS`
(ICH = any of IPH, IVH, SDH, EDH, SAH; EDH = epidural, IPH = intraparenchymal, IVH = intraventricular,
SAH = subarachnoid, SDH = subdural), each reader flipping each finding of the truth independently with
probability :data:`READER_FLIP`, so the majority of three mostly equals the truth. Bleed side comes from
where the lesions lie; mass effect and midline shift from large EDH/SDH/IPH; no fracture or chronic bleed
is drawn (their truth is 0).

**nifti** (PhysioNet CT-ICH-style, :func:`generate_nifti`)::

    OUT/ct_scans/049.nii, 050.nii, ...   (or .nii.gz)   int16 HU, 5 mm slices
    OUT/masks/049.nii, ...                               uint8, 255 on drawn lesion pixels
    OUT/hemorrhage_diagnosis_raw_ct.csv                 one row per slice (NIFTI_COLUMNS)

SliceNumber is 1-based in voxel order of the slice axis (the third); labels are synth.slice_labels of
the slice's lesion pixels; Fracture_Yes_No is 0 (none drawn). Every volume stores scl_slope 1; volume
050 (the second) stores raw = HU + 1024 with scl_inter -1024 (the others scl_inter 0), so a reader
must apply the scaling; volume 051 (the third) stores its slices top to bottom (affine z step -5 mm).

*NIfTI orientation.* A rendered slice is a 2D HU image shown the DICOM way: row index r from anterior to
posterior, column index c from patient right to left (LPS, as an axial DICOM image with IOP
[1,0,0,0,1,0] and IPP ``(-cols/2 * s, -rows/2 * s, z)`` for pixel spacing s). Slice number z (0 = lowest)
is stored as ``data[i, j, k] = image[rows - 1 - j, i]`` with k = z (k = n - 1 - z in volume 051), that is
``image == data[:, ::-1, k].T`` (== ``np.rot90(data[:, :, k])``): voxel axis i runs to the patient's
left, j to anterior, k to superior (nibabel axis codes L, A, S). The affine
(sform and qform, code 1, RAS mm) is ``[[-s, 0, 0, cols/2 * s], [0, s, 0, rows/2 * s - (rows - 1) * s],
[0, 0, 5, z0], [0, 0, 0, 1]]`` (volume 051: z column -5, origin z0 + 5 (n - 1)), so a voxel's world
position is its pixel's DICOM position with x and y negated. A reader that uses the affine, e.g.
``c = nib.as_closest_canonical(img).get_fdata(); image = c[::-1, ::-1, z].T``, reads all volumes alike.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from . import synth
from .reading.labels import CTICH_COLUMNS, LABELS
from .synth import (
    LESION_CODE,
    MIN_LESION_PIXELS,
    SLICE_MM,
    StudyGeometry,
    StudyPlan,
    _rng,
    _uid,
    clean_slice,
    encode_hu,
    slice_labels,
    slice_noise,
)

logger = logging.getLogger(__name__)

LAYOUTS = ("kaggle", "hospital", "nifti")
REFERENCE_SIZE = 512  # synth's geometry (pixel spacing, min_lesion_pixels) is meant for 512 x 512 images
SIZE_RANGE = (64, 1024)  # the noise bank is 1024 x 1024


class Vendor(NamedTuple):
    manufacturer: str
    soft: tuple[str, ...]  # ConvolutionKernel of soft-tissue (brain) reconstructions
    bone: tuple[str, ...]


# The one place the synthetic archive's kernel names come from; add a vendor here to vary them further.
VENDORS: dict[str, Vendor] = {
    "GE": Vendor("GE MEDICAL SYSTEMS", ("STANDARD", "SOFT"), ("BONE", "BONEPLUS")),
    "SIEMENS": Vendor("SIEMENS", ("H30s", "J30s", "Hr38"), ("H60s", "H70h", "J70h")),
    "TOSHIBA": Vendor("TOSHIBA", ("FC21",), ("FC30",)),
}
SERIES_KINDS = ("localizer", "thick_soft", "bone", "thin", "contrast", "dose")  # also SeriesNumber order
AXIAL_KINDS = ("thick_soft", "bone", "thin", "contrast")
THICK_DESCRIPTIONS = ("5mm", "Plain", "PRE CONTRAST 5MM STD")
DESCRIPTIONS = {"bone": "BONE", "contrast": "4cc sec 150cc D3D on", "localizer": "SCOUT", "dose": "Dose Report"}
THIN_MM = (0.625, 1.25)
CONTRAST_AGENT = "OMNIPAQUE"
TILT_DEG = (12.0, 20.0)
HOSPITAL_SLICES, NIFTI_SLICES = (24, 33), (28, 37)  # slice count ranges (high exclusive) of the 5 mm volume
THIN_ONLY_SHARE = 0.2  # of the studies after study 0: a thin series replaces the 5 mm, bone and contrast ones
# Chance per study of each other feature.
RATES = {
    "bone": 0.7,
    "thin": 0.45,
    "contrast": 0.25,
    "localizer": 0.7,
    "dose": 0.35,
    "tilt": 0.2,
    "repeated": 0.2,
    "gap": 0.15,
}
WINDOWS = {"bone": (500.0, 2500.0), "localizer": (1000.0, 3000.0)}  # others: synth's brain window (40, 80)
BONE_SHARPEN, BONE_NOISE_HU, CONTRAST_HU = 1.5, 25.0, 8.0
SCOUT_GAIN = 3.0  # scout value = gain * mean attenuation (HU + 1000) along the ray - 1000
CTDI_VOL = 55.0  # mGy, a head protocol's; only printed on the dose screen
STUDY_DIR = "Unknown Study"
READS_CSV, SERIES_TRUTH_CSV, STUDY_TRUTH_CSV = "reads.csv", "series_truth.csv", "study_truth.csv"
READERS = ("R1", "R2", "R3")
READ_FINDINGS = (
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
)
CQ500_SUBTYPES = {
    "IPH": "intraparenchymal",
    "IVH": "intraventricular",
    "SDH": "subdural",
    "EDH": "epidural",
    "SAH": "subarachnoid",
}
READER_FLIP = 0.06  # chance that a reader reads a finding the other way
READS_COLUMNS = ("name", "Category", *(f"{r}:{f}" for r in READERS for f in READ_FINDINGS))
SERIES_TRUTH_COLUMNS = (
    "study_folder",
    "series_folder",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "kind",
    "description",
    "kernel",
    "thickness",
    "n_files",
    "expected",
    "tilted",
    "tilt_deg",
    "repeated_position",
    "gap",
)
STUDY_TRUTH_COLUMNS = ("study_folder", "name", "StudyInstanceUID", "PatientID", *LABELS)
FIRST_NIFTI_NUMBER = 49  # CT-ICH's first PatientNumber
CT_DIR, MASK_DIR, NIFTI_CSV = "ct_scans", "masks", "hemorrhage_diagnosis_raw_ct.csv"
NIFTI_COLUMNS = (*CTICH_COLUMNS, "Fracture_Yes_No")
SCALED_VOLUME, REVERSED_VOLUME = 1, 2  # volume indices (050, 051) with scl_inter -1024 / slices top down
SCALED_INTERCEPT = -1024.0
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Spawn keys of this module's random streams (synth.py uses 0-4).
_K_PLAN, _K_GEOMETRY, _K_REPEAT = 20, 21, 26
_K_NOISE = {"thick_soft": 22, "bone": 23, "contrast": 24, "thin": 25}
_K_NIFTI_GEOMETRY, _K_NIFTI_NOISE = 30, 31


# ----------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class SeriesPlan:
    number: int  # SeriesNumber
    kind: str  # one of SERIES_KINDS
    description: str  # SeriesDescription; the folder is "CT <description>"
    kernel: str  # ConvolutionKernel; "" for localizer and dose
    thickness: float | None  # mm; None for localizer and dose
    n_positions: int  # slice positions (images for localizer and dose), before gap and repeat
    tilt_deg: float = 0.0
    repeated: int | None = None  # position index written twice
    gap: int | None = None  # position index left out
    expected: bool = False

    @property
    def folder(self) -> str:
        return f"CT {self.description}"

    @property
    def n_files(self) -> int:
        return self.n_positions - (self.gap is not None) + (self.repeated is not None)


@dataclass(frozen=True)
class HospitalStudy:
    index: int
    geometry: StudyGeometry  # at REFERENCE_SIZE; rendering rescales the pixel spacing to the image size
    vendor: str  # a key of VENDORS
    storage: str  # a key of synth.STORAGE
    category: str  # CQ500's batch, B1 or B2
    series: tuple[SeriesPlan, ...]
    reader_flips: tuple[frozenset[str], ...]  # per reader, the READ_FINDINGS read the other way

    @property
    def name(self) -> str:
        return f"CQ500-CT-{self.index}"

    @property
    def folder(self) -> str:
        return f"CQ500CT{self.index} CQ500CT{self.index}"

    @property
    def patient_id(self) -> str:
        return self.name

    @property
    def thin_only(self) -> bool:
        return not any(s.kind == "thick_soft" for s in self.series)

    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.series)


@dataclass
class _Draws:
    """A study's random choices, before the archive-wide coverage fix-up."""

    has: dict[str, bool]
    vendor: str
    picks: tuple[float, ...]  # soft kernel, bone kernel, thick description, thin thickness
    tilt_deg: float
    n_scouts: int
    repeat_at: float  # where along the expected series (0-1) the repeat and the gap fall
    gap_at: float
    category: str
    storage: str
    flips: tuple[frozenset[str], ...]


def _draw_study(seed: int, k: int) -> _Draws:
    rng = _rng(seed, _K_PLAN, k)
    # (every draw is made whatever the outcome, so each study consumes the same random numbers)
    has = {name: bool(x < p) for (name, p), x in zip(RATES.items(), rng.random(len(RATES)).tolist())}
    vendor = list(VENDORS)[int(rng.integers(len(VENDORS)))]
    picks = tuple(rng.random(4).tolist())
    tilt_deg = round(float(rng.uniform(*TILT_DEG)), 1)
    n_scouts = 1 + int(rng.random() < 0.5)
    repeat_at, gap_at = rng.random(2).tolist()
    category = "B1" if rng.random() < 0.5 else "B2"
    storage = "s16" if rng.random() < 0.3 else "u16"
    flip = rng.random((len(READERS), len(READ_FINDINGS))) < READER_FLIP
    flips = tuple(frozenset(f for f, x in zip(READ_FINDINGS, row) if x) for row in flip.tolist())
    return _Draws(has, vendor, picks, tilt_deg, n_scouts, repeat_at, gap_at, category, storage, flips)


def _cover(draws: list[_Draws], seed: int) -> None:
    """Choose the thin-only studies, and make every series kind, a tilt, a repeat and a gap appear: small
    archives then still exercise every case a converter must handle."""
    rng, n = _rng(seed, _K_PLAN), len(draws)
    # A fixed share, not a draw per study: "about one in five" holds for every seed.
    n_thin_only = max(1, round(THIN_ONLY_SHARE * n)) if n >= 2 else 0
    thin_only = set(rng.choice(np.arange(1, n), size=n_thin_only, replace=False).tolist()) if n_thin_only else set()
    for k, d in enumerate(draws):
        d.has["thin_only"] = k in thin_only  # study 0 is always a full study
    full = [k for k, d in enumerate(draws) if not d.has["thin_only"]]  # never empty: study 0 is full
    for name in ("bone", "thin", "contrast"):
        if not any(draws[k].has[name] for k in full):
            draws[full[int(rng.integers(len(full)))]].has[name] = True
    for name in ("localizer", "dose", "tilt", "repeated", "gap"):
        if not any(d.has[name] for d in draws):
            draws[int(rng.integers(n))].has[name] = True


def _index_at(fraction: float, n: int) -> int:
    """An interior position (1 .. n-2) at a fraction of the series."""
    return 1 + min(int(fraction * (n - 2)), n - 3)


def _series(geom: StudyGeometry, d: _Draws) -> tuple[SeriesPlan, ...]:
    vendor, n, has = VENDORS[d.vendor], geom.n_slices, d.has
    soft = vendor.soft[int(d.picks[0] * len(vendor.soft))]
    bone = vendor.bone[int(d.picks[1] * len(vendor.bone))]
    thin_mm = THIN_MM[int(d.picks[3] * len(THIN_MM))]
    tilt = d.tilt_deg if has["tilt"] else 0.0
    thin_only = has["thin_only"]
    # (kind, description, kernel, thickness, positions) of the series present, in SERIES_KINDS order
    specs = [
        ("localizer", DESCRIPTIONS["localizer"], "", None, d.n_scouts) if has["localizer"] else None,
        None if thin_only else ("thick_soft", THICK_DESCRIPTIONS[int(d.picks[2] * 3)], soft, SLICE_MM, n),
        ("bone", DESCRIPTIONS["bone"], bone, SLICE_MM, n) if has["bone"] and not thin_only else None,
        ("thin", f"{thin_mm:g}mm", soft, thin_mm, round(n * SLICE_MM / thin_mm)) if has["thin"] or thin_only else None,
        ("contrast", DESCRIPTIONS["contrast"], soft, SLICE_MM, n) if has["contrast"] and not thin_only else None,
        ("dose", DESCRIPTIONS["dose"], "", None, 1) if has["dose"] else None,
    ]
    expected_kind = "thin" if thin_only else "thick_soft"
    series = []
    for kind, description, kernel, thickness, positions in filter(None, specs):
        expected = kind == expected_kind
        repeated = _index_at(d.repeat_at, positions) if expected and has["repeated"] else None
        gap = _index_at(d.gap_at, positions) if expected and has["gap"] else None
        if gap is not None and gap == repeated:  # the repeat needs its original beside it
            gap = gap + 1 if gap + 1 <= positions - 2 else gap - 1
        series.append(
            SeriesPlan(
                number=len(series) + 1,
                kind=kind,
                description=description,
                kernel=kernel,
                thickness=thickness,
                n_positions=positions,
                tilt_deg=tilt if kind in AXIAL_KINDS else 0.0,
                repeated=repeated,
                gap=gap,
                expected=expected,
            )
        )
    return tuple(series)


def plan_hospital(
    studies: int, seed: int = 0, *, lesion_rate: float = 0.4, min_lesion_pixels: int = MIN_LESION_PIXELS
) -> list[HospitalStudy]:
    """Everything about a hospital-layout archive except pixels: per study its lesions and series."""
    _check_common(studies=studies, seed=seed, lesion_rate=lesion_rate, min_lesion_pixels=min_lesion_pixels)
    draws = [_draw_study(seed, k) for k in range(studies)]
    _cover(draws, seed)
    plans = []
    for k, d in enumerate(draws):
        geom = synth._study_geometry(
            _rng(seed, _K_GEOMETRY, k),
            force_lesion=k == 0,
            lesion_rate=lesion_rate,
            min_lesion_pixels=min_lesion_pixels,
            slices=HOSPITAL_SLICES,
        )
        plans.append(HospitalStudy(k, geom, d.vendor, d.storage, d.category, _series(geom, d), d.flips))
    return plans


# ---------------------------------------------------------------------------------------------- rendering
def _at_size(geom: StudyGeometry, size: int) -> StudyGeometry:
    """The same head at another image size: pixel spacing and the pixel threshold scale with it."""
    f = REFERENCE_SIZE / size
    return replace(geom, spacing=geom.spacing * f, min_lesion_pixels=max(1, round(geom.min_lesion_pixels / f**2)))


class Rendered(NamedTuple):
    """A study's 5 mm rendering, by slice index (z ascending)."""

    geometry: StudyGeometry  # at the image size
    clean: np.ndarray  # (n, rows, cols) float32 HU without noise
    pixels: list[dict[str, int]]  # visible lesion pixels per subtype
    lesion_mask: np.ndarray | None  # (n, rows, cols) bool, where codes were asked for


def render_volume(geom: StudyGeometry, size: int, masks: bool = False) -> Rendered:
    """The noise-free 5 mm slices of a study at ``size`` x ``size`` (and its drawn lesion pixels)."""
    g, shape = _at_size(geom, size), (size, size)
    slices = [clean_slice(g, z, shape, codes=masks) for z in range(g.n_slices)]
    clean = np.stack([s[0] for s in slices])
    mask = np.stack([s[2] >= LESION_CODE for s in slices]) if masks else None
    return Rendered(g, clean, [s[1] for s in slices], mask)


def study_labels(rendered: Rendered) -> dict[str, int]:
    """The six labels of a study: a label is 1 where any 5 mm slice shows it."""
    per_slice = [slice_labels(p, rendered.geometry.min_lesion_pixels) for p in rendered.pixels]
    return {label: max(s[label] for s in per_slice) for label in LABELS}


def _interpolate(clean: np.ndarray, thickness: float, pos: int) -> np.ndarray:
    """HU between the 5 mm slices around a thin slice's centre, linear along z."""
    f = min(max((pos + 0.5) * thickness / SLICE_MM - 0.5, 0.0), len(clean) - 1.0)
    a = int(f)
    b, w = min(a + 1, len(clean) - 1), np.float32(f - a)
    return clean[a] * (1 - w) + clean[b] * w


def _thin(clean: np.ndarray, thickness: float, pos: int) -> np.ndarray:
    """A thin slice's noise-free HU: the interpolation, shifted so the thin slices of each 5 mm slab average to
    that 5 mm slice exactly (a 5 mm slice is the sum of the thin ones it spans, as a scanner reconstructs it)."""
    per = round(SLICE_MM / thickness)
    k = min(pos // per, len(clean) - 1)
    mean = np.mean([_interpolate(clean, thickness, m) for m in range(k * per, (k + 1) * per)], axis=0)
    return _interpolate(clean, thickness, pos) + (clean[k] - mean)


def axial_hu(
    seed: int, study: HospitalStudy, series: SeriesPlan, rendered: Rendered, pos: int, repeat: bool = False
) -> np.ndarray:
    """HU image (float32) of an axial series' position ``pos``; ``repeat``: the repeated file's other noise."""
    if series.kind == "thin":  # thinner slices hold fewer photons: noise grows as 1 / sqrt(thickness)
        base = _thin(rendered.clean, series.thickness, pos)
        noise_scale = math.sqrt(SLICE_MM / series.thickness)
    else:
        base, noise_scale = rendered.clean[pos].copy(), 1.0
    if series.kind == "bone":  # a sharp kernel: edges enhanced, noise amplified
        base += BONE_SHARPEN * (base - cv2.GaussianBlur(base, (0, 0), 1.0))
    if series.kind == "contrast":  # enhancing brain (iodine in the capillaries), not blood or CSF
        base += np.where((base > 15) & (base < 50), np.float32(CONTRAST_HU), np.float32(0))
    rng = _rng(seed, _K_REPEAT, study.index) if repeat else _rng(seed, _K_NOISE[series.kind], study.index, pos)
    hu = base + np.float32(noise_scale) * slice_noise(base.shape, rng)
    if series.kind == "bone":
        hu += np.float32(BONE_NOISE_HU) * rng.standard_normal(base.shape, dtype=np.float32)
    return hu


def _scout_hu(rendered: Rendered, lateral: bool) -> np.ndarray:
    """A projection radiograph of the 5 mm volume: lateral (along x) or AP (along y), head up."""
    attenuation = np.clip(rendered.clean + 1000, 0, None)
    projection = attenuation.mean(axis=2 if lateral else 1)[::-1]  # (z from the top, y or x)
    height = max(1, round(len(rendered.clean) * SLICE_MM / rendered.geometry.spacing))
    image = cv2.resize(projection, (projection.shape[1], height), interpolation=cv2.INTER_LINEAR)
    return SCOUT_GAIN * image - 1000


def _dose_pixels(study: HospitalStudy, size: int) -> np.ndarray:
    """A dose report screen: white text on black, 8 bits."""
    image = np.zeros((size, size), np.uint8)
    length_cm = study.geometry.n_slices * SLICE_MM / 10
    lines = ["Dose Report", f"Patient ID: {study.patient_id}", "Series  Type    CTDIvol  DLP"]
    acquisitions = [
        s for s in study.series if s.kind in ("thick_soft", "contrast") or (s.kind == "thin" and s.expected)
    ]
    lines += [f"{s.number:<7} Helical {CTDI_VOL:.1f}  {CTDI_VOL * length_cm:.1f}" for s in acquisitions]
    lines.append(f"Total Exam DLP: {CTDI_VOL * length_cm * len(acquisitions):.1f} mGy-cm")
    scale = 0.5 * size / REFERENCE_SIZE
    for i, text in enumerate(lines):
        cv2.putText(image, text, (size // 25, (i + 1) * size // 16), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1)
    return image


# ------------------------------------------------------------------------------------------------ writing
def _ds(value: float, digits: int) -> str:
    """A DS value: fixed decimals, trailing zeros and negative zero dropped (DS holds 16 characters)."""
    text = f"{round(value, digits) + 0.0:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _axial_frame(geom: StudyGeometry, series: SeriesPlan, pos: int, shape: tuple[int, int]):
    """ImageOrientationPatient and ImagePositionPatient of an axial slice, tilted about x by the series' tilt."""
    a = math.radians(series.tilt_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(a), -math.sin(a)])
    offset = SLICE_MM * pos if series.kind != "thin" else (pos + 0.5) * series.thickness - SLICE_MM / 2
    center = np.array([0.0, 0.0, geom.z0]) + offset * np.cross(row, col)
    rows, cols = shape
    ipp = center - (cols / 2) * geom.spacing * row - (rows / 2) * geom.spacing * col
    return [_ds(v, 6) for v in (*row, *col)], [_ds(v, 3) for v in ipp]


def _series_tags(ds: Dataset, seed: int, study: HospitalStudy, series: SeriesPlan, instance: int) -> None:
    """What every file of a series shares, and its instance number."""
    ds.PatientID, ds.PatientName = study.patient_id, study.patient_id
    ds.StudyInstanceUID = _uid(seed, "hospital", study.index, "study")
    ds.SeriesInstanceUID = _uid(seed, "hospital", study.index, series.number, "series")
    ds.SeriesNumber, ds.InstanceNumber = series.number, instance
    ds.SeriesDescription, ds.Manufacturer, ds.BodyPartExamined = series.description, VENDORS[study.vendor][0], "HEAD"


def _ct_file(seed: int, study: HospitalStudy, series: SeriesPlan, j: int, instance: int, hu, geom, frame) -> bytes:
    """A CT image file built by synth._dataset, re-keyed to this study, series and file."""
    plan = StudyPlan(study.index, geom, study.patient_id, (), study.storage, WINDOWS.get(series.kind, (40.0, 80.0)))
    ds = synth._dataset(seed, plan, 0, encode_hu(hu, study.storage), study.storage, set(), 0)
    ds.SOPInstanceUID = _uid(seed, "hospital", study.index, series.number, j, "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _series_tags(ds, seed, study, series, instance)
    ds.ImageOrientationPatient, ds.ImagePositionPatient = frame
    if series.kind == "localizer":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        del ds.SliceThickness  # a projection has no slice thickness
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness, ds.ConvolutionKernel = series.thickness, series.kernel
    if series.kind == "contrast":
        ds.ContrastBolusAgent = CONTRAST_AGENT
    return synth._dicom_bytes(ds)


def _dose_file(seed: int, study: HospitalStudy, series: SeriesPlan, size: int) -> bytes:
    """A Secondary Capture screen save: no geometry, 8-bit monochrome."""
    sop_uid = _uid(seed, "hospital", study.index, series.number, 0, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SECONDARY_CAPTURE, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, synth.IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICHKIT_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.StudyID = SECONDARY_CAPTURE, sop_uid, "CT", ""
    _series_tags(ds, seed, study, series, 1)
    ds.ImageType, ds.ConversionType = ["DERIVED", "SECONDARY", "SCREEN SAVE"], "WSD"
    pixels = _dose_pixels(study, size)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return synth._dicom_bytes(ds)


def _files(series: SeriesPlan) -> list[tuple[int, int, bool]]:
    """(InstanceNumber, position, is the repeat) of each file, in file-name order; the repeat comes last."""
    files = [(p + 1, p, False) for p in range(series.n_positions) if p != series.gap]
    if series.repeated is not None:
        files.append((series.n_positions + 1, series.repeated, True))
    return files


def _series_files(seed: int, study: HospitalStudy, series: SeriesPlan, rendered: Rendered, size: int):
    """The (file name, bytes) of a series, CT000000.dcm first."""
    geom, shape = rendered.geometry, (size, size)
    if series.kind == "dose":
        yield "CT000000.dcm", _dose_file(seed, study, series, size)
        return
    for j, (instance, pos, repeat) in enumerate(_files(series)):
        if series.kind == "localizer":
            lateral = pos == 0  # first the lateral scout, then the AP one
            hu = _scout_hu(rendered, lateral)
            top = geom.z0 + SLICE_MM * (len(rendered.clean) - 0.5)
            corner = (0.0, -(size / 2) * geom.spacing, top) if lateral else (-(size / 2) * geom.spacing, 0.0, top)
            iop = [0, 1, 0, 0, 0, -1] if lateral else [1, 0, 0, 0, 0, -1]
            frame = (iop, [_ds(v, 3) for v in corner])
        else:
            hu, frame = axial_hu(seed, study, series, rendered, pos, repeat), _axial_frame(geom, series, pos, shape)
        yield f"CT{j:06d}.dcm", _ct_file(seed, study, series, j, instance, hu, geom, frame)


def _write_hospital_study(seed: int, study: HospitalStudy, size: int, out) -> dict[str, int]:
    """Render and write a study's series under ``out`` (a synth _FolderOut or _ZipOut); returns its labels."""
    rendered = render_volume(study.geometry, size)
    out.mkdir(STUDY_DIR)
    for series in study.series:
        folder = f"{STUDY_DIR}/{series.folder}"
        out.mkdir(folder)
        for name, data in _series_files(seed, study, series, rendered, size):
            out.write(f"{folder}/{name}", data)
    return study_labels(rendered)


def _side(lesion) -> str:
    """left, right or both: where a lesion lies (synth's grid: u > 0 is LPS +x, the patient's left)."""
    if lesion.subtype == "intraventricular":
        return {0: "right", 1: "left", 2: "both"}[int(lesion.angle)]
    return "left" if math.cos(lesion.angle) > 0 else "right"


def true_findings(study: HospitalStudy, labels: dict[str, int]) -> dict[str, int]:
    """The READ_FINDINGS that hold for a study with these labels."""
    found = {abbr: labels[subtype] for abbr, subtype in CQ500_SUBTYPES.items()} | {"ICH": labels["any"]}
    shown = [les for les in study.geometry.lesions if labels[les.subtype]]
    sides = {_side(les) for les in shown}
    found["BleedLocation-Left"] = int(bool(sides & {"left", "both"}))
    found["BleedLocation-Right"] = int(bool(sides & {"right", "both"}))
    big = [les.size for les in shown if les.subtype in ("epidural", "subdural", "intraparenchymal")]
    found["MassEffect"] = int(any(s >= 10 for s in big))
    found["MidlineShift"] = int(any(s >= 13 for s in big))
    return {f: found.get(f, 0) for f in READ_FINDINGS}  # no fracture or chronic bleed is drawn


def reads_row(study: HospitalStudy, labels: dict[str, int]) -> dict[str, object]:
    """A study's reads.csv row: each reader's findings, the truth with that reader's flips."""
    truth, row = true_findings(study, labels), {"name": study.name, "Category": study.category}
    for reader, flips in zip(READERS, study.reader_flips):
        read = {f: truth[f] ^ (f in flips) for f in READ_FINDINGS}
        # A reader who reads a subtype reads ICH: each reader's row is consistent, as a reader's own form is.
        read["ICH"] = max(read["ICH"], *(read[f] for f in CQ500_SUBTYPES))
        row |= {f"{reader}:{f}": value for f, value in read.items()}
    return row


def _series_truth(seed: int, study: HospitalStudy) -> list[dict[str, object]]:
    return [
        {
            "study_folder": study.folder,
            "series_folder": s.folder,
            "StudyInstanceUID": _uid(seed, "hospital", study.index, "study"),
            "SeriesInstanceUID": _uid(seed, "hospital", study.index, s.number, "series"),
            "SeriesNumber": s.number,
            "kind": s.kind,
            "description": s.description,
            "kernel": s.kernel,
            "thickness": "" if s.thickness is None else f"{s.thickness:g}",
            "n_files": s.n_files,
            "expected": int(s.expected),
            "tilted": int(s.tilt_deg != 0),
            "tilt_deg": f"{s.tilt_deg:g}",
            "repeated_position": int(s.repeated is not None),
            "gap": int(s.gap is not None),
        }
        for s in study.series
    ]


def _write_csv(path: Path, columns: Iterable[str], rows: Iterable[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


class HospitalSummary(NamedTuple):
    out_dir: Path
    studies: tuple[Path, ...]  # study folders, or with as_zip the zips
    reads_csv: Path
    series_truth_csv: Path
    study_truth_csv: Path
    n_studies: int
    n_series: int
    n_files: int
    n_positive_studies: int
    kinds: dict[str, int]  # series kind -> number of series
    n_thin_only: int
    zipped: bool


def generate_hospital(
    out_dir: str | os.PathLike,
    studies: int,
    seed: int = 0,
    *,
    as_zip: bool = False,
    size: int = REFERENCE_SIZE,
    lesion_rate: float = 0.4,
    min_lesion_pixels: int = MIN_LESION_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> HospitalSummary:
    """Write a CQ500-style archive of ``studies`` studies to the folder ``out_dir``; same arguments, same bytes.

    ``as_zip``: one zip per study (``CQ500-CT-<N>.zip``, deflated) instead of its folder. ``size``: image rows
    and columns of the axial series (the head keeps its size in mm; the pixel spacing grows). ``progress``
    is called with the number of files of each study written.
    """
    _check_common(studies=studies, seed=seed, lesion_rate=lesion_rate, min_lesion_pixels=min_lesion_pixels)
    _check_size(size)
    if not isinstance(as_zip, bool):
        raise ValueError(f"as_zip must be True or False, got {as_zip!r}")
    out_dir = Path(out_dir)
    plans = plan_hospital(studies, seed, lesion_rate=lesion_rate, min_lesion_pixels=min_lesion_pixels)
    targets = [out_dir / (f"{s.name}.zip" if as_zip else s.folder) for s in plans]
    csvs = [out_dir / name for name in (READS_CSV, SERIES_TRUTH_CSV, STUDY_TRUTH_CSV)]
    _check_new(out_dir, [*targets, *csvs])
    out_dir.mkdir(parents=True, exist_ok=True)
    reads, series_rows, study_rows = [], [], []
    for study, target in zip(plans, targets):
        if as_zip:
            with synth._zip_out(target, zipfile.ZIP_DEFLATED, top=study.folder) as out:
                labels = _write_hospital_study(seed, study, size, out)
        else:
            labels = _write_hospital_study(seed, study, size, synth._FolderOut(target))
        reads.append(reads_row(study, labels))
        series_rows += _series_truth(seed, study)
        study_uid = _uid(seed, "hospital", study.index, "study")
        study_rows.append(
            {"study_folder": study.folder, "name": study.name, "StudyInstanceUID": study_uid}
            | {"PatientID": study.patient_id}
            | labels
        )
        logger.debug("hospital study %d: series %s, labels %s", study.index, study.kinds(), labels)
        if progress is not None:
            progress(sum(s.n_files for s in study.series))
    _write_csv(csvs[0], READS_COLUMNS, reads)
    _write_csv(csvs[1], SERIES_TRUTH_COLUMNS, series_rows)
    _write_csv(csvs[2], STUDY_TRUTH_COLUMNS, study_rows)
    kinds = {kind: sum(r["kind"] == kind for r in series_rows) for kind in SERIES_KINDS}
    summary = HospitalSummary(
        out_dir=out_dir,
        studies=tuple(targets),
        reads_csv=csvs[0],
        series_truth_csv=csvs[1],
        study_truth_csv=csvs[2],
        n_studies=len(plans),
        n_series=len(series_rows),
        n_files=sum(int(r["n_files"]) for r in series_rows),
        n_positive_studies=sum(r["any"] for r in study_rows),
        kinds=kinds,
        n_thin_only=sum(s.thin_only for s in plans),
        zipped=as_zip,
    )
    logger.info(
        "synth hospital: %d files in %d series of %d studies in %s", summary.n_files, summary.n_series, studies, out_dir
    )
    return summary


# ------------------------------------------------------------------------------------------------- nifti
@dataclass(frozen=True)
class NiftiVolume:
    index: int
    geometry: StudyGeometry  # at REFERENCE_SIZE
    scaled: bool  # stored as HU - SCALED_INTERCEPT with scl_inter SCALED_INTERCEPT
    reversed: bool  # slices stored top to bottom

    @property
    def number(self) -> int:
        return FIRST_NIFTI_NUMBER + self.index

    @property
    def name(self) -> str:
        return f"{self.number:03d}"


def plan_nifti(
    studies: int, seed: int = 0, *, lesion_rate: float = 0.4, min_lesion_pixels: int = MIN_LESION_PIXELS
) -> list[NiftiVolume]:
    """The volumes of a CT-ICH-style set: their heads and lesions, and which is scaled or reversed."""
    _check_common(studies=studies, seed=seed, lesion_rate=lesion_rate, min_lesion_pixels=min_lesion_pixels)
    if studies > 1000 - FIRST_NIFTI_NUMBER:
        raise ValueError(f"studies must be at most {1000 - FIRST_NIFTI_NUMBER} (three-digit names), got {studies}")
    return [
        NiftiVolume(
            k,
            synth._study_geometry(
                _rng(seed, _K_NIFTI_GEOMETRY, k),
                force_lesion=k == 0,
                lesion_rate=lesion_rate,
                min_lesion_pixels=min_lesion_pixels,
                slices=NIFTI_SLICES,
            ),
            scaled=k == SCALED_VOLUME,
            reversed=k == REVERSED_VOLUME,
        )
        for k in range(studies)
    ]


def nifti_hu(seed: int, volume: NiftiVolume, rendered: Rendered) -> np.ndarray:
    """The volume's HU images (n, rows, cols) in display order (z ascending), rounded as stored."""
    noise = [slice_noise(c.shape, _rng(seed, _K_NIFTI_NOISE, volume.index, z)) for z, c in enumerate(rendered.clean)]
    return np.clip(np.rint(rendered.clean + np.stack(noise)), -32768, 32767).astype(np.int16)


def to_voxels(images: np.ndarray, reverse: bool = False) -> np.ndarray:
    """Display-order images (z, r, c) as the voxel array (i, j, k) = (c, rows - 1 - r, z) (see the docstring)."""
    data = images[:, ::-1, :].transpose(2, 1, 0)
    return np.ascontiguousarray(data[:, :, ::-1] if reverse else data)


def nifti_affine(geom: StudyGeometry, shape: tuple[int, int], n: int, reverse: bool = False) -> np.ndarray:
    """RAS affine of to_voxels' array: a voxel sits at its pixel's DICOM (LPS) position with x, y negated."""
    rows, cols = shape
    s, x0, y0 = geom.spacing, -(cols / 2) * geom.spacing, -(rows / 2) * geom.spacing
    dz, z_first = (-SLICE_MM, geom.z0 + SLICE_MM * (n - 1)) if reverse else (SLICE_MM, geom.z0)
    return np.array([[-s, 0, 0, -x0], [0, s, 0, -(y0 + (rows - 1) * s)], [0, 0, dz, z_first], [0, 0, 0, 1]])


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, inter: float, gz: bool) -> bytes:
    """A single-file NIfTI-1 image: data stored as given, scl_slope 1 and scl_inter ``inter``."""
    import nibabel as nib  # only this layout needs it

    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)  # scanner coordinates, in both forms
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header.set_slope_inter(1.0, inter)  # set after creation, nibabel keeps it and writes data unscaled
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw  # mtime 0: the same bytes every run


class NiftiSummary(NamedTuple):
    out_dir: Path
    volumes: tuple[Path, ...]
    masks: tuple[Path, ...]
    labels_csv: Path
    n_volumes: int
    n_slices: int
    n_positive_slices: int
    scaled: tuple[str, ...]  # names of volumes stored with scl_inter SCALED_INTERCEPT
    reversed: tuple[str, ...]  # names of volumes stored top to bottom


def generate_nifti(
    out_dir: str | os.PathLike,
    studies: int,
    seed: int = 0,
    *,
    gz: bool = False,
    size: int = REFERENCE_SIZE,
    lesion_rate: float = 0.4,
    min_lesion_pixels: int = MIN_LESION_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> NiftiSummary:
    """Write a CT-ICH-style set of ``studies`` volumes to the folder ``out_dir``; same arguments, same bytes.

    ``gz``: ``.nii.gz`` instead of ``.nii``. ``size``: rows and columns of each slice. ``progress`` is called
    with each volume's number of slices.
    """
    _check_common(studies=studies, seed=seed, lesion_rate=lesion_rate, min_lesion_pixels=min_lesion_pixels)
    _check_size(size)
    if not isinstance(gz, bool):
        raise ValueError(f"gz must be True or False, got {gz!r}")
    out_dir, suffix = Path(out_dir), ".nii.gz" if gz else ".nii"
    volumes = plan_nifti(studies, seed, lesion_rate=lesion_rate, min_lesion_pixels=min_lesion_pixels)
    _check_new(out_dir, [out_dir / CT_DIR, out_dir / MASK_DIR, out_dir / NIFTI_CSV])
    for folder in (CT_DIR, MASK_DIR):
        (out_dir / folder).mkdir(parents=True)
    rows, ct_paths, mask_paths = [], [], []
    for vol in volumes:
        rendered = render_volume(vol.geometry, size, masks=True)
        hu, n = nifti_hu(seed, vol, rendered), len(rendered.clean)
        affine = nifti_affine(rendered.geometry, (size, size), n, vol.reversed)
        inter = SCALED_INTERCEPT if vol.scaled else 0.0
        stored = (hu.astype(np.int32) - int(inter)).astype(np.int16)
        ct_paths.append(out_dir / CT_DIR / f"{vol.name}{suffix}")
        ct_paths[-1].write_bytes(_nifti_bytes(to_voxels(stored, vol.reversed), affine, inter, gz))
        mask = rendered.lesion_mask.astype(np.uint8) * np.uint8(255)
        mask_paths.append(out_dir / MASK_DIR / f"{vol.name}{suffix}")
        mask_paths[-1].write_bytes(_nifti_bytes(to_voxels(mask, vol.reversed), affine, 0.0, gz))
        order = range(n - 1, -1, -1) if vol.reversed else range(n)
        rows += [_nifti_row(vol, k + 1, rendered, z) for k, z in enumerate(order)]
        if progress is not None:
            progress(n)
    _write_csv(out_dir / NIFTI_CSV, NIFTI_COLUMNS, rows)
    summary = NiftiSummary(
        out_dir=out_dir,
        volumes=tuple(ct_paths),
        masks=tuple(mask_paths),
        labels_csv=out_dir / NIFTI_CSV,
        n_volumes=len(volumes),
        n_slices=len(rows),
        n_positive_slices=sum(1 - r["No_Hemorrhage"] for r in rows),
        scaled=tuple(v.name for v in volumes if v.scaled),
        reversed=tuple(v.name for v in volumes if v.reversed),
    )
    logger.info("synth nifti: %d slices of %d volumes in %s", summary.n_slices, summary.n_volumes, out_dir)
    return summary


def _nifti_row(vol: NiftiVolume, slice_number: int, rendered: Rendered, z: int) -> dict[str, int]:
    labels = slice_labels(rendered.pixels[z], rendered.geometry.min_lesion_pixels)
    row = {"PatientNumber": vol.number, "SliceNumber": slice_number}
    row |= {column: labels[column.lower()] for column in NIFTI_COLUMNS[2:7]}
    return row | {"No_Hemorrhage": 1 - labels["any"], "Fracture_Yes_No": 0}


# ------------------------------------------------------------------------------------------------- checks
def _check_common(*, studies, seed, lesion_rate, min_lesion_pixels) -> None:
    if not synth._is_count(studies, 1):
        raise ValueError(f"studies must be an integer >= 1, got {studies!r}")
    if not synth._is_count(seed, 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not (isinstance(lesion_rate, (int, float)) and 0.0 <= lesion_rate <= 1.0):
        raise ValueError(f"lesion_rate must be between 0 and 1, got {lesion_rate!r}")
    if not synth._is_count(min_lesion_pixels, 1):
        raise ValueError(f"min_lesion_pixels must be an integer >= 1, got {min_lesion_pixels!r}")


def _check_size(size) -> None:
    lo, hi = SIZE_RANGE
    if not synth._is_count(size, lo) or size > hi or size % 2:
        raise ValueError(f"size must be an even integer from {lo} to {hi}, got {size!r}")


def _check_new(out_dir: Path, paths: Iterable[Path]) -> None:
    """Refuse to write over anything: the archive goes into a new or unrelated folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; synth writes a folder there")
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; synth writes a new archive only")
