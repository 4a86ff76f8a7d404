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

__all__ = ["SUBTYPES", "SynthSummary", "StudyGeometry", "Lesion", "generate", "plan_dataset",
           "render_slice", "slice_regions", "encode_hu"]

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
    return generate_uid(entropy_srcs=["ichkit-synth", str(seed), *map(str, parts)])


def _lesion(subtype: str, n: int, geom_vent: tuple[int, int], rng: np.random.Generator) -> Lesion:
    lo, hi = geom_vent if subtype == "intraventricular" else (int(0.15 * n), int(0.85 * n))
    length = int(min(rng.integers(3, 11), hi - lo + 1))
    first = int(rng.integers(lo, hi - length + 2))
    lateral = rng.choice([0.0, math.pi]) + rng.normal(0, 0.45)   # convexity lesions sit mostly laterally
    angle, extent, size = {
        "epidural": (lateral, rng.uniform(0.3, 0.5), rng.uniform(8, 15)),
        "subdural": (lateral, rng.uniform(0.6, 1.1), rng.uniform(4, 9)),
        "subarachnoid": (rng.uniform(-math.pi, math.pi), rng.uniform(0.4, 0.9), 0.0),
        "intraparenchymal": (rng.uniform(-math.pi, math.pi), rng.uniform(0.2, 0.55), rng.uniform(7, 16)),
        "intraventricular": (float(rng.integers(0, 3)), rng.uniform(0.35, 0.7), 0.0),
    }[subtype]
    return Lesion(subtype, first, first + length - 1, float(angle), float(extent), float(size),
                  float(rng.uniform(62, 78)))


def _study_geometry(rng: np.random.Generator) -> StudyGeometry:
    n = int(rng.integers(20, 41))
    lateral = rng.uniform(64, 72)
    vent = (int(0.38 * n), int(0.70 * n))
    lesions: tuple[Lesion, ...] = ()
    if rng.random() < 0.4:
        kinds = rng.choice(SUBTYPES, size=2 if rng.random() < 0.25 else 1, replace=False, p=SUBTYPE_WEIGHTS)
        lesions = tuple(_lesion(str(k), n, vent, rng) for k in kinds)
    return StudyGeometry(
        n_slices=n, z0=round(float(rng.uniform(-150, 30)), 1), spacing=float(rng.choice(SPACINGS)),
        center=(float(rng.normal(0, 5)), float(rng.normal(0, 5))), tilt=float(rng.normal(0, 0.06)),
        axes=(float(lateral), float(lateral * rng.uniform(1.15, 1.28))), skull_mm=float(rng.uniform(5, 7.5)),
        ventricles=vent, vent_axes=(float(rng.uniform(4, 6.5)), float(rng.uniform(17, 25))),
        sulci=(int(rng.integers(16, 26)), float(rng.uniform(0, 2 * math.pi))), lesions=lesions)


