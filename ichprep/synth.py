"""A synthetic dataset laid out like the Kaggle RSNA 2019 intracranial hemorrhage download.

``generate(out_dir, studies, seed)`` writes ``stage_2_train/ID_<9 hex>.dcm`` (one axial CT slice per
file, flat folder, names unrelated to study or slice order) and ``stage_2_train.csv`` (Kaggle format).
``test_studies=N`` adds a test split of other patients: ``stage_2_test/`` (no labels anywhere) and
``stage_2_sample_submission.csv`` (six rows ``ID_<hex>_<label>,0.5`` per test image). It is planned from
its own seed (``_test_seed``), so the train files are the same bytes whatever ``test_studies`` is.
``as_zip=True`` writes all four into one zip under ``KAGGLE_TOP/``, as Kaggle ships the archive: members
are streamed in one by one, with fixed dates and modes, so the same arguments give the same zip bytes.
Slices show an elliptical head in HU (scalp, skull, CSF rim, cortex, white matter, sulci, lateral
ventricles) and, in about 40% of studies, hemorrhages of the five subtypes with their typical shape and
place. Labels follow the lesion pixels actually drawn. The dataset's known quirks (12-bit wrap-around,
signed storage, multi-valued windows, odd sizes, unlabelled files, one file with truncated pixel data)
are put on a few slices, listed in ``SynthSummary.quirks``.

Everything is deterministic for a seed: study k and slice z draw from their own ``SeedSequence``
(``spawn_key=(1, k, z)``), UIDs and names are hashes of the seed, and no timestamps are written.
Rendering is float32 on a per-study cached coordinate grid, restricted to the head's bounding box, and
noise comes from random crops of one precomputed bank: hundreds of slices per second on one core.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, NamedTuple

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from .reading.labels import LABELS, SUBTYPES

logger = logging.getLogger(__name__)

MIN_LESION_PIXELS = 20  # a lesion with fewer pixels on a slice does not label it
SLICE_MM = 5.0
AIR_HU, SCALP_HU, CSF_HU, GRAY_HU, WHITE_HU, EDEMA_HU = -1000.0, 35.0, 7.0, 38.0, 29.0, 19.0
SCALP_MM, CSF_RIM_MM = 4.0, 1.5
NOISE_SD, TEXTURE_HU, BANK_SIZE = 5.0, 2.5, 1024
LUT_STEP, LUT_START = 0.25, -(SCALP_MM + 2.0)  # depth look-up table: mm per entry, first depth
SPACINGS = (0.429688, 0.449219, 0.46875, 0.488281, 0.5)
ODD_SIZES = ((630, 630), (512, 640), (768, 512))  # (Rows, Columns)
SUBTYPE_WEIGHTS = (0.08, 0.25, 0.18, 0.24, 0.25)  # epidural rarest, as in the real data
QUIRKS = ("truncated_pixels", "wrap12", "signed", "multiwindow", "odd_size", "unlabelled", "reversed_instance_number")
# Normal storage kinds (bits stored, pixel representation, intercept), plus the two quirky ones.
STORAGE = {
    "u16": (16, 0, -1024),
    "u12": (12, 0, -1024),
    "s16": (16, 1, -1024),
    "wrap12": (12, 0, 0),
    "signed": (16, 1, 0),
}
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["ichkit synth implementation"])
# Tissue codes of slice_regions(); lesion i (of StudyGeometry.lesions) is LESION_CODE + i.
AIR, SCALP, BONE, CSF, BRAIN, EDEMA, LESION_CODE = 0, 1, 2, 3, 4, 5, 10
# The Kaggle download: one zip whose top folder holds the two DICOM folders and the two CSVs.
KAGGLE_TOP = "rsna-intracranial-hemorrhage-detection"
TRAIN_DIR, TRAIN_CSV = "stage_2_train", "stage_2_train.csv"
TEST_DIR, SAMPLE_SUBMISSION = "stage_2_test", "stage_2_sample_submission.csv"
SUBMISSION_VALUE = "0.5"
# Test images are all meant to be predicted: none is left out of the CSV or unreadable.
TRAIN_ONLY_QUIRKS = ("truncated_pixels", "unlabelled")
ZIP_METHODS = {"deflated": zipfile.ZIP_DEFLATED, "stored": zipfile.ZIP_STORED}
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold: nothing from the clock


@dataclass(frozen=True)
class Lesion:
    subtype: str
    first: int  # first and last slice index (inclusive)
    last: int
    angle: float  # rad, where around the head (theta = atan2(AP, lateral)); IVH: side 0 left, 1 right, 2 both
    extent: float  # extra-axial: angular half-width (rad); IPH: radial position (0-1); IVH: filled fraction
    size: float  # mm: maximum thickness (extra-axial) or radius (IPH)
    hu: float  # blood density
    edge_fill: tuple[float, float] = (1.0, 1.0)  # share of its first and last slice's slab the bleed fills


@dataclass(frozen=True)
class StudyGeometry:
    n_slices: int
    z0: float  # ImagePositionPatient[2] of slice 0, mm
    spacing: float  # PixelSpacing, mm
    center: tuple[float, float]  # head center offset from the image center (x, y), mm
    tilt: float  # in-plane head rotation, rad
    axes: tuple[float, float]  # outer-skull semi-axes (lateral, AP) on the widest slice, mm
    skull_mm: float
    ventricles: tuple[int, int]  # first, last slice showing the lateral ventricles
    vent_axes: tuple[float, float]  # ventricle semi-axes (lateral, AP), mm
    sulci: tuple[int, float]  # number of sulci around the head, phase
    lesions: tuple[Lesion, ...]
    min_lesion_pixels: int = MIN_LESION_PIXELS  # smaller lesion cross-sections are neither drawn nor labelled


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path  # the folder written, or the zip file (then also zip_path)
    dicom_dir: Path | str  # paths in a zip are "ZIP::INNER/PATH" strings, usable as sources
    labels_csv: Path | str
    n_studies: int
    n_patients: int
    n_slices: int
    n_positive_slices: int  # labelled slices with any = 1
    n_unlabelled: int
    quirks: dict[str, list[str]]  # quirk name -> image ids
    test_dir: Path | str | None = None  # None: no test split written
    sample_submission: Path | str | None = None
    n_test_studies: int = 0
    n_test_patients: int = 0
    n_test_slices: int = 0
    test_quirks: dict[str, list[str]] = field(default_factory=dict)
    zip_path: Path | None = None


@dataclass(frozen=True)
class StudyPlan:
    index: int
    geometry: StudyGeometry
    patient_id: str
    image_ids: tuple[str, ...]  # by slice index (z order)
    storage: str  # a key of STORAGE
    window: tuple[float, float]


# ----------------------------------------------------------------------------------------------- planning
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _hex(*parts) -> str:
    return hashlib.sha256("/".join(map(str, ("ichkit-synth", *parts))).encode()).hexdigest()


def _unused(make: Callable[[int], str], taken: Collection[str]) -> str:
    """The first of make(0), make(1), ... not in taken: short hash prefixes can collide."""
    salt = 0
    while (name := make(salt)) in taken:
        salt += 1
    return name


def _test_seed(seed: int) -> int:
    """The test split's own seed: its studies, names and UIDs never change the train split's."""
    return int(_hex(seed, "test-split")[:16], 16)


def _uid(seed: int, *parts) -> str:
    # pydicom concatenates entropy sources without a separator, so (1, 12) and (11, 2) would collide:
    # join them ourselves.
    return generate_uid(entropy_srcs=["|".join(["ichkit-synth", str(seed), *map(str, parts)])])


def _lesion(subtype: str, n: int, geom_vent: tuple[int, int], rng: np.random.Generator) -> Lesion:
    lo, hi = geom_vent if subtype == "intraventricular" else (int(0.15 * n), int(0.85 * n))
    length = int(min(rng.integers(3, 11), hi - lo + 1))
    first = int(rng.integers(lo, hi - length + 2))
    lateral = rng.choice([0.0, math.pi]) + rng.normal(0, 0.45)  # convexity lesions sit mostly laterally
    # (all five entries are drawn, so every lesion consumes the same random numbers whatever its subtype)
    angle, extent, size = {
        "epidural": (lateral, rng.uniform(0.3, 0.5), rng.uniform(8, 15)),
        "subdural": (lateral, rng.uniform(0.6, 1.1), rng.uniform(4, 9)),
        "subarachnoid": (rng.uniform(-math.pi, math.pi), rng.uniform(0.4, 0.9), 0.0),
        "intraparenchymal": (rng.uniform(-math.pi, math.pi), rng.uniform(0.2, 0.55), rng.uniform(7, 16)),
        "intraventricular": (float(rng.integers(0, 3)), rng.uniform(0.35, 0.7), 0.0),
    }[subtype]
    return Lesion(
        subtype, first, first + length - 1, float(angle), float(extent), float(size), float(rng.uniform(62, 78))
    )


def _study_geometry(
    rng: np.random.Generator,
    force_lesion: bool = False,
    lesion_rate: float = 0.4,
    min_lesion_pixels: int = MIN_LESION_PIXELS,
    slices: tuple[int, int] = (20, 41),
) -> StudyGeometry:
    # slices: the range (low inclusive, high exclusive) the slice count is drawn from
    n = int(rng.integers(*slices))
    lateral = rng.uniform(64, 72)
    vent = (int(0.38 * n), int(0.70 * n))
    lesions: tuple[Lesion, ...] = ()
    if rng.random() < lesion_rate or force_lesion:
        kinds = rng.choice(SUBTYPES, size=2 if rng.random() < 0.25 else 1, replace=False, p=SUBTYPE_WEIGHTS)
        lesions = tuple(_lesion(str(k), n, vent, rng) for k in kinds)
    return StudyGeometry(
        n_slices=n,
        z0=round(float(rng.uniform(-150, 30)), 1),
        spacing=float(rng.choice(SPACINGS)),
        center=(float(rng.normal(0, 5)), float(rng.normal(0, 5))),
        tilt=float(rng.normal(0, 0.06)),
        axes=(float(lateral), float(lateral * rng.uniform(1.15, 1.28))),
        skull_mm=float(rng.uniform(5, 7.5)),
        ventricles=vent,
        vent_axes=(float(rng.uniform(4, 6.5)), float(rng.uniform(17, 25))),
        sulci=(int(rng.integers(16, 26)), float(rng.uniform(0, 2 * math.pi))),
        lesions=lesions,
        min_lesion_pixels=min_lesion_pixels,
    )


def _partial_volume(geom: StudyGeometry, rng: np.random.Generator) -> StudyGeometry:
    """Each lesion's first and last slab holds a uniform share of blood: where its edge falls in the slab."""
    fills = rng.uniform(0.0, 1.0, size=(len(geom.lesions), 2)).tolist()
    return replace(geom, lesions=tuple(replace(les, edge_fill=tuple(f)) for les, f in zip(geom.lesions, fills)))


