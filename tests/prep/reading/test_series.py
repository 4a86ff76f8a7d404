"""Series decisions, order along the normal, image identities and slabs, on scan tables built by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ichprep.reading.scan import OK, assign_ids, order_slices, to_frame
from ichprep.reading.series import (
    REPEATED_POSITION,
    SERIES_COLUMNS,
    SERIES_LEFT_OUT,
    SeriesRule,
    choose_series,
    decision_counts,
    kernel_class,
    sort_slices,
)
from ichprep.reading.slabs import SLAB_COLUMNS, parse_slab, plan_slots
from ichprep.reading.source import parse_source

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _series(study, uid, n, *, number=1, spacing=5.0, kernel="STANDARD", description="CT 5mm", tilt_deg=0.0, **kw):
    """Rows of one series: n slices ``spacing`` mm apart along a normal tilted ``tilt_deg`` about x."""
    t = math.radians(tilt_deg)
    normal = (0.0, -math.sin(t), math.cos(t))
    rows = []
    for k in range(n):
        p = 10.0 + spacing * k
        rows.append(
            {
                "image_id": f"{uid}_{k}",
                "path": f"/src/{study}/{uid}/CT{k:06d}.dcm",
                "study_uid": study,
                "series_uid": uid,
                "patient_id": f"P{study}",
                "sop_uid": f"sop.{uid}.{k}",
                "modality": "CT",
                "z": p * normal[2],
                "position": p,
                "normal_x": normal[0],
                "normal_y": normal[1],
                "normal_z": normal[2],
                "instance_number": k + 1,
                "series_number": number,
                "series_description": description,
                "sop_class_uid": CT,
                "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
                "kernel": kernel,
                "slice_thickness": spacing,
                "status": OK,
                "file_size": 1000,
                **kw,
            }
        )
    return rows


def _hospital_study(study="S1"):
    return (
        _series(study, f"{study}.soft", 30, number=2)
        + _series(study, f"{study}.bone", 30, number=3, kernel="BONE", description="CT BONE")
        + _series(study, f"{study}.contrast", 30, number=4, contrast="OMNIPAQUE", description="CT 4cc sec 150cc D3D on")
        + _series(study, f"{study}.thin", 120, number=5, spacing=1.25, description="CT 1.25mm")
        + _series(study, f"{study}.scout", 2, number=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER", description="CT")
        + _series(study, f"{study}.dose", 1, number=99, sop_class_uid=SC, description="CT Dose Report")
    )


def test_auto_keeps_the_soft_non_contrast_5mm_series_and_says_why_not_the_others():
    choice = choose_series(to_frame(_hospital_study()))
    series = choice.series.set_index("series_uid")
    assert list(choice.series.columns) == SERIES_COLUMNS
    assert series.index[series["kept"]].tolist() == ["S1.soft"]
    reasons = series["reason"]
    assert reasons["S1.bone"].startswith("sharp kernel BONE")
    assert reasons["S1.contrast"].startswith("contrast")
    assert reasons["S1.thin"].startswith("thickness 1.25 mm")
    assert reasons["S1.scout"] == "localizer"
    assert reasons["S1.dose"].startswith("not CT image storage")
    assert reasons["S1.soft"] == "preferred"


def test_left_out_files_carry_their_series_reason_and_kept_ones_stay_ok():
    table = choose_series(to_frame(_hospital_study())).table
    kept = table["series_uid"] == "S1.soft"
    assert (table.loc[kept, "status"] == OK).all()
    assert (table.loc[~kept, "status"] == SERIES_LEFT_OUT).all()
    assert table.loc[table["series_uid"] == "S1.scout", "error"].eq("localizer").all()


def test_decision_counts_group_reasons_by_kind():
    counts = decision_counts(choose_series(to_frame(_hospital_study("A") + _hospital_study("B"))).series)
    assert counts == {
        "contrast": 2,
        "kept": 2,
        "localizer": 2,
        "not CT image storage": 2,
        "sharp kernel": 2,
        "thickness": 2,
    }


def test_a_thin_only_study_keeps_its_thin_series():
    rows = _series("S", "S.thin", 160, spacing=0.625) + _series("S", "S.bone", 160, spacing=0.625, kernel="H70h")
    series = choose_series(to_frame(rows)).series.set_index("series_uid")
    assert series["kept"].to_dict() == {"S.bone": False, "S.thin": True}


@pytest.mark.parametrize(
    ("kernel", "description", "expected"),
    [
        ("STANDARD", None, "soft"),
        ("H30s", None, "soft"),
        ("Hr38\\3", None, "soft"),
        ("FC21", None, "soft"),
        ("BONEPLUS", None, "sharp"),
        ("J70h", None, "sharp"),
        ("FC30", None, "sharp"),
        (None, "CT BONE", "sharp"),
        (None, "CT PRE CONTRAST 5MM STD", "soft"),
        ("XYZ9", "CT 5mm", "unknown"),
    ],
)
def test_kernel_classes(kernel, description, expected):
    assert kernel_class(kernel, description, SeriesRule()) == expected


def test_a_sites_own_kernel_names_extend_the_lists():
    rule = SeriesRule().extended(soft=["xyz9"], sharp=["q99"])
    assert (kernel_class("XYZ9", None, rule), kernel_class("Q99", None, rule)) == ("soft", "sharp")


def test_a_tilted_gantry_stays_and_a_steep_or_short_series_does_not():
    rows = (
        _series("S", "S.tilted", 30, tilt_deg=20)
        + _series("S", "S.steep", 30, number=2, tilt_deg=45)
        + _series("S", "S.short", 5, number=3)
    )
    series = choose_series(to_frame(rows)).series.set_index("series_uid")
    assert series.loc["S.tilted", "kept"]
    assert series.loc["S.tilted", "tilt_deg"] == pytest.approx(20)
    assert series.loc["S.steep", "reason"].startswith("not axial (normal 45 deg")
    assert series.loc["S.short", "reason"] == "too few slices (5 < 10)"


def test_a_study_of_short_series_only_keeps_one_of_them():
    rows = _series("S", "S.a", 4, number=1) + _series("S", "S.b", 6, number=2, kernel="BONE")
    series = choose_series(to_frame(rows)).series.set_index("series_uid")
    assert series["eligible"].all()
    assert series.index[series["kept"]].tolist() == ["S.a"]


def test_ties_go_to_more_slices_then_the_lower_series_number_whatever_the_row_order():
    rows = _series("S", "S.a", 30, number=7) + _series("S", "S.b", 32, number=8) + _series("S", "S.c", 32, number=6)
    for order in (rows, rows[::-1]):
        series = choose_series(to_frame(order)).series.set_index("series_uid")
        assert series.index[series["kept"]].tolist() == ["S.c"]
        assert series.loc["S.a", "reason"].startswith("fewer slices")
        assert series.loc["S.b", "reason"].startswith("higher SeriesNumber")


def test_all_keeps_every_eligible_series_and_a_list_keeps_exactly_its_series():
    table = to_frame(_hospital_study())
    every = choose_series(table, "all").series.set_index("series_uid")
    assert sorted(every.index[every["kept"]]) == ["S1.bone", "S1.contrast", "S1.soft", "S1.thin"]
    listed = choose_series(table, frozenset({"S1.bone"})).series.set_index("series_uid")
    assert listed.index[listed["kept"]].tolist() == ["S1.bone"]
    assert listed.loc["S1.soft", "reason"] == "not in the series list"


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, all"):
        choose_series(to_frame(_hospital_study()), "best")


def test_a_repeated_position_is_left_out_naming_the_slice_kept_and_counted():
    rows = _series("S", "S.a", 20)
    twin = dict(rows[5], image_id="S.a_twin", sop_uid="sop.twin", instance_number=99, path="/src/twin.dcm")
    choice = choose_series(to_frame([*rows, twin]))
    dropped = choice.table[choice.table["status"] == REPEATED_POSITION]
    assert dropped["image_id"].tolist() == ["S.a_twin"]
    assert "as S.a_5, kept" in dropped["error"].iloc[0]
    assert choice.series["n_repeated"].tolist() == [1]


def test_gaps_and_spacing_are_reported():
    rows = [r for r in _series("S", "S.a", 30) if r["instance_number"] not in (11, 12)]  # a 15 mm step
    series = choose_series(to_frame(rows)).series.iloc[0]
    assert (series["spacing_median_mm"], series["spacing_min_mm"], series["spacing_max_mm"]) == (5.0, 5.0, 15.0)
    assert (series["n_gaps"], series["max_gap_mm"]) == (1, 15.0)


def test_series_of_a_study_are_contiguous_and_each_runs_along_its_normal():
    soft = _series("S", "S.soft", 12, number=2)
    flipped = _series("S", "S.other", 12, number=1)
    for row in flipped:  # z falls while the position (along the normal) rises
        row["z"] = -row["position"]
    ordered = sort_slices(to_frame(soft[::-1] + flipped[::-1]))
    assert ordered["series_uid"].tolist() == ["S.other"] * 12 + ["S.soft"] * 12
    assert ordered["position"].is_monotonic_increasing is False  # two runs, each rising
    for _, run in ordered.groupby("series_uid"):
        assert run["position"].is_monotonic_increasing


def test_a_series_without_positions_is_ordered_by_instance_number():
    rows = _series("S", "S.a", 12)
    for row in rows:
        row["position"] = row["z"] = None
    ordered = order_slices(to_frame(rows[::-1]))
    assert ordered["instance_number"].tolist() == list(range(1, 13))
    assert set(ordered["order_by"]) == {"instance_number"}


def test_repeated_file_names_make_sop_uids_the_ids_and_unique_names_stay():
    source = parse_source("/")
    repeated = to_frame(_series("A", "A.s", 3) + _series("B", "B.s", 3))
    repeated["path"] = [f"/src/{s}/CT{k:06d}.dcm" for s in "AB" for k in range(3)]
    ids = assign_ids(repeated, source)
    assert ids.rule == "sop_uid"
    assert ids.table["image_id"].is_unique
    assert ids.table["image_id"].tolist() == repeated["sop_uid"].tolist()
    unique = to_frame(_series("A", "A.s", 3))
    unique["path"] = [f"/src/ID_{k:09x}.dcm" for k in range(3)]
    kept = assign_ids(unique, source)
    assert (kept.rule, kept.table["image_id"].tolist()) == (
        "file_name",
        ["ID_000000000", "ID_000000001", "ID_000000002"],
    )


def test_sop_rule_without_a_sop_uid_hashes_the_relative_path():
    table = to_frame(_series("A", "A.s", 2) + _series("B", "B.s", 2))
    table["path"] = ["/src/A/CT1.dcm", "/src/A/CT2.dcm", "/src/B/CT1.dcm", "/src/B/CT2.dcm"]
    table.loc[0, "sop_uid"] = None
    ids = assign_ids(table, parse_source("/")).table["image_id"]
    assert ids[0].startswith("ID_") and len(ids[0]) == 19
    assert ids.is_unique


# ---------------------------------------------------------------- slabs


def _labelled(rows, positive):
    for k, row in enumerate(rows):
        for label in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"):
            row[label] = int(k in positive and label in ("subdural", "any"))
    return rows


def test_a_thin_series_becomes_5mm_slabs_with_centre_z_max_labels_and_members_listed():
    rows = _labelled(_series("S", "S.thin", 40, spacing=1.25), positive={6})
    table = to_frame(rows)
    choice = choose_series(table)
    slots = plan_slots(choice.table, choice.series, "auto")
    assert len(slots.slots) == 10
    assert slots.slabs is not None
    assert list(slots.slabs.columns) == SLAB_COLUMNS
    assert slots.slabs.groupby("image_id").size().tolist() == [4] * 10
    first = slots.slots.iloc[0]
    assert first["image_id"] == "S.thin_2"  # the middle member names the slab
    assert first["z"] == pytest.approx(np.mean([10.0, 11.25, 12.5, 13.75]))
    assert slots.slots["subdural"].tolist() == [0, 1] + [0] * 8  # slice 6 lies in slab 1
    assert slots.members["slot"].tolist() == np.repeat(np.arange(10), 4).tolist()


def test_a_5mm_series_is_never_slabbed_and_its_slots_are_its_slices():
    rows = _series("S", "S.soft", 30)
    choice = choose_series(to_frame(rows))
    slots = plan_slots(choice.table, choice.series, "auto")
    assert slots.slabs is None
    assert slots.slots["image_id"].tolist() == [r["image_id"] for r in rows]
    assert slots.members["slot"].tolist() == list(range(30))


def test_slabs_stop_at_a_gap_and_an_explicit_thickness_or_off_is_obeyed():
    rows = [r for r in _series("S", "S.thin", 40, spacing=1.25) if r["instance_number"] not in (5, 6, 7, 8)]
    choice = choose_series(to_frame(rows))
    sizes = plan_slots(choice.table, choice.series, "auto").slabs.groupby("image_id", sort=False).size().tolist()
    assert sizes == [4] + [4] * 8  # slab 1 (slices 5-8) is missing whole, no slab straddles the gap
    thick = plan_slots(choice.table, choice.series, 10.0).slabs.groupby("image_id", sort=False).size().tolist()
    assert thick[0] == 4 and max(thick) == 8
    assert plan_slots(choice.table, choice.series, "off").slabs is None


@pytest.mark.parametrize("text", ["", "thick", "0", "-5", "nan", "inf"])
def test_a_bad_slab_value_lists_the_choices(text):
    with pytest.raises(ValueError, match="auto, off or a thickness"):
        parse_slab(text)


def test_parse_slab_takes_modes_and_numbers():
    assert [parse_slab("auto"), parse_slab("off"), parse_slab("2.5")] == ["auto", "off", 2.5]


def test_series_table_of_a_kaggle_archive_keeps_every_study_one_series():
    rows = [r for s in range(5) for r in _series(f"S{s}", f"S{s}.x", 30, kernel=None, description=None)]
    choice = choose_series(to_frame(rows))
    assert choice.series["kept"].all()
    pd.testing.assert_series_equal(choice.table["status"], to_frame(rows)["status"])