def _quirk_counts(n_slices: int, n_studies: int) -> dict[str, int]:
    counts = {"truncated_pixels": 1, "wrap12": max(1, n_slices // 150)}
    if n_studies >= 2:   # a one-study dataset stays (almost) clean
        counts |= {"signed": max(1, n_slices // 150), "multiwindow": max(1, n_slices // 100),
                   "odd_size": max(2, n_slices // 200), "unlabelled": max(1, n_slices // 200)}
    return counts


def plan_dataset(studies: int, seed: int) -> tuple[list[StudyPlan], dict[str, list[str]]]:
    """Everything about the dataset except pixels: studies, patients, image ids, and the quirky slices."""
    geoms = [_study_geometry(_rng(seed, 1, k)) for k in range(studies)]
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


def _lesion_mask(les: Lesion, f: float, c: dict) -> np.ndarray:
    if les.subtype in ("epidural", "subdural", "subarachnoid"):
        dth = np.abs((c["theta"] - np.float32(les.angle) + np.float32(math.pi)) % np.float32(2 * math.pi)
                     - np.float32(math.pi)) / np.float32(les.extent * (f if les.subtype == "subarachnoid" else 1))
        inner = c["inner"]
        if les.subtype == "subarachnoid":   # thin blood along the brain surface and down the sulci
            return (dth < 1) & (((inner > 0.2) & (inner < 1.8)) | (c["sulci"] & (inner < 12 * f)))
        profile = 1 - dth ** 2 if les.subtype == "epidural" else 1 - dth ** 4   # lens vs crescent
        return (dth < 1) & (inner > -0.5) & (inner < les.size * f * profile)
    if les.subtype == "intraparenchymal":
        scale = les.extent * (c["A"] - 15)
        uc, vc = scale * math.cos(les.angle), scale * math.sin(les.angle) * c["B"] / c["A"]
        r = les.size * f
        return ((c["u"] - uc) / r) ** 2 + ((c["v"] - vc) / (0.8 * r)) ** 2 < 1
    if c["vent"] is None:   # intraventricular: the dependent (posterior) part of the ventricles fills with blood
        return np.zeros(c["u"].shape, bool)
    level = c["vent_v"] + c["vent_b"] * (1 - 2 * les.extent * f)
    side = {0: c["u"] < 0, 1: c["u"] > 0, 2: True}[int(les.angle)]
    return c["vent"] & (c["v"] > level) & side


def _draw(geom: StudyGeometry, z: int, shape: tuple[int, int], codes: bool = False):
    """Noise-free HU (float32), lesion pixel counts, and (if codes) a tissue code map."""
    hu = np.full(shape, AIR_HU, np.float32)
    tissue = np.zeros(shape, np.uint8) if codes else None
    s = math.sqrt(max(0.25, 1 - (1.7 * ((z + 0.5) / geom.n_slices - 0.5)) ** 2))   # head narrows at top/bottom
    A, B = geom.axes[0] * s, geom.axes[1] * s
    # Only the head's bounding box needs drawing; the rest is air.
    rows, cols = shape
    half = (max(A, B) + SCALP_MM + 2) / geom.spacing
    cr, cc = (rows - 1) / 2 + geom.center[1] / geom.spacing, (cols - 1) / 2 + geom.center[0] / geom.spacing
    win = (slice(max(0, int(cr - half)), min(rows, int(cr + half) + 2)),
           slice(max(0, int(cc - half)), min(cols, int(cc + half) + 2)))
    u, v, rho, theta, ck, sk, deep = (g[win] for g in _grids(shape, geom.spacing, geom.center, geom.tilt, geom.sulci[0]))
    r = np.sqrt((u / np.float32(A)) ** 2 + (v / np.float32(B)) ** 2)
    # Radial depth (mm) below the outer skull; oblique cuts near vertex and base show a thicker skull.
    depth = rho * (1 / np.maximum(r, np.float32(1e-3)) - 1) * np.float32(math.sqrt(s))
    lut = _depth_lut(geom.skull_mm)
    w = lut[np.clip((depth - LUT_START) * (1 / LUT_STEP), 0, len(lut) - 1).astype(np.intp)]
    inner = depth - np.float32(geom.skull_mm)
    brain = inner > CSF_RIM_MM
    phase = geom.sulci[1] + 0.9 * z
    sulci = brain & (inner < 12) & (ck * math.cos(phase) - sk * math.sin(phase) > 0.9 + deep * inner)
    sulci |= brain & (np.abs(u) < 0.9) & (np.abs(v) > 0.4 * B)    # interhemispheric fissure
    w[sulci] = CSF_HU
    c = {"theta": theta, "inner": inner, "sulci": sulci, "u": u, "v": v, "A": A, "B": B, "vent": None}
    v0, v1 = geom.ventricles
    if v0 <= z <= v1:   # paired lateral ventricles, diverging posteriorly
        fv = _taper(z, v0, v1)
        a, b, vc = geom.vent_axes[0] * fv, geom.vent_axes[1] * fv, -0.05 * B
        dv = v - np.float32(vc)
        c |= {"vent": ((np.abs(u) - (a + 1.0) - 0.2 * (dv + b)) / a) ** 2 + (dv / b) ** 2 < 1, "vent_v": vc, "vent_b": b}
        w[c["vent"]] = CSF_HU
    active = [(i, les) for i, les in enumerate(geom.lesions) if les.first <= z <= les.last]
    masks = [(i, les, _lesion_mask(les, _taper(z, les.first, les.last), c) & (inner > -0.5)) for i, les in active]
    for _, les, m in masks:   # edema: a hypodense rim around a parenchymal bleed
        if les.subtype == "intraparenchymal":
            w[cv2.dilate(m.view(np.uint8), np.ones((9, 9), np.uint8)).view(bool) & brain & ~m] = EDEMA_HU
    counts, covered = {}, np.zeros(w.shape, bool)
    for i, les, m in reversed(masks):   # later lesions overwrite earlier ones: count what stays visible
        counts[i] = int(np.count_nonzero(m & ~covered))
        covered |= m
    for _, les, m in masks:
        w[m] = les.hu
    hu[win] = w
    if tissue is not None:
        t = np.select([depth < -SCALP_MM, depth < 0, inner < 0, ~brain | sulci], [AIR, SCALP, BONE, CSF], BRAIN)
        t[w == EDEMA_HU] = EDEMA
        if c["vent"] is not None:
            t[c["vent"]] = CSF
        for i, les, m in masks:
            t[m] = LESION_CODE + i
        tissue[win] = t
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


def slice_labels(pixels: dict[str, int]) -> dict[str, int]:
    labels = {k: int(pixels[k] >= MIN_LESION_PIXELS) for k in SUBTYPES}
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
            labels[image_id] = slice_labels(pixels)
    return labels


def _write_csv(path: Path, labels: dict[str, dict[str, int]]) -> None:
    """Kaggle layout: header ID,Label and six rows per image (subtypes, then any); images in id order."""
    with open(path, "w", newline="\n") as f:
        f.write("ID,Label\n")
        for image_id in sorted(labels):
            f.writelines(f"{image_id}_{name},{labels[image_id][name]}\n" for name in LABELS)


def generate(out_dir, studies: int, seed: int = 0, progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Write a synthetic RSNA-style dataset of ``studies`` studies to ``out_dir``; same seed, same bytes."""
    if isinstance(studies, bool) or not isinstance(studies, (int, np.integer)) or studies < 1:
        raise ValueError(f"studies must be an integer >= 1, got {studies!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    out_dir = Path(out_dir)
    dicom_dir, labels_csv = out_dir / "stage_2_train", out_dir / "stage_2_train.csv"
    if dicom_dir.is_dir() and any(dicom_dir.glob("*.dcm")):
        raise FileExistsError(f"{dicom_dir} already holds DICOM files; synth writes into an empty folder only")
    dicom_dir.mkdir(parents=True, exist_ok=True)
    plans, quirks = plan_dataset(int(studies), int(seed))
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