def _quirk_counts(n_slices: int, n_studies: int) -> dict[str, int]:
    counts = {"truncated_pixels": 1, "wrap12": max(1, n_slices // 150)}
    if n_studies >= 2:  # a one-study dataset stays (almost) clean
        counts |= {
            "signed": max(1, n_slices // 150),
            "multiwindow": max(1, n_slices // 100),
            "odd_size": max(2, n_slices // 200),
            "unlabelled": max(1, n_slices // 200),
        }
    return counts


def plan_dataset(
    studies: int,
    seed: int,
    lesion_rate: float = 0.4,
    min_lesion_pixels: int = MIN_LESION_PIXELS,
    taken: Collection[str] = frozenset(),
    partial_volume: bool = False,
) -> tuple[list[StudyPlan], dict[str, list[str]]]:
    """Everything about the dataset except pixels: studies, patients, image ids, and the quirky slices.

    ``lesion_rate`` is the chance that a study has hemorrhage (the real archive: ~0.41). ``taken``: image
    and patient ids of another split, which this one must not reuse. ``partial_volume``: see ``generate``.
    """
    # Study 0 always bleeds, so that even a two-study dataset has positive labels to test with.
    geoms = [
        _study_geometry(
            _rng(seed, 1, k), force_lesion=k == 0, lesion_rate=lesion_rate, min_lesion_pixels=min_lesion_pixels
        )
        for k in range(studies)
    ]
    if partial_volume:  # its own random stream: the rest of the dataset stays the same bytes
        geoms = [_partial_volume(g, _rng(seed, 4, k)) for k, g in enumerate(geoms)]
    rng = _rng(seed, 0)
    # about 15% of patients have two studies
    patients, k = [], 0
    while k < studies:
        repeat = 2 if k + 1 < studies and rng.random() < 0.15 else 1
        # (salt 0 hashes without a salt part: the names of earlier versions stay)
        patients += [
            _unused(lambda salt: "ID_" + _hex(seed, "patient", k, *((salt,) if salt else ()))[:8], taken)  # noqa: B023 (called at once)
        ] * repeat
        k += repeat
    plans, seen = [], set(taken)
    for k, geom in enumerate(geoms):
        ids = []
        for z in range(geom.n_slices):
            image_id = _unused(lambda salt: "ID_" + _hex(seed, k, z, salt)[:9], seen)  # noqa: B023 (called at once)
            seen.add(image_id)
            ids.append(image_id)
        srng = _rng(seed, 2, k)
        plans.append(
            StudyPlan(
                k,
                geom,
                patients[k],
                tuple(ids),
                str(srng.choice(["u16", "u12", "s16"], p=[0.5, 0.3, 0.2])),
                (float(srng.choice([40, 36, 30])), 80.0),
            )
        )
    all_ids = [i for p in plans for i in p.image_ids]
    counts = _quirk_counts(len(all_ids), studies)
    picks = iter(rng.choice(len(all_ids), size=sum(counts.values()), replace=False).tolist())
    quirks = {name: sorted(all_ids[next(picks)] for _ in range(counts.get(name, 0))) for name in QUIRKS[:-1]}
    reversed_studies = rng.choice(studies, size=max(1, studies // 10), replace=False) if studies >= 3 else []
    quirks["reversed_instance_number"] = sorted(i for k in reversed_studies for i in plans[k].image_ids)
    return plans, quirks


def plan_test_split(
    studies: int,
    seed: int,
    train: list[StudyPlan],
    lesion_rate: float = 0.4,
    min_lesion_pixels: int = MIN_LESION_PIXELS,
    partial_volume: bool = False,
) -> tuple[list[StudyPlan], dict[str, list[str]]]:
    """The test split beside ``train``: other patients, other names, and no quirk meant for labelled data."""
    if studies == 0:
        return [], {}
    taken = {i for p in train for i in (p.patient_id, *p.image_ids)}
    plans, quirks = plan_dataset(
        studies, _test_seed(seed), lesion_rate, min_lesion_pixels, taken=taken, partial_volume=partial_volume
    )
    return plans, {name: ids for name, ids in quirks.items() if name not in TRAIN_ONLY_QUIRKS}


# ---------------------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=8)
def _grids(shape: tuple[int, int], spacing: float, center: tuple[float, float], tilt: float, k: int):
    """Head-centred coordinates (mm) of every pixel: lateral u, AP v, radius, angle; and a sulcus pattern:
    cos/sin of a wavy angle with k periods (sulci where cos > threshold) and a per-sulcus depth factor."""
    rows, cols = shape
    x = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing - center[0]
    y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing - center[1]
    x, y = np.meshgrid(x, y)
    c, s = np.float32(math.cos(tilt)), np.float32(math.sin(tilt))
    u, v = c * x + s * y, c * y - s * x
    theta = np.arctan2(v, u)
    wavy = k * theta + 1.2 * np.sin(3 * theta + k) + 0.6 * np.sin(7 * theta)
    deep = (0.004 + 0.005 * (1 + np.sin(5 * theta + 0.5 * k))).astype(np.float32)
    grids = (u, v, np.hypot(u, v), theta, np.cos(wavy), np.sin(wavy), deep)
    for g in grids:
        g.setflags(write=False)
    return grids


@lru_cache(maxsize=16)
def _depth_lut(skull_mm: float) -> np.ndarray:
    """HU by depth below the outer skull surface: air, scalp, bone (dense tables, lighter diploe), CSF, cortex,
    white matter; smoothed a little for partial-volume edges."""
    d = LUT_START + LUT_STEP * np.arange(int((skull_mm + 12 - LUT_START) / LUT_STEP))
    bone = 1450 - 650 * np.sin(np.pi * np.clip(d / skull_mm, 0, 1))
    inner = d - skull_mm
    brain = GRAY_HU + (WHITE_HU - GRAY_HU) * np.clip((inner - CSF_RIM_MM - 3.5) / 2.0, 0, 1)
    lut = np.select([d < -SCALP_MM, d < 0, inner < 0, inner < CSF_RIM_MM], [AIR_HU, SCALP_HU, bone, CSF_HU], brain)
    return np.convolve(np.pad(lut, 2, mode="edge"), np.ones(3) / 3, mode="valid")[1:-1].astype(np.float32)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """White noise (CT quantum noise) plus smooth texture; slices take random crops. Fixed, seed-independent."""
    rng = np.random.default_rng(2019)
    white = rng.standard_normal((BANK_SIZE, BANK_SIZE), dtype=np.float32)
    smooth = cv2.GaussianBlur(rng.standard_normal((BANK_SIZE, BANK_SIZE), dtype=np.float32), (0, 0), 6)
    bank = NOISE_SD * white + (TEXTURE_HU / smooth.std()) * smooth
    bank.setflags(write=False)
    return bank


def _taper(j: int, first: int, last: int) -> float:
    """Size factor along a structure's slices: full in the middle, smaller at the ends."""
    return 0.35 + 0.65 * math.sin(math.pi * (j - first + 0.5) / (last - first + 1))


@dataclass
class _Frame:
    """What one slice's drawing steps share: the head's bounding box and its coordinates (all float32, mm)."""

    win: tuple[slice, slice]
    A: float  # outer-skull semi-axes on this slice
    B: float
    u: np.ndarray  # lateral, AP, angle around the head
    v: np.ndarray
    theta: np.ndarray
    depth: np.ndarray  # radial depth below the outer skull surface
    inner: np.ndarray  # depth below the inner skull surface
    sulci: np.ndarray | None = None
    vent: np.ndarray | None = None
    vent_level: tuple[float, float] = (0.0, 0.0)  # ventricles' AP center and semi-axis


def _frame(geom: StudyGeometry, z: int, shape: tuple[int, int]) -> _Frame:
    s = math.sqrt(max(0.25, 1 - (1.7 * ((z + 0.5) / geom.n_slices - 0.5)) ** 2))  # head narrows at top/bottom
    A, B = geom.axes[0] * s, geom.axes[1] * s
    # Only the head's bounding box needs drawing; the rest is air.
    (rows, cols), half = shape, (max(A, B) + SCALP_MM + 2) / geom.spacing
    cr, cc = (rows - 1) / 2 + geom.center[1] / geom.spacing, (cols - 1) / 2 + geom.center[0] / geom.spacing
    win = (
        slice(max(0, int(cr - half)), min(rows, int(cr + half) + 2)),
        slice(max(0, int(cc - half)), min(cols, int(cc + half) + 2)),
    )
    u, v, rho, theta = (g[win] for g in _grids(shape, geom.spacing, geom.center, geom.tilt, geom.sulci[0])[:4])
    r = np.sqrt((u / np.float32(A)) ** 2 + (v / np.float32(B)) ** 2)
    # Oblique cuts near the vertex and the skull base show a thicker skull: shrink depth there.
    depth = rho * (1 / np.maximum(r, np.float32(1e-3)) - 1) * np.float32(math.sqrt(s))
    return _Frame(win, A, B, u, v, theta, depth, depth - np.float32(geom.skull_mm))


def _draw_anatomy(geom: StudyGeometry, z: int, shape: tuple[int, int], fr: _Frame) -> np.ndarray:
    """Noise-free HU inside the frame's window; sets fr.sulci and fr.vent."""
    lut = _depth_lut(geom.skull_mm)
    w = lut[np.clip((fr.depth - LUT_START) * (1 / LUT_STEP), 0, len(lut) - 1).astype(np.intp)]
    ck, sk, deep = (g[fr.win] for g in _grids(shape, geom.spacing, geom.center, geom.tilt, geom.sulci[0])[4:])
    brain, phase = fr.inner > CSF_RIM_MM, geom.sulci[1] + 0.9 * z  # sulci move a little from slice to slice
    fr.sulci = brain & (fr.inner < 12) & (ck * math.cos(phase) - sk * math.sin(phase) > 0.9 + deep * fr.inner)
    fr.sulci |= brain & (np.abs(fr.u) < 0.9) & (np.abs(fr.v) > 0.4 * fr.B)  # interhemispheric fissure
    w[fr.sulci] = CSF_HU
    v0, v1 = geom.ventricles
    if v0 <= z <= v1:  # paired lateral ventricles, close together in front, diverging posteriorly
        f = _taper(z, v0, v1)
        a, b, vc = geom.vent_axes[0] * f, geom.vent_axes[1] * f, -0.05 * fr.B
        dv = fr.v - np.float32(vc)
        fr.vent = ((np.abs(fr.u) - (a + 1.0) - 0.2 * (dv + b)) / a) ** 2 + (dv / b) ** 2 < 1
        fr.vent_level = (vc, b)
        w[fr.vent] = CSF_HU
    return w


def _lesion_mask(les: Lesion, f: float, fr: _Frame) -> np.ndarray:
    """Pixels of a lesion on a slice where its size factor is f."""
    if les.subtype in ("epidural", "subdural", "subarachnoid"):
        half_width = les.extent * (f if les.subtype == "subarachnoid" else 1)
        dth = np.abs((fr.theta - np.float32(les.angle - math.pi)) % np.float32(2 * math.pi) - np.float32(math.pi))
        dth *= np.float32(1 / half_width)  # 0 at the lesion's center angle, 1 at its ends
        if les.subtype == "subarachnoid":  # thin blood along the brain surface and down the sulci
            return (dth < 1) & (((fr.inner > 0.2) & (fr.inner < 1.8)) | (fr.sulci & (fr.inner < 12 * f)))
        profile = 1 - dth**2 if les.subtype == "epidural" else 1 - dth**4  # biconvex lens vs crescent
        return (dth < 1) & (fr.inner > -0.5) & (fr.inner < les.size * f * profile)
    if les.subtype == "intraparenchymal":  # a rounded blob in the brain tissue
        radial = les.extent * (fr.A - 15)
        uc, vc, r = radial * math.cos(les.angle), radial * math.sin(les.angle) * fr.B / fr.A, les.size * f
        return (((fr.u - uc) / r) ** 2 + ((fr.v - vc) / (0.8 * r)) ** 2 < 1) & (fr.inner > CSF_RIM_MM)
    if fr.vent is None:  # intraventricular: the dependent (posterior) part of the ventricles fills with blood
        return np.zeros(fr.u.shape, bool)
    vc, b = fr.vent_level
    side = {0: fr.u < 0, 1: fr.u > 0, 2: True}[int(les.angle)]
    return fr.vent & (fr.v > vc + b * (1 - 2 * les.extent * f)) & side


def _draw_lesions(geom: StudyGeometry, z: int, fr: _Frame, w: np.ndarray):
    """Paint the lesions active on slice z into w; returns [(lesion index, mask)], edema mask, visible counts."""
    masks = [
        (i, _lesion_mask(les, _taper(z, les.first, les.last), fr))
        for i, les in enumerate(geom.lesions)
        if les.first <= z <= les.last
    ]
    counts, covered = {}, np.zeros(w.shape, bool)
    for i, m in reversed(masks):  # later lesions overwrite earlier ones: count what stays visible
        counts[i] = int(np.count_nonzero(m & ~covered))
        covered |= m
    # A sliver below the labelling threshold is not drawn either, so every drawn lesion is labelled.
    small = {i for i, n in counts.items() if n < geom.min_lesion_pixels}
    if small:
        masks = [(i, m) for i, m in masks if i not in small]
        counts = {i: (0 if i in small else n) for i, n in counts.items()}
        covered = np.zeros(w.shape, bool)
        for _, m in masks:
            covered |= m
    edema = np.zeros(w.shape, bool)
    for i, m in masks:  # a hypodense rim of edema around a parenchymal bleed
        if geom.lesions[i].subtype == "intraparenchymal":
            edema |= cv2.dilate(m.view(np.uint8), np.ones((9, 9), np.uint8)).view(bool)
    edema &= (fr.inner > CSF_RIM_MM) & ~covered
    w[edema] = EDEMA_HU
    for i, m in masks:
        les = geom.lesions[i]
        # Partial volume: a slab the bleed fills only in part averages blood with what lies around it.
        fill = les.edge_fill[0] if z == les.first else les.edge_fill[1] if z == les.last else 1.0
        w[m] = les.hu if fill == 1.0 else w[m] + np.float32(fill) * (np.float32(les.hu) - w[m])
    return masks, edema, counts


def _draw(geom: StudyGeometry, z: int, shape: tuple[int, int], codes: bool = False):
    """Noise-free HU (float32), visible lesion pixel counts {lesion index: n}, and (if codes) a tissue code map."""
    fr = _frame(geom, z, shape)
    w = _draw_anatomy(geom, z, shape, fr)
    masks, edema, counts = _draw_lesions(geom, z, fr, w)
    hu = np.full(shape, AIR_HU, np.float32)
    hu[fr.win] = w
    tissue = None
    if codes:
        t = np.select(
            [fr.depth < -SCALP_MM, fr.depth < 0, fr.inner < 0, (fr.inner <= CSF_RIM_MM) | fr.sulci],
            [AIR, SCALP, BONE, CSF],
            BRAIN,
        ).astype(np.uint8)
        t[edema] = EDEMA
        if fr.vent is not None:
            t[fr.vent] = CSF
        for i, m in masks:
            t[m] = LESION_CODE + i
        tissue = np.full(shape, AIR, np.uint8)
        tissue[fr.win] = t
    return hu, counts, tissue


def slice_regions(geom: StudyGeometry, z: int, shape: tuple[int, int]) -> np.ndarray:
    """Tissue code map (AIR, SCALP, BONE, CSF, BRAIN, EDEMA, LESION_CODE + lesion index) of a slice."""
    return _draw(geom, z, shape, codes=True)[2]


def clean_slice(
    geom: StudyGeometry, z: int, shape: tuple[int, int], codes: bool = False
) -> tuple[np.ndarray, dict[str, int], np.ndarray | None]:
    """Noise-free HU (float32) of slice z, the visible pixel count of each subtype drawn on it, and (if codes)
    the tissue code map of slice_regions()."""
    hu, counts, tissue = _draw(geom, z, shape, codes)
    pixels = dict.fromkeys(SUBTYPES, 0)
    for i, n in counts.items():
        pixels[geom.lesions[i].subtype] += n
    return hu, pixels, tissue


def slice_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A read-only crop of the noise bank (HU) for one slice; the crop's place is drawn from rng."""
    rows, cols = shape
    oy, ox = (int(x) for x in rng.integers(0, [BANK_SIZE - rows + 1, BANK_SIZE - cols + 1]))
    return _noise_bank()[oy : oy + rows, ox : ox + cols]


def render_slice(
    geom: StudyGeometry, z: int, shape: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, int]]:
    """HU image (float32, with noise) of slice z, and the visible pixel count of each subtype drawn on it."""
    hu, pixels, _ = clean_slice(geom, z, shape)
    hu += slice_noise(shape, rng)
    return hu, pixels


def slice_labels(pixels: dict[str, int], min_pixels: int = MIN_LESION_PIXELS) -> dict[str, int]:
    """Six Kaggle labels from visible lesion pixels per subtype; any = OR of the subtypes."""
    labels = {k: int(pixels[k] >= min_pixels) for k in SUBTYPES}
    return labels | {"any": max(labels.values())}


# ------------------------------------------------------------------------------------------------ writing
def encode_hu(hu: np.ndarray, storage: str) -> np.ndarray:
    """Stored pixel values for a STORAGE kind; ``wrap12`` stores HU modulo 4096 like the broken RSNA slices
    (the reader fix ``x = p + 1000; x[x >= 4096] -= 4096; HU = x - 1000`` recovers HU in [-1000, 3095])."""
    v = np.rint(hu)
    if storage == "wrap12":
        return np.mod(np.clip(v, -1000, 3095, out=v), 4096).astype(np.uint16)
    bits, signed, intercept = STORAGE[storage]
    v -= intercept
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return np.clip(v, lo, hi, out=v).astype(np.int16 if signed else np.uint16)


def _dataset(
    seed: int, plan: StudyPlan, z: int, pixels: np.ndarray, storage: str, quirks: set[str], wrap_intercept: int
) -> Dataset:
    geom, (rows, cols) = plan.geometry, pixels.shape
    bits, signed, intercept = STORAGE[storage]
    sop_uid = _uid(seed, plan.index, z, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICHKIT_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop_uid, "CT"
    ds.PatientID, ds.StudyID, ds.SeriesNumber = plan.patient_id, "", 1
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(seed, plan.index, "study"), _uid(seed, plan.index, "series")
    reverse = "reversed_instance_number" in quirks
    ds.InstanceNumber = geom.n_slices - z if reverse else z + 1
    ds.ImagePositionPatient = [
        f"{-(cols / 2) * geom.spacing:.3f}",
        f"{-(rows / 2) * geom.spacing:.3f}",
        f"{geom.z0 + SLICE_MM * z:.1f}",
    ]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness, ds.PixelSpacing = SLICE_MM, [geom.spacing, geom.spacing]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, signed
    ds.WindowCenter, ds.WindowWidth = plan.window
    if "multiwindow" in quirks:
        ds.WindowCenter, ds.WindowWidth = [plan.window[0], 40], [plan.window[1], 80]
    ds.RescaleIntercept = wrap_intercept if storage == "wrap12" else intercept
    ds.RescaleSlope = 1
    data = pixels.tobytes()
    # One file has truncated pixel data (like ID_6431af929): the header reads, pixel_array fails.
    ds.PixelData = data[: len(data) // 2] if "truncated_pixels" in quirks else data
    return ds


class _QuirkMaps(NamedTuple):
    """A split's quirks, by image id."""

    of: dict[str, set[str]]  # image id -> quirk names
    odd_shape: dict[str, tuple[int, int]]
    wrap_intercept: dict[str, int]


def _quirk_maps(quirks: dict[str, list[str]]) -> _QuirkMaps:
    of: dict[str, set[str]] = {}
    for name, ids in quirks.items():
        for image_id in ids:
            of.setdefault(image_id, set()).add(name)
    return _QuirkMaps(
        of,
        {i: ODD_SIZES[n % len(ODD_SIZES)] for n, i in enumerate(quirks.get("odd_size", ()))},
        {i: 1 if n % 3 == 2 else 0 for n, i in enumerate(quirks.get("wrap12", ()))},
    )


def _dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _write_study(
    seed: int, plan: StudyPlan, maps: _QuirkMaps, write: Callable[[str, bytes], None]
) -> dict[str, dict[str, int]]:
    """Render and write (``write(file name, bytes)``) a study's slices; returns their labels."""
    geom, labels = plan.geometry, {}
    # Writing order is shuffled so that file timestamps do not give the slice order away.
    for z in _rng(seed, 3, plan.index).permutation(geom.n_slices).tolist():
        image_id = plan.image_ids[z]
        quirks = maps.of.get(image_id, set())
        hu, pixels = render_slice(geom, z, maps.odd_shape.get(image_id, (512, 512)), _rng(seed, 1, plan.index, z))
        storage = next((q for q in ("wrap12", "signed") if q in quirks), plan.storage)
        ds = _dataset(seed, plan, z, encode_hu(hu, storage), storage, quirks, maps.wrap_intercept.get(image_id, 0))
        write(f"{image_id}.dcm", _dicom_bytes(ds))
        if "unlabelled" not in quirks:
            labels[image_id] = slice_labels(pixels, geom.min_lesion_pixels)
    return labels


class _FolderOut:
    """Where the dataset goes: files under a folder."""

    def __init__(self, root: Path):
        self.root = root

    def where(self, name: str) -> Path:
        return self.root / name

    def mkdir(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        (self.root / name).write_bytes(data)

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "wb")


class _ZipOut:
    """Where the dataset goes: members under ``top``/ (KAGGLE_TOP) of an open zip, with fixed dates and modes."""

    def __init__(self, zf: zipfile.ZipFile, path: Path, method: int, top: str = KAGGLE_TOP):
        self.zf, self.path, self.method, self.top = zf, path, method, top

    def where(self, name: str) -> str:
        return f"{self.path}::{self.top}/{name}"

    def _info(self, name: str, directory: bool = False) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self.top}/{name}", date_time=ZIP_DATE_TIME)
        info.create_system = 3  # Unix on every platform, so external_attr means the same everywhere
        info.external_attr = (0o40755 << 16 | 0x10) if directory else 0o100644 << 16
        info.compress_type = zipfile.ZIP_STORED if directory else self.method
        return info

    def mkdir(self, name: str) -> None:
        self.zf.writestr(self._info(f"{name}/" if name else "", directory=True), b"")

    def write(self, name: str, data: bytes) -> None:
        self.zf.writestr(self._info(name), data)

    def open(self, name: str) -> BinaryIO:
        return self.zf.open(self._info(name), "w")


@contextmanager
def _zip_out(path: Path, method: int, top: str = KAGGLE_TOP) -> Iterator[_ZipOut]:
    """A zip written under a temporary name next to ``path`` and renamed when complete, so that a killed run
    never leaves a half zip under the final name."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "xb") as f, zipfile.ZipFile(f, "w") as zf:
            out = _ZipOut(zf, path, method, top)
            out.mkdir("")
            yield out
            # Members are streamed in study order; the central directory (what listings show) is by name.
            zf.filelist.sort(key=lambda info: info.filename)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_split(
    out: _FolderOut | _ZipOut,
    folder: str,
    seed: int,
    plans: list[StudyPlan],
    quirks: dict[str, list[str]],
    progress: Callable[[int], None] | None,
) -> dict[str, dict[str, int]]:
    """Write a split's DICOM files into ``folder``; returns their labels."""
    out.mkdir(folder)
    maps, labels = _quirk_maps(quirks), {}
    for plan in plans:
        labels |= _write_study(seed, plan, maps, lambda name, data: out.write(f"{folder}/{name}", data))
        logger.debug(
            "%s study %d: %d slices, lesions %s",
            folder,
            plan.index,
            plan.geometry.n_slices,
            [les.subtype for les in plan.geometry.lesions],
        )
        if progress is not None:
            progress(plan.geometry.n_slices)
    return labels


def _write_csv(
    out: _FolderOut | _ZipOut, name: str, image_ids: Iterable[str], value: Callable[[str, str], object]
) -> None:
    """Kaggle layout: header ID,Label and six rows per image (subtypes, then any); images in id order."""
    with out.open(name) as f:
        f.write(b"ID,Label\n")
        for image_id in sorted(image_ids):
            f.write("".join(f"{image_id}_{label},{value(image_id, label)}\n" for label in LABELS).encode())


def _write_dataset(
    out: _FolderOut | _ZipOut,
    seed: int,
    train: tuple[list[StudyPlan], dict[str, list[str]]],
    test: tuple[list[StudyPlan], dict[str, list[str]]] | None,
    progress: Callable[[int], None] | None,
) -> dict[str, dict[str, int]]:
    """Both splits and both CSVs (the test part only when ``test`` is given); returns the train labels."""
    labels = _write_split(out, TRAIN_DIR, seed, *train, progress)
    if test is not None:
        _write_split(out, TEST_DIR, _test_seed(seed), *test, progress)
    _write_csv(out, TRAIN_CSV, labels, lambda image_id, label: labels[image_id][label])
    if test is not None:
        test_ids = [i for plan in test[0] for i in plan.image_ids]
        _write_csv(out, SAMPLE_SUBMISSION, test_ids, lambda image_id, label: SUBMISSION_VALUE)
    return labels


def _is_count(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum


def _check_arguments(studies, seed, lesion_rate: float, min_lesion_pixels: int, test_studies, zip_method: str) -> None:
    if min_lesion_pixels < 1:
        raise ValueError(f"min_lesion_pixels must be >= 1, got {min_lesion_pixels}")
    if not 0.0 <= lesion_rate <= 1.0:
        raise ValueError(f"lesion_rate must be between 0 and 1, got {lesion_rate}")
    if not _is_count(studies, 1):
        raise ValueError(f"studies must be an integer >= 1, got {studies!r}")
    if not _is_count(seed, 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if test_studies is not None and not _is_count(test_studies, 0):
        raise ValueError(f"test_studies must be an integer >= 0, got {test_studies!r}")
    if zip_method not in ZIP_METHODS:
        raise ValueError(f"zip_method must be one of {', '.join(ZIP_METHODS)}, got {zip_method!r}")


def _check_folder(out_dir: Path, folders: Iterable[str]) -> None:
    for folder in folders:
        if (out_dir / folder).is_dir() and any((out_dir / folder).glob("*.dcm")):
            raise FileExistsError(
                f"{out_dir / folder} already holds DICOM files; synth writes into an empty folder only"
            )


def generate(
    out_dir: str | os.PathLike,
    studies: int,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    lesion_rate: float = 0.4,
    min_lesion_pixels: int = MIN_LESION_PIXELS,
    *,
    test_studies: int | None = None,
    as_zip: bool = False,
    zip_method: str = "deflated",
    partial_volume: bool = False,
) -> SynthSummary:
    """Write a synthetic RSNA-style dataset of ``studies`` studies to ``out_dir``; same seed, same bytes.

    ``lesion_rate``: chance that a study has hemorrhage (0.4 as in the real archive; raise it for an
    easier, positive-rich training set). ``min_lesion_pixels``: a lesion covering fewer pixels (at 512²)
    on a slice is neither drawn nor labelled there; raise it (e.g. 600) for a set whose every label is
    visible at low resolution. ``test_studies``: studies of other patients in ``stage_2_test/``, listed in
    ``stage_2_sample_submission.csv`` (default 0 for a folder, ``max(1, studies // 5)`` for a zip); the
    train files do not depend on it. ``as_zip``: ``out_dir`` is then a new zip file holding everything
    under ``KAGGLE_TOP/``, compressed with ``zip_method`` ("deflated" or "stored"). ``partial_volume``:
    a 5 mm slice through a bleed's upper or lower edge holds blood in part of its thickness only, so it
    shows the lesion at that share (uniform in 0-1, per edge) of its contrast; the slice stays labelled, as
    readers who scroll through the study label it. Off, every slice shows its lesion at full contrast.
    """
    _check_arguments(studies, seed, lesion_rate, min_lesion_pixels, test_studies, zip_method)
    out_dir, seed = Path(out_dir), int(seed)
    if test_studies is None:
        test_studies = max(1, studies // 5) if as_zip else 0
    # A folder without a test split is exactly what earlier versions wrote; a zip always has the four entries.
    with_test = as_zip or test_studies > 0
    if as_zip and out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; synth --zip writes a new file only")
    if not as_zip and out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; synth writes a folder there (a zip file needs as_zip / --zip)")
    if not as_zip:
        _check_folder(out_dir, (TRAIN_DIR, TEST_DIR) if with_test else (TRAIN_DIR,))
    train = plan_dataset(int(studies), seed, lesion_rate, int(min_lesion_pixels), partial_volume=partial_volume)
    test = (
        plan_test_split(
            int(test_studies), seed, train[0], lesion_rate, int(min_lesion_pixels), partial_volume=partial_volume
        )
        if with_test
        else None
    )
    if as_zip:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with _zip_out(out_dir, ZIP_METHODS[zip_method]) as out:
            labels = _write_dataset(out, seed, train, test, progress)
    else:
        out = _FolderOut(out_dir)
        labels = _write_dataset(out, seed, train, test, progress)
    summary = _summary(out, train=train, test=test, labels=labels, out_dir=out_dir, is_zip=as_zip)
    logger.info(
        "synth: %d slices of %d studies (%d positive) in %s; test split: %d slices of %d studies",
        summary.n_slices,
        summary.n_studies,
        summary.n_positive_slices,
        summary.dicom_dir,
        summary.n_test_slices,
        summary.n_test_studies,
    )
    return summary


def _summary(
    out: _FolderOut | _ZipOut,
    *,
    train: tuple[list[StudyPlan], dict[str, list[str]]],
    test: tuple[list[StudyPlan], dict[str, list[str]]] | None,
    labels: dict[str, dict[str, int]],
    out_dir: Path,
    is_zip: bool,
) -> SynthSummary:
    (plans, quirks), (test_plans, test_quirks) = train, test or ([], {})
    n_slices = sum(p.geometry.n_slices for p in plans)
    return SynthSummary(
        out_dir=out_dir,
        dicom_dir=out.where(TRAIN_DIR),
        labels_csv=out.where(TRAIN_CSV),
        n_studies=len(plans),
        n_patients=len({p.patient_id for p in plans}),
        n_slices=n_slices,
        n_positive_slices=sum(lab["any"] for lab in labels.values()),
        n_unlabelled=n_slices - len(labels),
        quirks=quirks,
        test_dir=out.where(TEST_DIR) if test else None,
        sample_submission=out.where(SAMPLE_SUBMISSION) if test else None,
        n_test_studies=len(test_plans),
        n_test_patients=len({p.patient_id for p in test_plans}),
        n_test_slices=sum(p.geometry.n_slices for p in test_plans),
        test_quirks=test_quirks,
        zip_path=out_dir if is_zip else None,
    )
