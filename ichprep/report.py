"""Looking at a store: ``ichprep info`` (spec, counts, label prevalence, sizes) and ``ichprep show`` (a PNG montage).

Both only read: the store contract of :mod:`ichprep.storage.store` plus ``manifest.json`` and ``rejected.csv``.
The montage reads a study with one ``images[start:stop]`` call (studies are contiguous runs of slices in
z order): every zarr call has a fixed cost, which a per-slice loop would pay once a slice.
"""

from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .errors import StoreError, repair_hint
from .reading.labels import LABELS
from .reading.series import SERIES_LEFT_OUT, decision_counts
from .storage.damage import Problem, check_files
from .storage.location import as_location
from .storage.manifest import load_manifest
from .storage.store import (
    REJECTED,
    SERIES,
    SLABS,
    SLICES,
    STUDIES,
    Store,
    count_patients,
    open_store,
    read_attrs,
    read_parquet,
    store_files,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- info


def _fraction(part: int, whole: int) -> float | None:
    return part / whole if whole else None  # None, not NaN: the dict must stay valid JSON


def store_info(root: str | Path) -> dict:
    """Everything ``ichprep info`` shows, as plain JSON-serialisable Python values."""
    root = as_location(root)
    manifest = load_manifest(None, root)
    problems = check_files(root, manifest["files"], hashes=False).problems + unreadable_tables(root)
    broken = [p for p in problems if p.kind == "table"]
    if any(p.path in (SLICES, STUDIES) for p in broken):
        raise StoreError(
            f"{root}: its tables do not read:\n"
            + "\n".join(f"  {p}" for p in problems)
            + f"\nTo repair: {repair_hint(root)}"
        )
    store = open_store(root, check_files=False)  # the files' problems are reported below, not raised
    attrs = read_attrs(root)
    slices, spec = store.slices, store.spec
    ok = slices["ok"].to_numpy(bool)

    # Prevalence over decoded slices that carry the label: zero-filled failures would count as
    # negatives otherwise, and unlabelled files (test images, CSV gaps) are not negatives either.
    prevalence = {}
    for name in LABELS:
        known = ok & slices[name].notna().to_numpy()
        positive = int((slices.loc[known, name] == 1).sum())
        prevalence[name] = {
            "positive": positive,
            "labelled": int(known.sum()),
            "fraction": _fraction(positive, int(known.sum())),
        }
    # A study is positive when any of its labelled, decoded slices is; it counts once however many are.
    labelled_any = slices.loc[ok & slices["any"].notna().to_numpy(), ["study_uid", "any"]]
    per_study = labelled_any.groupby("study_uid")["any"].max()
    # Studies labelled as a whole (convert --study-labels) count by their studies.parquet label.
    whole = store.studies.set_index("study_uid")["any"].dropna()
    per_study = pd.concat([per_study, whole[~whole.index.isin(per_study.index)]])
    studies_positive = int((per_study == 1).sum())

    # Sizes from the files actually on disk (a copied store may differ from the manifest), leaving out
    # the converter's private state; source bytes only exist in the manifest.
    files = store_files(root)
    store_bytes = sum(root.size(name) for name in files)
    source_bytes = int(manifest["source"]["bytes"])
    rejected = pd.Series(dtype=str)
    if root.isfile(REJECTED):
        with root.open(REJECTED) as f:
            rejected = pd.read_csv(f, dtype=str)["reason"]
        rejected = rejected[rejected != SERIES_LEFT_OUT]  # decisions, shown under "series"
    return {
        "store": root.url,
        "spec": {
            "windows": [w.to_dict() for w in spec.windows],
            "size": spec.size,
            "interpolation": attrs.get("interpolation", "unknown"),
            "shard_slices": spec.shard_slices,
            "compressor": spec.compressor,
            "compression_level": spec.compression_level,
        },
        "counts": {
            "slices": len(slices),
            "ok": int(ok.sum()),
            "pixel_failures": int((~ok).sum()),
            "header_failures": int(manifest["counts"]["header_failures"]),
            "studies": len(store.studies),
            "patients": count_patients(slices),
            "shards": store.n_shards,
            "files": len(files),
            "rejected": {str(k): int(v) for k, v in rejected.value_counts().sort_index().items()},
        },
        "labels": {
            "slices": prevalence,
            "unlabelled_slices": int(slices[list(LABELS)].isna().all(axis=1).sum()),
            "studies_any": {
                "positive": studies_positive,
                "labelled": len(per_study),
                "fraction": _fraction(studies_positive, len(per_study)),
            },
        },
        "series": None if any(p.path in (SERIES, SLABS) for p in broken) else _series_info(root, attrs),
        "size": {
            "store_bytes": store_bytes,
            "bytes_per_slice": store_bytes / len(slices) if len(slices) else None,
            "source_bytes": source_bytes,
            "source_files": int(manifest["source"]["n_files"]),
            "ratio": _fraction(store_bytes, source_bytes),
        },
        "files_checked": len(manifest["files"]),
        "problems": [str(p) for p in problems],
    }


def unreadable_tables(root) -> list[Problem]:
    """Every table of the store (Parquet and rejected.csv) that is present but does not read, with the reason."""
    problems = []
    for name in (SLICES, STUDIES, SERIES, SLABS):
        if root.isfile(name):
            try:
                read_parquet(root, name)
            except StoreError as exc:
                problems.append(Problem(name, "table", f"does not read ({exc.__cause__ or exc})"))
    if root.isfile(REJECTED):
        try:
            with root.open(REJECTED) as f:
                pd.read_csv(f, dtype=str)
        except (OSError, ValueError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
            problems.append(Problem(REJECTED, "table", f"does not read ({exc})"))
    return problems


def _series_info(root, attrs: dict) -> dict | None:
    """Series kept and left out (by reason), slabs and the image-id rule; None for a store older than series.parquet."""
    if not root.isfile(SERIES):
        return None
    series = read_parquet(root, SERIES)
    n_slabs = int(read_parquet(root, SLABS)["image_id"].nunique()) if root.isfile(SLABS) else 0
    reasons = series.loc[~series["kept"].astype(bool), "reason"].astype(str)
    return {
        "seen": len(series),
        "decisions": decision_counts(series),
        "left_out": {str(k): int(v) for k, v in reasons.value_counts().sort_index().items()},
        "slabs": n_slabs,
        "image_ids": attrs.get("image_ids", "file_name"),
    }


def format_bytes(n: float | None) -> str:
    """Binary units, as ``ichprep convert`` and ``verify`` print them: ``39.3 MiB``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def format_info(info: dict) -> str:
    """Render :func:`store_info` as the text table ``ichprep info`` prints."""
    spec, counts, labels, size = info["spec"], info["counts"], info["labels"], info["size"]
    rejected = ", ".join(f"{k} {v}" for k, v in counts["rejected"].items()) or "none"
    lines = [
        f"ichkit store  {info['store']}",
        "",
        "Preprocessing",
        f"  image size       {spec['size']} x {spec['size']} ({spec['interpolation']})",
        f"  layout           {spec['shard_slices']} slices/shard, "
        f"{spec['compressor']} level {spec['compression_level']}",
        f"  {'window':<16} {'center':>8} {'width':>8}",
        *(f"  {w['name']:<16} {w['center']:>8g} {w['width']:>8g}" for w in spec["windows"]),
        "",
        "Counts",
        f"  slices           {counts['slices']} ({counts['ok']} ok, {counts['pixel_failures']} pixel failures)",
        f"  header failures  {counts['header_failures']} (files left out)",
        f"  rejected         {rejected}",
        f"  studies          {counts['studies']}",
        f"  patients         {counts['patients']}",
        f"  shards           {counts['shards']}",
        f"  files in store   {counts['files']}",
        "",
        f"Labels (ok slices; {labels['unlabelled_slices']} slices unlabelled)",
        f"  {'label':<20} {'positive':>9} {'labelled':>9} {'fraction':>9}",
    ]
    rows = [(name, p) for name, p in labels["slices"].items()] + [("any (studies)", labels["studies_any"])]
    lines += [f"  {name:<20} {p['positive']:>9} {p['labelled']:>9} {_pct(p['fraction']):>9}" for name, p in rows]
    lines += _format_series(info["series"])
    ratio = "n/a" if not size["ratio"] else f"{size['ratio']:.3f} ({1 / size['ratio']:.1f}x smaller)"
    lines += [
        "",
        "Size",
        f"  store            {format_bytes(size['store_bytes'])} ({format_bytes(size['bytes_per_slice'])} per slice)",
        f"  source DICOM     {format_bytes(size['source_bytes'])} ({size['source_files']} files)",
        f"  store / source   {ratio}",
        "",
        "Files (presence and size against manifest.json; the sha256 of each is `ichprep verify`'s)",
    ]
    if info["problems"]:
        lines += [f"  {p}" for p in info["problems"]]
    else:
        lines.append(f"  all {info['files_checked']} files present, each of its manifest size")
    return "\n".join(lines)


def _format_series(series: dict | None) -> list[str]:
    if series is None:
        return []
    decisions = series["decisions"]
    left = sum(v for k, v in decisions.items() if k != "kept")
    lines = ["", f"Series ({series['seen']} seen; every decision in series.parquet)"]
    lines.append(f"  kept             {decisions.get('kept', 0)}")
    lines.append(f"  left out         {left}")
    lines += [f"    {reason:<40} {n:>5}" for reason, n in decisions.items() if reason != "kept"]
    lines.append(f"  slabs            {series['slabs']}")
    lines.append(f"  image ids        {series['image_ids'].replace('_', ' ')}s")
    return lines


# ---------------------------------------------------------------- montage

FONT = cv2.FONT_HERSHEY_SIMPLEX
GAP, CAPTION_W, TITLE_H, HEADER_H, LINE_H = 8, 240, 74, 44, 18
BIG_PANEL, SMALL_PANEL, BIG_PANEL_ROWS = 256, 128, 12  # at most 12 rows get full-size panels
# RGB colours (the image is RGB; save_montage converts to OpenCV's BGR).
BG, TEXT, DIM = (20, 20, 24), (230, 230, 230), (150, 150, 160)
POSITIVE, STRIPE, NEGATIVE = (255, 150, 40), (230, 45, 45), (140, 200, 140)
FAILED, HIGHLIGHT = (235, 90, 210), (255, 220, 0)


@dataclass(frozen=True)
class MontageLayout:
    """Pixel geometry: title, header row, then one row per slice (caption column + one panel per window)."""

    n_rows: int
    n_cols: int
    panel: int

    @property
    def width(self) -> int:
        return CAPTION_W + self.n_cols * (self.panel + GAP) + GAP

    @property
    def height(self) -> int:
        return TITLE_H + HEADER_H + self.n_rows * (self.panel + GAP) + GAP

    def panel_origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of panel (row, col)."""
        return TITLE_H + HEADER_H + GAP + row * (self.panel + GAP), CAPTION_W + GAP + col * (self.panel + GAP)


def _text(canvas, text, x, y, color, scale=0.45, thickness=1, max_w=None) -> None:
    """putText, shrinking then truncating with '...' so the text never runs out of its box."""
    if max_w is not None:
        while scale > 0.35 and cv2.getTextSize(text, FONT, scale, thickness)[0][0] > max_w:
            scale -= 0.05
        while len(text) > 4 and cv2.getTextSize(text, FONT, scale, thickness)[0][0] > max_w:
            text = text[:-4] + "..."
    cv2.putText(canvas, text, (int(x), int(y)), FONT, scale, color, thickness, cv2.LINE_AA)


def _wrap(text: str, max_w: int, scale=0.45) -> list[str]:
    """Break a comma-separated label list into lines that fit ``max_w`` pixels."""
    lines: list[str] = []
    for word in text.split(" "):
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(trial, FONT, scale, 1)[0][0] <= max_w:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def _status(row) -> tuple[list[tuple[str, tuple]], bool]:
    """Caption lines (text, colour) for a slice's labels, and whether it is labelled positive.

    A failed slice keeps its labels in the caption: a zero-filled positive is worth noticing.
    """
    values = [(name, row[name]) for name in LABELS]
    positive = [name for name, v in values if not pd.isna(v) and v == 1]
    if positive:
        lines = [(", ".join(positive), POSITIVE)]
    elif all(pd.isna(v) for _, v in values):
        lines = [("unlabelled", DIM)]
    else:
        lines = [("negative", NEGATIVE)]
    if not row["ok"]:
        lines.insert(0, (f"NOT OK: {str(row['error']).split(':', 1)[0]}", FAILED))
    return lines, bool(positive)


def _unknown_study(store: Store, study: str) -> ValueError:
    """A clear error, with the nearest UID(s) or the right option when the string is another kind of id."""
    where = f"no study {study!r} among the {len(store.studies)} studies of {store.root}"
    how = f"study UIDs are listed in {store.root.child_url(STUDIES)} (column study_uid); `ichprep info` shows counts"
    slices = store.slices
    for column, hint in (
        ("image_id", "that is an image id: use --slot {i}"),
        ("series_uid", "that is a series UID (slot {i}): use --slot {i}"),
    ):
        hit = np.flatnonzero((slices[column] == study).fillna(False).to_numpy())
        if len(hit):
            return ValueError(f"{where}; {hint.format(i=int(hit[0]))}")
    uids = store.studies["study_uid"].astype(str).tolist()
    # Every RSNA UID shares a long root (1.2.826.0.1.3680043.8.498.), so only a match beyond it means anything.
    shared = len(os.path.commonprefix(uids)) if len(uids) > 1 else 0
    match = [len(os.path.commonprefix([u, study])) for u in uids]
    best = max(match, default=0)
    near = [u for u, m in zip(uids, match) if m == best][:3] if best > shared else []
    return ValueError(f"{where}; " + (f"did you mean {' or '.join(near)}? " if near else "") + how)


def _pick(n: int, max_slices: int, keep: int | None) -> np.ndarray:
    """Evenly spaced rows of a study with more than ``max_slices`` slices, always including ``keep``."""
    if n <= max_slices:
        return np.arange(n)
    pick = np.unique(np.linspace(0, n - 1, max_slices).round().astype(int))
    if keep is not None and keep not in pick:
        pick[np.abs(pick - keep).argmin()] = keep
    return np.unique(pick)


def _draw_row(canvas, layout: MontageLayout, r: int, i: int, row: dict, image: np.ndarray, selected: bool) -> None:
    """Row ``r`` of the montage: caption of store slice ``i`` (its table ``row``), then its (C, H, W) ``image``."""
    side = layout.panel
    y, _ = layout.panel_origin(r, 0)
    status, positive = _status(row)
    if selected:  # framed in the gap around the row, so the panel pixels stay untouched
        cv2.rectangle(canvas, (2, y - GAP // 2 - 1), (layout.width - 3, y + side + GAP // 2), HIGHLIGHT, 3)
    if positive:  # a red bar down the row's left edge: positives stand out when scrolling a long study
        canvas[y : y + side, 4:9] = STRIPE
    z = "n/a" if pd.isna(row["z"]) else f"{row['z']:.1f}"
    inst = "n/a" if pd.isna(row["instance_number"]) else str(row["instance_number"])
    lines = [
        (f"#{i}" + ("  < selected" if selected else ""), HIGHLIGHT if selected else TEXT, 0.5),
        (str(row["image_id"]), DIM, 0.4),
        (f"z {z}  inst {inst}", TEXT, 0.45),
    ]
    lines += [(line, colour, 0.45) for text, colour in status for line in _wrap(text, CAPTION_W - 24)]
    for n, (text, colour, scale) in enumerate(lines):
        if 16 + n * LINE_H <= side:  # never spill into the next row
            _text(canvas, text, 16, y + 16 + n * LINE_H, colour, scale, max_w=CAPTION_W - 24)
    for c, channel in enumerate(image):
        if side != channel.shape[0]:  # INTER_AREA to shrink (no aliasing), nearest to enlarge (no blur)
            channel = cv2.resize(
                channel, (side, side), interpolation=cv2.INTER_AREA if side < channel.shape[0] else cv2.INTER_NEAREST
            )
        py, px = layout.panel_origin(r, c)
        canvas[py : py + side, px : px + side] = channel[..., None]
        if not row["ok"]:  # zero-filled slot: cross it out so it is not mistaken for an empty slice
            cv2.line(canvas, (px, py), (px + side - 1, py + side - 1), FAILED, 1)
            cv2.line(canvas, (px + side - 1, py), (px, py + side - 1), FAILED, 1)


def render_montage(
    root: str | Path, study: str | None = None, slot: int | None = None, max_slices: int = 40, panel: int | None = None
) -> np.ndarray:
    """An (H, W, 3) uint8 RGB picture of one study: a row per slice in z order, a column per window.

    Give exactly one of ``study`` (a study UID) or ``slot`` (a slice of the store: its study is shown
    and that slice framed in yellow). ``panel`` is the panel side in pixels (default 256, or 128 when
    more than 12 rows are drawn).
    """
    if (study is None) == (slot is None):
        raise ValueError("give exactly one of study (a study UID) or slot (a row of the store)")
    if max_slices < 1:
        raise ValueError(f"max_slices must be at least 1, got {max_slices}")
    if panel is not None and not 64 <= panel <= 1024:  # below 64 px the caption no longer fits a row
        raise ValueError(f"panel must be between 64 and 1024 pixels, got {panel}")
    store = open_store(root)
    n = len(store.slices)
    if slot is not None:
        slot = operator.index(slot)
        if not 0 <= slot < n:
            raise ValueError(f"slot {slot} is out of range: {store.root} has {n} slices (0..{n - 1})")
        hit = store.studies[(store.studies["start"] <= slot) & (slot < store.studies["stop"])]
    else:
        hit = store.studies[store.studies["study_uid"] == study]
        if hit.empty:
            raise _unknown_study(store, study)
    info = hit.iloc[0]
    start, stop = int(info["start"]), int(info["stop"])
    pick = _pick(stop - start, max_slices, None if slot is None else slot - start)
    stack = np.asarray(store.images[start:stop])[pick]  # the one read of this study
    rows = store.slices.iloc[start + pick]

    windows = store.spec.windows
    side = panel or (BIG_PANEL if len(pick) <= BIG_PANEL_ROWS else SMALL_PANEL)
    layout = MontageLayout(len(pick), len(windows), side)
    canvas = np.empty((layout.height, layout.width, 3), np.uint8)
    canvas[:] = BG

    # Title: the study, how much of it is shown, and its study-level labels (studies.parquet maxima,
    # worded like a slice caption).
    study_labels, colour = _status({**info, "ok": True})[0][0]
    _text(canvas, f"study {info['study_uid']}", 10, 22, TEXT, 0.5, max_w=layout.width - 20)
    _text(
        canvas,
        f"patient {info['patient_id']}   slices {start}:{stop} ({stop - start}, showing {len(pick)})",
        10,
        44,
        DIM,
        max_w=layout.width - 20,
    )
    _text(canvas, f"study labels: {study_labels}", 10, 64, colour, max_w=layout.width - 20)
    # Header row: the caption column's legend, then each window's name and HU range.
    _text(canvas, "slice / z / instance / labels", 10, TITLE_H + 26, DIM, 0.4)
    for col, window in enumerate(windows):
        _, x = layout.panel_origin(0, col)
        _text(canvas, window.name, x + 2, TITLE_H + 18, TEXT, 0.55, max_w=side - 4)
        _text(canvas, f"c {window.center:g}  w {window.width:g}", x + 2, TITLE_H + 36, DIM, 0.4, max_w=side - 4)

    for r, (k, row) in enumerate(zip(pick, rows.to_dict("records"))):
        _draw_row(canvas, layout, r, start + int(k), row, stack[r], selected=start + int(k) == slot)
    return canvas


def save_montage(
    root: str | Path,
    out_png: str | Path,
    study: str | None = None,
    slot: int | None = None,
    max_slices: int = 40,
    panel: int | None = None,
) -> Path:
    """Render :func:`render_montage` and write it as a PNG; returns the path written."""
    image = render_montage(root, study=study, slot=slot, max_slices=max_slices, panel=panel)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out} (OpenCV needs a .png name and a writable folder)")
    logger.info("wrote a %d x %d montage to %s", image.shape[1], image.shape[0], out)
    return out
