"""A synthetic dataset laid out like the Kaggle RSNA 2019 intracranial hemorrhage download.

``generate(out_dir, studies, seed)`` writes ``stage_2_train/ID_<9 hex>.dcm`` (one axial CT slice per
file, flat folder, names unrelated to study or slice order) and ``stage_2_train.csv`` (Kaggle format).
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
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from .labels import LABELS, SUBTYPES

logger = logging.getLogger(__name__)

MIN_LESION_PIXELS = 20            # a lesion with fewer pixels on a slice does not label it
SLICE_MM = 5.0
AIR_HU, SCALP_HU, CSF_HU, GRAY_HU, WHITE_HU, EDEMA_HU = -1000.0, 35.0, 7.0, 38.0, 29.0, 19.0
SCALP_MM, CSF_RIM_MM = 4.0, 1.5
NOISE_SD, TEXTURE_HU, BANK_SIZE = 5.0, 2.5, 1024
LUT_STEP, LUT_START = 0.25, -(SCALP_MM + 2.0)          # depth look-up table: mm per entry, first depth
SPACINGS = (0.429688, 0.449219, 0.46875, 0.488281, 0.5)
ODD_SIZES = ((630, 630), (512, 640), (768, 512))      # (Rows, Columns)
SUBTYPE_WEIGHTS = (0.08, 0.25, 0.18, 0.24, 0.25)      # epidural rarest, as in the real data
QUIRKS = ("truncated_pixels", "wrap12", "signed", "multiwindow", "odd_size", "unlabelled",
          "reversed_instance_number")
# Normal storage kinds (bits stored, pixel representation, intercept), plus the two quirky ones.
STORAGE = {"u16": (16, 0, -1024), "u12": (12, 0, -1024), "s16": (16, 1, -1024),
           "wrap12": (12, 0, 0), "signed": (16, 1, 0)}
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["ichkit synth implementation"])
# Tissue codes of slice_regions(); lesion i (of StudyGeometry.lesions) is LESION_CODE + i.
AIR, SCALP, BONE, CSF, BRAIN, EDEMA, LESION_CODE = 0, 1, 2, 3, 4, 5, 10


@dataclass(frozen=True)
class Lesion:
    subtype: str
    first: int        # first and last slice index (inclusive)
    last: int
    angle: float      # rad, where around the head (theta = atan2(AP, lateral)); IVH: side 0 left, 1 right, 2 both
    extent: float     # extra-axial: angular half-width (rad); IPH: radial position (0-1); IVH: filled fraction
    size: float       # mm: maximum thickness (extra-axial) or radius (IPH)
    hu: float         # blood density


@dataclass(frozen=True)
class StudyGeometry:
    n_slices: int
    z0: float                         # ImagePositionPatient[2] of slice 0, mm
    spacing: float                    # PixelSpacing, mm
    center: tuple[float, float]       # head center offset from the image center (x, y), mm
    tilt: float                       # in-plane head rotation, rad
    axes: tuple[float, float]         # outer-skull semi-axes (lateral, AP) on the widest slice, mm
    skull_mm: float
    ventricles: tuple[int, int]       # first, last slice showing the lateral ventricles
    vent_axes: tuple[float, float]    # ventricle semi-axes (lateral, AP), mm
    sulci: tuple[int, float]          # number of sulci around the head, phase
    lesions: tuple[Lesion, ...]
    min_lesion_pixels: int = MIN_LESION_PIXELS   # smaller lesion cross-sections are neither drawn nor labelled


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    dicom_dir: Path
    labels_csv: Path
    n_studies: int
    n_patients: int
    n_slices: int
    n_positive_slices: int            # labelled slices with any = 1
    n_unlabelled: int
    quirks: dict[str, list[str]]      # quirk name -> image ids


@dataclass(frozen=True)
class StudyPlan:
    index: int
    geometry: StudyGeometry
    patient_id: str
    image_ids: tuple[str, ...]        # by slice index (z order)
    storage: str                      # a key of STORAGE
    window: tuple[float, float]


# ----------------------------------------------------------------------------------------------- planning
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _hex(*parts) -> str:
    return hashlib.sha256("/".join(map(str, ("ichkit-synth", *parts))).encode()).hexdigest()


def _uid(seed: int, *parts) -> str:
    # pydicom concatenates entropy sources without a separator, so (1, 12) and (11, 2) would collide:
    # join them ourselves.
    return generate_uid(entropy_srcs=["|".join(["ichkit-synth", str(seed), *map(str, parts)])])


def _lesion(subtype: str, n: int, geom_vent: tuple[int, int], rng: np.random.Generator) -> Lesion:
    lo, hi = geom_vent if subtype == "intraventricular" else (int(0.15 * n), int(0.85 * n))
    length = int(min(rng.integers(3, 11), hi - lo + 1))
    first = int(rng.integers(lo, hi - length + 2))
    lateral = rng.choice([0.0, math.pi]) + rng.normal(0, 0.45)   # convexity lesions sit mostly laterally
    # (all five entries are drawn, so every lesion consumes the same random numbers whatever its subtype)
    angle, extent, size = {
        "epidural": (lateral, rng.uniform(0.3, 0.5), rng.uniform(8, 15)),
        "subdural": (lateral, rng.uniform(0.6, 1.1), rng.uniform(4, 9)),
        "subarachnoid": (rng.uniform(-math.pi, math.pi), rng.uniform(0.4, 0.9), 0.0),
        "intraparenchymal": (rng.uniform(-math.pi, math.pi), rng.uniform(0.2, 0.55), rng.uniform(7, 16)),
        "intraventricular": (float(rng.integers(0, 3)), rng.uniform(0.35, 0.7), 0.0),
    }[subtype]
    return Lesion(subtype, first, first + length - 1, float(angle), float(extent), float(size),
                  float(rng.uniform(62, 78)))


def _study_geometry(rng: np.random.Generator, force_lesion: bool = False, lesion_rate: float = 0.4,
                    min_lesion_pixels: int = MIN_LESION_PIXELS) -> StudyGeometry:
    n = int(rng.integers(20, 41))
    lateral = rng.uniform(64, 72)
    vent = (int(0.38 * n), int(0.70 * n))
    lesions: tuple[Lesion, ...] = ()
    if rng.random() < lesion_rate or force_lesion:
        kinds = rng.choice(SUBTYPES, size=2 if rng.random() < 0.25 else 1, replace=False, p=SUBTYPE_WEIGHTS)
        lesions = tuple(_lesion(str(k), n, vent, rng) for k in kinds)
    return StudyGeometry(
        n_slices=n, z0=round(float(rng.uniform(-150, 30)), 1), spacing=float(rng.choice(SPACINGS)),
        center=(float(rng.normal(0, 5)), float(rng.normal(0, 5))), tilt=float(rng.normal(0, 0.06)),
        axes=(float(lateral), float(lateral * rng.uniform(1.15, 1.28))), skull_mm=float(rng.uniform(5, 7.5)),
        ventricles=vent, vent_axes=(float(rng.uniform(4, 6.5)), float(rng.uniform(17, 25))),
        sulci=(int(rng.integers(16, 26)), float(rng.uniform(0, 2 * math.pi))), lesions=lesions,
        min_lesion_pixels=min_lesion_pixels)


def _quirk_counts(n_slices: int, n_studies: int) -> dict[str, int]:
    counts = {"truncated_pixels": 1, "wrap12": max(1, n_slices // 150)}
    if n_studies >= 2:   # a one-study dataset stays (almost) clean
        counts |= {"signed": max(1, n_slices // 150), "multiwindow": max(1, n_slices // 100),
                   "odd_size": max(2, n_slices // 200), "unlabelled": max(1, n_slices // 200)}
    return counts


def plan_dataset(studies: int, seed: int, lesion_rate: float = 0.4,
                 min_lesion_pixels: int = MIN_LESION_PIXELS) -> tuple[list[StudyPlan], dict[str, list[str]]]:
    """Everything about the dataset except pixels: studies, patients, image ids, and the quirky slices.

    ``lesion_rate`` is the chance that a study has hemorrhage (the real archive: ~0.41).
    """
    # Study 0 always bleeds, so that even a two-study dataset has positive labels to test with.
    geoms = [_study_geometry(_rng(seed, 1, k), force_lesion=k == 0, lesion_rate=lesion_rate,
                             min_lesion_pixels=min_lesion_pixels) for k in range(studies)]
    rng = _rng(seed, 0)
    # about 15% of patients have two studies
    patients, k = [], 0
    while k < studies:
        repeat = 2 if k + 1 < studies and rng.random() < 0.15 else 1
        patients += ["ID_" + _hex(seed, "patient", k)[:8]] * repeat
        k += repeat
    plans, seen = [], set()
    for k, geom in enumerate(geoms):
        ids = []
        for z in range(geom.n_slices):
            salt = 0
            while (image_id := "ID_" + _hex(seed, k, z, salt)[:9]) in seen:   # names must be unique
                salt += 1
            seen.add(image_id)
            ids.append(image_id)
        srng = _rng(seed, 2, k)
        plans.append(StudyPlan(k, geom, patients[k], tuple(ids), str(srng.choice(["u16", "u12", "s16"],
                               p=[0.5, 0.3, 0.2])), (float(srng.choice([40, 36, 30])), 80.0)))
    all_ids = [i for p in plans for i in p.image_ids]
    counts = _quirk_counts(len(all_ids), studies)
    picks = iter(rng.choice(len(all_ids), size=sum(counts.values()), replace=False).tolist())
    quirks = {name: sorted(all_ids[next(picks)] for _ in range(counts.get(name, 0))) for name in QUIRKS[:-1]}
    reversed_studies = rng.choice(studies, size=max(1, studies // 10), replace=False) if studies >= 3 else []
    quirks["reversed_instance_number"] = sorted(i for k in reversed_studies for i in plans[k].image_ids)
    return plans, quirks


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
    A: float                 # outer-skull semi-axes on this slice
    B: float
    u: np.ndarray            # lateral, AP, angle around the head
    v: np.ndarray
    theta: np.ndarray
    depth: np.ndarray        # radial depth below the outer skull surface
    inner: np.ndarray        # depth below the inner skull surface
    sulci: np.ndarray | None = None
    vent: np.ndarray | None = None
    vent_level: tuple[float, float] = (0.0, 0.0)   # ventricles' AP center and semi-axis


def _frame(geom: StudyGeometry, z: int, shape: tuple[int, int]) -> _Frame:
    s = math.sqrt(max(0.25, 1 - (1.7 * ((z + 0.5) / geom.n_slices - 0.5)) ** 2))   # head narrows at top/bottom
    A, B = geom.axes[0] * s, geom.axes[1] * s
    # Only the head's bounding box needs drawing; the rest is air.
    (rows, cols), half = shape, (max(A, B) + SCALP_MM + 2) / geom.spacing
    cr, cc = (rows - 1) / 2 + geom.center[1] / geom.spacing, (cols - 1) / 2 + geom.center[0] / geom.spacing
    win = (slice(max(0, int(cr - half)), min(rows, int(cr + half) + 2)),
           slice(max(0, int(cc - half)), min(cols, int(cc + half) + 2)))
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
    brain, phase = fr.inner > CSF_RIM_MM, geom.sulci[1] + 0.9 * z     # sulci move a little from slice to slice
    fr.sulci = brain & (fr.inner < 12) & (ck * math.cos(phase) - sk * math.sin(phase) > 0.9 + deep * fr.inner)
    fr.sulci |= brain & (np.abs(fr.u) < 0.9) & (np.abs(fr.v) > 0.4 * fr.B)    # interhemispheric fissure
    w[fr.sulci] = CSF_HU
    v0, v1 = geom.ventricles
    if v0 <= z <= v1:   # paired lateral ventricles, close together in front, diverging posteriorly
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
        dth *= np.float32(1 / half_width)   # 0 at the lesion's center angle, 1 at its ends
        if les.subtype == "subarachnoid":   # thin blood along the brain surface and down the sulci
            return (dth < 1) & (((fr.inner > 0.2) & (fr.inner < 1.8)) | (fr.sulci & (fr.inner < 12 * f)))
        profile = 1 - dth ** 2 if les.subtype == "epidural" else 1 - dth ** 4   # biconvex lens vs crescent
        return (dth < 1) & (fr.inner > -0.5) & (fr.inner < les.size * f * profile)
    if les.subtype == "intraparenchymal":   # a rounded blob in the brain tissue
        radial = les.extent * (fr.A - 15)
        uc, vc, r = radial * math.cos(les.angle), radial * math.sin(les.angle) * fr.B / fr.A, les.size * f
        return (((fr.u - uc) / r) ** 2 + ((fr.v - vc) / (0.8 * r)) ** 2 < 1) & (fr.inner > CSF_RIM_MM)
    if fr.vent is None:   # intraventricular: the dependent (posterior) part of the ventricles fills with blood
        return np.zeros(fr.u.shape, bool)
    vc, b = fr.vent_level
    side = {0: fr.u < 0, 1: fr.u > 0, 2: True}[int(les.angle)]
    return fr.vent & (fr.v > vc + b * (1 - 2 * les.extent * f)) & side


def _draw_lesions(geom: StudyGeometry, z: int, fr: _Frame, w: np.ndarray):
    """Paint the lesions active on slice z into w; returns [(lesion index, mask)], edema mask, visible counts."""
    masks = [(i, _lesion_mask(les, _taper(z, les.first, les.last), fr)) for i, les in enumerate(geom.lesions)
             if les.first <= z <= les.last]
    counts, covered = {}, np.zeros(w.shape, bool)
    for i, m in reversed(masks):   # later lesions overwrite earlier ones: count what stays visible
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
    for i, m in masks:   # a hypodense rim of edema around a parenchymal bleed
        if geom.lesions[i].subtype == "intraparenchymal":
            edema |= cv2.dilate(m.view(np.uint8), np.ones((9, 9), np.uint8)).view(bool)
    edema &= (fr.inner > CSF_RIM_MM) & ~covered
    w[edema] = EDEMA_HU
    for i, m in masks:
        w[m] = geom.lesions[i].hu
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
        t = np.select([fr.depth < -SCALP_MM, fr.depth < 0, fr.inner < 0, (fr.inner <= CSF_RIM_MM) | fr.sulci],
                      [AIR, SCALP, BONE, CSF], BRAIN).astype(np.uint8)
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


def render_slice(geom: StudyGeometry, z: int, shape: tuple[int, int],
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """HU image (float32, with noise) of slice z, and the visible pixel count of each subtype drawn on it."""
    hu, counts, _ = _draw(geom, z, shape)
    rows, cols = shape
    oy, ox = (int(x) for x in rng.integers(0, [BANK_SIZE - rows + 1, BANK_SIZE - cols + 1]))
    hu += _noise_bank()[oy:oy + rows, ox:ox + cols]
    pixels = dict.fromkeys(SUBTYPES, 0)
    for i, n in counts.items():
        pixels[geom.lesions[i].subtype] += n
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


def _dataset(seed: int, plan: StudyPlan, z: int, pixels: np.ndarray, storage: str, quirks: set[str],
             wrap_intercept: int) -> Dataset:
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
    ds.ImagePositionPatient = [f"{-(cols / 2) * geom.spacing:.3f}", f"{-(rows / 2) * geom.spacing:.3f}",
                               f"{geom.z0 + SLICE_MM * z:.1f}"]
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


def _write_study(seed: int, plan: StudyPlan, dicom_dir: Path, quirk_of: dict[str, set[str]],
                 odd_shape: dict[str, tuple[int, int]], wrap_intercept: dict[str, int]) -> dict[str, dict[str, int]]:
    geom, labels = plan.geometry, {}
    # Writing order is shuffled so that file timestamps do not give the slice order away.
    for z in _rng(seed, 3, plan.index).permutation(geom.n_slices).tolist():
        image_id = plan.image_ids[z]
        quirks = quirk_of.get(image_id, set())
        hu, pixels = render_slice(geom, z, odd_shape.get(image_id, (512, 512)), _rng(seed, 1, plan.index, z))
        storage = next((q for q in ("wrap12", "signed") if q in quirks), plan.storage)
        ds = _dataset(seed, plan, z, encode_hu(hu, storage), storage, quirks, wrap_intercept.get(image_id, 0))
        pydicom.dcmwrite(dicom_dir / f"{image_id}.dcm", ds, enforce_file_format=True)
        if "unlabelled" not in quirks:
            labels[image_id] = slice_labels(pixels, geom.min_lesion_pixels)
    return labels


def _write_csv(path: Path, labels: dict[str, dict[str, int]]) -> None:
    """Kaggle layout: header ID,Label and six rows per image (subtypes, then any); images in id order."""
    with open(path, "w", newline="\n") as f:
        f.write("ID,Label\n")
        for image_id in sorted(labels):
            f.writelines(f"{image_id}_{name},{labels[image_id][name]}\n" for name in LABELS)


def generate(out_dir: str | os.PathLike, studies: int, seed: int = 0,
             progress: Callable[[int], None] | None = None, lesion_rate: float = 0.4,
             min_lesion_pixels: int = MIN_LESION_PIXELS) -> SynthSummary:
    """Write a synthetic RSNA-style dataset of ``studies`` studies to ``out_dir``; same seed, same bytes.

    ``lesion_rate``: chance that a study has hemorrhage (0.4 as in the real archive; raise it for an
    easier, positive-rich training set). ``min_lesion_pixels``: a lesion covering fewer pixels (at 512²)
    on a slice is neither drawn nor labelled there; raise it (e.g. 600) for a set whose every label is
    visible at low resolution.
    """
    if min_lesion_pixels < 1:
        raise ValueError(f"min_lesion_pixels must be >= 1, got {min_lesion_pixels}")
    if not 0.0 <= lesion_rate <= 1.0:
        raise ValueError(f"lesion_rate must be between 0 and 1, got {lesion_rate}")
    if isinstance(studies, bool) or not isinstance(studies, (int, np.integer)) or studies < 1:
        raise ValueError(f"studies must be an integer >= 1, got {studies!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    out_dir = Path(out_dir)
    dicom_dir, labels_csv = out_dir / "stage_2_train", out_dir / "stage_2_train.csv"
    if dicom_dir.is_dir() and any(dicom_dir.glob("*.dcm")):
        raise FileExistsError(f"{dicom_dir} already holds DICOM files; synth writes into an empty folder only")
    dicom_dir.mkdir(parents=True, exist_ok=True)
    plans, quirks = plan_dataset(int(studies), int(seed), lesion_rate, int(min_lesion_pixels))
    quirk_of: dict[str, set[str]] = {}
    for name, ids in quirks.items():
        for image_id in ids:
            quirk_of.setdefault(image_id, set()).add(name)
    odd_shape = {i: ODD_SIZES[n % len(ODD_SIZES)] for n, i in enumerate(quirks["odd_size"])}
    wrap_intercept = {i: 1 if n % 3 == 2 else 0 for n, i in enumerate(quirks["wrap12"])}
    labels: dict[str, dict[str, int]] = {}
    for plan in plans:
        labels |= _write_study(int(seed), plan, dicom_dir, quirk_of, odd_shape, wrap_intercept)
        logger.debug("study %d: %d slices, lesions %s", plan.index, plan.geometry.n_slices,
                     [les.subtype for les in plan.geometry.lesions])
        if progress is not None:
            progress(plan.geometry.n_slices)
    _write_csv(labels_csv, labels)
    n_slices = sum(p.geometry.n_slices for p in plans)
    summary = SynthSummary(out_dir, dicom_dir, labels_csv, len(plans), len({p.patient_id for p in plans}), n_slices,
                           sum(lab["any"] for lab in labels.values()), n_slices - len(labels), quirks)
    logger.info("synth: %d slices of %d studies (%d positive) in %s", n_slices, len(plans),
                summary.n_positive_slices, dicom_dir)
    return summary
