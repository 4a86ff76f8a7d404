"""ichprep.report: ``info`` numbers against the tables themselves, and the montage's layout and pixels."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest
import zarr

from ichprep.convert import convert
from ichprep.reading.labels import LABELS
from ichprep.report import (
    FAILED,
    GAP,
    HEADER_H,
    HIGHLIGHT,
    SMALL_PANEL,
    STRIPE,
    TITLE_H,
    MontageLayout,
    _pick,
    format_info,
    render_montage,
    save_montage,
    store_info,
)


@pytest.fixture(scope="module")
def store(synth_dataset, tmp_path_factory):
    """The 2-study synthetic dataset converted in-process (no Dask client)."""
    root = tmp_path_factory.mktemp("report") / "store.zarr"
    convert(synth_dataset / "stage_2_train", root, labels_csv=synth_dataset / "stage_2_train.csv")
    return root


@pytest.fixture(scope="module")
def tables(store):
    slices = pd.read_parquet(store / "slices.parquet")
    studies = pd.read_parquet(store / "studies.parquet")
    images = np.asarray(zarr.open_array(str(store / "images"), mode="r")[:])
    return slices, studies, images


@pytest.fixture(scope="module")
def info(store):
    return store_info(store)


def _positive_study(studies):
    return studies[studies["any"] == 1].iloc[0]


# ---------------------------------------------------------------- info


def test_info_counts_match_tables(store, tables, info):
    slices, studies, images = tables
    counts = info["counts"]
    assert counts["slices"] == len(slices) == images.shape[0]
    assert counts["ok"] == int(slices["ok"].sum())
    assert counts["pixel_failures"] == int((~slices["ok"]).sum()) >= 1  # the synth's truncated file
    assert counts["studies"] == slices["study_uid"].nunique() == len(studies)
    assert counts["patients"] == slices["patient_id"].nunique()
    assert counts["shards"] == -(-len(slices) // info["spec"]["shard_slices"])
    assert counts["header_failures"] == json.loads((store / "manifest.json").read_text())["counts"]["header_failures"]
    on_disk = [os.path.join(d, f) for d, dirs, files in os.walk(store) for f in files if ".ichprep" not in d]
    assert counts["files"] == len(on_disk)
    assert info["size"]["store_bytes"] == sum(os.path.getsize(p) for p in on_disk)
    assert info["size"]["bytes_per_slice"] == pytest.approx(info["size"]["store_bytes"] / len(slices))
    assert 0 < info["size"]["ratio"] < 1


def test_info_prevalence(tables, info):
    slices, _, _ = tables
    ok = slices[slices["ok"]]
    for name in LABELS:
        known = ok[name].dropna().astype(int)
        got = info["labels"]["slices"][name]
        assert (got["positive"], got["labelled"]) == (int(known.sum()), len(known))
        assert got["fraction"] == pytest.approx(known.mean())
    assert info["labels"]["slices"]["any"]["positive"] > 0  # the fixture must exercise positives
    assert info["labels"]["unlabelled_slices"] == int(slices["any"].isna().sum()) >= 1
    per_study = ok.dropna(subset=["any"]).groupby("study_uid")["any"].max()
    studies_any = info["labels"]["studies_any"]
    assert (studies_any["positive"], studies_any["labelled"]) == (int((per_study == 1).sum()), len(per_study))
    assert studies_any["fraction"] == pytest.approx((per_study == 1).mean())


def test_info_is_json_and_text(info):
    assert json.loads(json.dumps(info, allow_nan=False)) == info
    text = format_info(info)
    for window in info["spec"]["windows"]:
        assert window["name"] in text
    assert f"{info['counts']['slices']} ({info['counts']['ok']} ok" in text
    assert "INTER_AREA" in text
    assert "any (studies)" in text


# ---------------------------------------------------------------- montage


def test_montage_layout_and_pixels(tables, store):
    slices, studies, images = tables
    study = _positive_study(studies)
    n, channels = int(study["n_slices"]), images.shape[1]
    assert 12 < n <= 40  # every slice drawn, small panels
    montage = render_montage(store, study=study["study_uid"])
    layout = MontageLayout(n, channels, SMALL_PANEL)
    assert montage.dtype == np.uint8
    assert montage.shape == (TITLE_H + HEADER_H + n * (SMALL_PANEL + GAP) + GAP, layout.width, 3)
    assert montage.shape[:2] == (layout.height, layout.width)
    for r in (0, n // 2, n - 1):
        i = int(study["start"]) + r
        if not slices["ok"].iloc[i]:
            continue
        for c in range(channels):
            y, x = layout.panel_origin(r, c)
            expected = cv2.resize(images[i, c], (SMALL_PANEL, SMALL_PANEL), interpolation=cv2.INTER_AREA)
            for rgb in range(3):
                np.testing.assert_array_equal(montage[y : y + SMALL_PANEL, x : x + SMALL_PANEL, rgb], expected)


def test_montage_full_size_panels_are_the_stored_bytes(tables, store):
    _, studies, images = tables
    study = studies.iloc[0]
    montage = render_montage(store, study=study["study_uid"], max_slices=4)
    size = images.shape[-1]
    layout = MontageLayout(4, images.shape[1], size)  # <= 12 rows: full-size panels
    assert montage.shape[:2] == (layout.height, layout.width)
    y, x = layout.panel_origin(0, images.shape[1] - 1)  # first row is the study's first slice
    np.testing.assert_array_equal(montage[y : y + size, x : x + size, 0], images[int(study["start"]), -1])


def test_positive_and_failed_rows_are_marked(tables, store):
    slices, studies, _ = tables
    study = _positive_study(studies)
    montage = render_montage(store, study=study["study_uid"])
    layout = MontageLayout(int(study["n_slices"]), 3, SMALL_PANEL)
    for r in range(int(study["n_slices"])):
        y, _ = layout.panel_origin(r, 0)
        stripe = (montage[y + 5, 6] == STRIPE).all()
        assert stripe == (slices["any"].iloc[int(study["start"]) + r] == 1)
    failed = int(np.flatnonzero(~slices["ok"].to_numpy())[0])
    montage = render_montage(store, slot=failed)
    owner = studies[(studies["start"] <= failed) & (failed < studies["stop"])].iloc[0]
    y, x = MontageLayout(int(owner["n_slices"]), 3, SMALL_PANEL).panel_origin(failed - int(owner["start"]), 0)
    assert (montage[y + 10, x + 10] == FAILED).all()  # the zero-filled slot is crossed out


def test_index_highlights_its_row(tables, store):
    _, studies, _ = tables
    study = _positive_study(studies)
    r = int(study["n_slices"]) // 2
    index = int(study["start"]) + r
    plain = render_montage(store, study=study["study_uid"])
    marked = render_montage(store, slot=index)
    assert marked.shape == plain.shape
    layout = MontageLayout(int(study["n_slices"]), 3, SMALL_PANEL)
    y, _ = layout.panel_origin(r, 0)
    frame_y = y - GAP // 2 - 1  # the frame's top edge runs through the gap above the row
    assert (marked[frame_y, layout.width // 2] == HIGHLIGHT).all()
    assert not (plain == HIGHLIGHT).all(axis=-1).any()
    changed = np.flatnonzero((marked != plain).any(axis=(1, 2)))
    # Only that row changes.
    assert changed.min() >= y - GAP
    assert changed.max() <= y + SMALL_PANEL + GAP


def test_subsampling_keeps_the_selected_slice(store, tables):
    _, studies, _ = tables
    study = studies.iloc[0]
    montage = render_montage(store, study=study["study_uid"], max_slices=5)
    assert montage.shape[:2] == (MontageLayout(5, 3, 256).height, MontageLayout(5, 3, 256).width)
    np.testing.assert_array_equal(_pick(10, 20, None), np.arange(10))
    pick = _pick(100, 7, keep=33)
    assert 33 in pick
    assert len(pick) <= 7
    assert pick[0] == 0
    assert pick[-1] == 99
    assert (np.diff(pick) > 0).all()


def test_montage_errors(tables, store):
    slices, studies, _ = tables
    uid = studies["study_uid"].iloc[0]
    with pytest.raises(ValueError, match="exactly one"):
        render_montage(store)
    with pytest.raises(ValueError, match="exactly one"):
        render_montage(store, study=uid, slot=0)
    with pytest.raises(ValueError, match="studies.parquet") as err:
        render_montage(store, study="1.2.3.nope")
    assert "did you mean" not in str(err.value)
    with pytest.raises(ValueError, match="did you mean") as err:
        render_montage(store, study=uid[:-4] + "9999")
    assert uid in str(err.value)
    with pytest.raises(ValueError, match="--slot 3"):
        render_montage(store, study=slices["image_id"].iloc[3])
    for bad in (-1, len(slices)):
        with pytest.raises(ValueError, match="out of range"):
            render_montage(store, slot=bad)


def test_save_montage_png(tables, store, tmp_path):
    _, studies, _ = tables
    study = _positive_study(studies)
    out = save_montage(store, tmp_path / "sub" / "study.png", study=study["study_uid"])
    assert out == tmp_path / "sub" / "study.png"
    back = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert back is not None
    # Lossless PNG, channels swapped back: identical to the RGB render.
    expected = render_montage(store, study=study["study_uid"])
    np.testing.assert_array_equal(cv2.cvtColor(back, cv2.COLOR_BGR2RGB), expected)
