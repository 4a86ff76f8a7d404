"""Archives other than Kaggle's, end to end: a CQ500-style hospital export (folders, or one zip per study) and
CT-ICH-style NIfTI volumes, converted with the defaults a user types; checked against the synthetic truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner

from ichprep.cli import main
from ichprep.convert import convert
from ichprep.reading.labels import LABELS
from ichprep.reading.series import REPEATED_POSITION, SERIES_LEFT_OUT
from ichprep.spec import PreprocessSpec
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import REJECTED, SERIES, SLABS, SLICES, STUDIES, open_store
from ichprep.synthlayouts import generate_hospital, generate_nifti

SPEC = PreprocessSpec(size=64, shard_slices=16)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """Ten CQ500-style studies (every series kind, thin-only studies, a tilt, repeats, a gap) at 128²."""
    out = tmp_path_factory.mktemp("hospital")
    return generate_hospital(out / "archive", 10, seed=0, size=128)


@pytest.fixture(scope="module")
def converted(hospital, tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital_store") / "store.zarr"
    summary = convert(hospital.out_dir, root, SPEC, study_labels=_reads(hospital))
    return root, summary


def _reads(hospital):
    from ichprep.reading.studylabels import read_study_labels

    return read_study_labels(hospital.reads_csv)


def _table(root, name):
    return pd.read_parquet(root / name)


def test_every_study_holds_exactly_its_expected_series(hospital, converted):
    root, _ = converted
    truth = pd.read_csv(hospital.series_truth_csv)
    expected = truth[truth["expected"] == 1].set_index("StudyInstanceUID")["SeriesInstanceUID"].sort_index()
    slices = _table(root, SLICES)
    held = slices.groupby("study_uid")["series_uid"].agg(lambda s: sorted(set(s)))
    assert held.to_dict() == {study: [series] for study, series in expected.items()}


def test_series_parquet_names_why_each_other_series_was_dropped(hospital, converted):
    root, summary = converted
    series = _table(root, SERIES)
    truth = pd.read_csv(hospital.series_truth_csv).set_index("SeriesInstanceUID")
    assert len(series) == len(truth)
    dropped = series[~series["kept"]].set_index("series_uid")
    kinds = truth.loc[dropped.index, "kind"]
    expect = {"bone": "sharp kernel", "contrast": "contrast", "localizer": "localizer", "dose": "not CT image storage"}
    for uid, kind in kinds.items():
        reason = dropped.loc[uid, "reason"]
        assert reason.startswith(expect.get(kind, "thickness")), (kind, reason)
    assert summary.series["kept"] == 10
    assert sum(v for k, v in summary.series.items() if k != "kept") == len(dropped)


def test_image_ids_are_unique_sop_uids_and_paths_name_the_files(converted):
    root, summary = converted
    slices = _table(root, SLICES)
    assert slices["image_id"].is_unique
    assert summary.id_rule == "sop_uid"
    assert json.loads((root / "zarr.json").read_text())["attributes"]["ichkit"]["image_ids"] == "sop_uid"
    assert slices["path"].str.contains("/Unknown Study/CT ").all()


def test_each_run_rises_along_its_normal_and_repeats_are_rejected_with_the_kept_slice(hospital, converted):
    root, summary = converted
    slices = _table(root, SLICES)
    for _, run in slices.groupby("series_uid", sort=False):
        assert run["z"].is_monotonic_increasing
    truth = pd.read_csv(hospital.series_truth_csv)
    repeats = int(truth.loc[truth["expected"] == 1, "repeated_position"].sum())
    rejected = pd.read_csv(root / REJECTED)
    repeated = rejected[rejected["reason"] == REPEATED_POSITION]
    assert len(repeated) == repeats > 0
    assert repeated["detail"].str.contains(", kept").all()
    assert summary.rejected == {REPEATED_POSITION: repeats}
    assert (rejected.loc[rejected["reason"] == SERIES_LEFT_OUT, "stage"] == "series").all()


def test_thin_only_studies_become_5mm_slabs_listed_member_by_member(hospital, converted):
    root, summary = converted
    truth = pd.read_csv(hospital.series_truth_csv)
    thin = truth[(truth["expected"] == 1) & (truth["kind"] == "thin")]
    slabs = _table(root, SLABS)
    assert summary.n_slabs == slabs["image_id"].nunique() > 0
    slices = _table(root, SLICES).set_index("image_id")
    for _, series in thin.iterrows():
        rows = slices[slices["series_uid"] == series["SeriesInstanceUID"]]
        steps = np.diff(rows["z"].to_numpy())
        assert np.median(steps) == pytest.approx(5.0, abs=0.3)
        members = slabs[slabs["image_id"].isin(rows.index)]
        per_slab = round(5.0 / float(series["thickness"]))
        assert members.groupby("image_id").size().max() == per_slab
    assert slabs["member_id"].is_unique


def test_study_labels_are_the_readers_majority_with_each_reader_kept(hospital, converted):
    root, summary = converted
    studies = _table(root, STUDIES)
    truth = pd.read_csv(hospital.study_truth_csv).set_index("StudyInstanceUID")
    assert summary.study_labels is not None
    assert studies["any"].notna().all()
    agree = (studies.set_index("study_uid")["any"] == truth.loc[studies["study_uid"], "any"].to_numpy()).mean()
    assert agree >= 0.9
    assert {f"R{k}:{label}" for k in (1, 2, 3) for label in LABELS} <= set(studies.columns)
    reader = studies[[f"R{k}:any" for k in (1, 2, 3)]].to_numpy(int)
    assert (studies["any"].to_numpy(int) == (reader.sum(axis=1) >= 2)).all()


def test_the_store_verifies_and_opens(converted):
    root, _ = converted
    assert verify_store(root).ok
    store = open_store(root)
    assert len(store.slices) == store.images.shape[0]


def test_a_5mm_slab_of_a_thin_series_matches_its_5mm_series(hospital, tmp_path):
    """The thin series of a study that has both is interpolated from its 5 mm series (synthlayouts): slabbed
    back to 5 mm it lands on the 5 mm slices' positions and windows within a mean absolute difference of
    8, 6 and 4 grey levels (of 255) in the brain, subdural and soft windows."""
    truth = pd.read_csv(hospital.series_truth_csv)
    both = truth.groupby("study_folder").filter(lambda g: {"thin", "thick_soft"} <= set(g["kind"]))
    folder = both["study_folder"].iloc[0]
    uid = both.set_index("kind")["SeriesInstanceUID"]
    spec = PreprocessSpec(size=128, shard_slices=16)
    convert(hospital.out_dir / folder, tmp_path / "thin.zarr", spec, series=frozenset({uid["thin"]}))
    convert(hospital.out_dir / folder, tmp_path / "thick.zarr", spec, series=frozenset({uid["thick_soft"]}))
    thin, thick = (zarr.open_array(tmp_path / name / "images")[:].astype(int) for name in ("thin.zarr", "thick.zarr"))
    z_thin = _table(tmp_path / "thin.zarr", SLICES)["z"].to_numpy(float)
    z_thick = _table(tmp_path / "thick.zarr", SLICES)["z"].to_numpy(float)
    nearest = np.abs(z_thick[None, :] - z_thin[:, None]).argmin(axis=1)
    assert np.abs(z_thick[nearest] - z_thin).max() < 0.01
    mad = np.abs(thin - thick[nearest]).mean(axis=(0, 2, 3))
    assert (mad < [8, 6, 4]).all(), mad


def test_all_keeps_every_eligible_series_each_one_contiguous_block(hospital, tmp_path):
    convert(hospital.out_dir, tmp_path / "all.zarr", SPEC, series="all", slab="off")
    slices = _table(tmp_path / "all.zarr", SLICES)
    series = _table(tmp_path / "all.zarr", SERIES)
    assert set(slices["series_uid"]) == set(series.loc[series["eligible"], "series_uid"])
    uids = slices["series_uid"].to_numpy(object)
    runs = 1 + int((uids[1:] != uids[:-1]).sum())
    assert runs == len(set(uids))
    assert slices["image_id"].is_unique


def test_a_folder_of_zips_converts_to_the_same_store_with_paths_naming_zip_and_member(hospital, tmp_path):
    zips = generate_hospital(tmp_path / "zips", 10, seed=0, size=128, as_zip=True)
    a = convert(hospital.out_dir, tmp_path / "folder.zarr", SPEC)
    b = convert(zips.out_dir, tmp_path / "zips.zarr", SPEC)
    assert (a.n_slices, a.series) == (b.n_slices, b.series)
    left, right = (zarr.open_array(tmp_path / n / "images")[:] for n in ("folder.zarr", "zips.zarr"))
    assert np.array_equal(left, right)
    paths = _table(tmp_path / "zips.zarr", SLICES)["path"]
    assert paths.str.match(r"^CQ500-CT-\d+\.zip::CQ500CT\d+ CQ500CT\d+/Unknown Study/CT .+/CT\d{6}\.dcm$").all()


def test_convert_cli_says_what_it_chose_and_info_shows_it(hospital, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.zarr"
    result = runner.invoke(
        main,
        ["convert", str(hospital.out_dir), "-o", str(out), "--size", "64", "--study-labels", str(hospital.reads_csv)],
    )
    assert result.exit_code == 0, result.output
    assert "series kept      10; left out" in result.output
    assert "localizer: " in result.output
    assert "study labels     matched by" in result.output
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "Series (" in info.output
    assert "image ids        sop uids" in info.output


def test_series_file_and_a_bad_slab_value_from_the_cli(hospital, tmp_path):
    truth = pd.read_csv(hospital.series_truth_csv)
    bone = truth.loc[truth["kind"] == "bone", "SeriesInstanceUID"].iloc[:2]
    listing = tmp_path / "series.txt"
    listing.write_text("series_uid\n" + "\n".join(bone) + "\n")
    runner = CliRunner()
    ok = runner.invoke(
        main, ["convert", str(hospital.out_dir), "-o", str(tmp_path / "b.zarr"), "--series", str(listing)]
    )
    assert ok.exit_code == 0, ok.output
    assert set(_table(tmp_path / "b.zarr", SLICES)["series_uid"]) == set(bone)
    bad = runner.invoke(main, ["convert", str(hospital.out_dir), "-o", str(tmp_path / "c.zarr"), "--slab-mm", "thick"])
    assert bad.exit_code != 0
    assert "auto, off or a thickness" in bad.output


# ---------------------------------------------------------------- NIfTI volumes


@pytest.fixture(scope="module")
def nifti(tmp_path_factory):
    return generate_nifti(tmp_path_factory.mktemp("ctich") / "set", 4, seed=0, size=128)


def test_nifti_volumes_convert_with_ct_ich_labels_slice_by_slice(nifti, tmp_path):
    summary = convert(nifti.out_dir / "ct_scans", tmp_path / "n.zarr", SPEC, labels_csv=nifti.labels_csv)
    slices = _table(tmp_path / "n.zarr", SLICES)
    assert summary.n_slices == len(slices) == nifti.n_slices
    assert summary.n_studies == nifti.n_volumes
    csv = pd.read_csv(nifti.labels_csv)
    expected = {
        f"{p:03d}_{s:03d}": int(1 - n) for p, s, n in csv[["PatientNumber", "SliceNumber", "No_Hemorrhage"]].values
    }
    assert dict(zip(slices["image_id"], slices["any"].astype(int))) == expected
    for _, study in slices.groupby("study_uid"):
        assert study["z"].is_monotonic_increasing  # a volume stored top to bottom too
    assert verify_store(tmp_path / "n.zarr").ok


def test_a_scaled_and_a_reversed_volume_give_the_images_of_plain_ones(nifti, tmp_path):
    convert(nifti.out_dir / "ct_scans", tmp_path / "n.zarr", SPEC)
    images = zarr.open_array(tmp_path / "n.zarr" / "images")[:]
    slices = _table(tmp_path / "n.zarr", SLICES)
    means = slices.assign(brain=images[:, 0].mean(axis=(1, 2))).groupby("study_uid")["brain"].mean()
    plain = means.drop([*nifti.scaled, *nifti.reversed])
    for name in (*nifti.scaled, *nifti.reversed):
        assert plain.min() * 0.7 < means[name] < plain.max() * 1.3  # HU scaled right, not shifted by 1024


def test_a_nifti_store_trains_evaluates_and_predicts(nifti, tmp_path):
    from ichtrain.cli import main as train_main

    convert(nifti.out_dir / "ct_scans", tmp_path / "n.zarr", SPEC, labels_csv=nifti.labels_csv)
    runner, run = CliRunner(), tmp_path / "run"
    tiny = ["--arch", "resnet18", "--image-size", "48", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    steps = ["--epochs", "1", "--max-steps", "2"]
    result = runner.invoke(train_main, ["train", str(tmp_path / "n.zarr"), "--out", str(run), *tiny, *steps])
    assert result.exit_code == 0, result.output
    evaluated = runner.invoke(
        train_main,
        ["evaluate", str(run / "best.pt"), "--store", str(tmp_path / "n.zarr"), "--split", "all"]
        + ["--out", str(tmp_path / "eval"), "--workers", "0"],
    )
    assert evaluated.exit_code == 0, evaluated.output
    predicted = runner.invoke(
        train_main,
        ["predict", str(run / "best.pt"), "--dicom-dir", str(nifti.out_dir / "ct_scans")]
        + ["-o", str(tmp_path / "p.csv"), "--workers", "0"],
    )
    assert predicted.exit_code == 0, predicted.output
    rows = pd.read_csv(tmp_path / "p.csv")
    assert len(rows) == 6 * nifti.n_slices
    assert (
        rows["ID"]
        .str.match(r"^\d{3}_\d{3}_(epidural|intraparenchymal|intraventricular|subarachnoid|subdural|any)$")
        .all()
    )


def test_an_unknown_study_key_is_reported_with_its_csv_line(hospital, tmp_path):
    reads = pd.read_csv(hospital.reads_csv)
    extra = reads.iloc[[0]].assign(name="CQ500-CT-999")
    path = tmp_path / "reads.csv"
    pd.concat([reads, extra]).to_csv(path, index=False)
    result = CliRunner().invoke(
        main,
        ["convert", str(hospital.out_dir), "-o", str(tmp_path / "s.zarr"), "--size", "32", "--study-labels", str(path)],
    )
    assert result.exit_code == 0, result.output
    assert f"1 CSV keys match no study: 'CQ500-CT-999' (line {len(reads) + 2})" in result.output


def test_pseudonymised_series_and_slab_tables_hold_no_original_uid_or_path(hospital, tmp_path):
    root = tmp_path / "p.zarr"
    convert(hospital.out_dir, root, SPEC, pseudonymize_key="k" * 16)
    truth = pd.read_csv(hospital.series_truth_csv)
    originals = set(truth["SeriesInstanceUID"]) | set(truth["StudyInstanceUID"])
    for name in (SERIES, SLABS):
        text = pd.read_parquet(root / name).to_csv()
        assert not any(uid in text for uid in originals), name
        assert "CQ500CT" not in text and "Unknown Study" not in text


def test_the_whole_ct_ich_folder_converts_its_scans_and_rejects_its_masks_as_such(nifti, tmp_path):
    summary = convert(nifti.out_dir, tmp_path / "all.zarr", SPEC)
    assert summary.n_slices == nifti.n_slices
    rejected = pd.read_csv(tmp_path / "all.zarr" / REJECTED)
    assert sorted(rejected["path"]) == sorted(f"masks/{p.name}" for p in nifti.masks)
    assert rejected["detail"].str.contains("a mask or label volume").all()


def test_an_export_keeps_study_labels_readers_series_slabs_and_the_id_rule(converted, tmp_path):
    from ichprep.storage.export import export_store

    root, _ = converted
    studies = _table(root, STUDIES)
    chosen = studies["study_uid"].iloc[[1, 3]].tolist()
    export_store(root, tmp_path / "sub.zarr", studies=chosen)
    sub = _table(tmp_path / "sub.zarr", STUDIES)
    expected = studies.set_index("study_uid").loc[chosen].drop(columns=["start", "stop"])
    pd.testing.assert_frame_equal(
        sub.set_index("study_uid").drop(columns=["start", "stop"]), expected, check_dtype=False
    )
    assert set(_table(tmp_path / "sub.zarr", SERIES)["study_uid"]) == set(chosen)
    slab_ids = set(_table(tmp_path / "sub.zarr", SLABS)["image_id"])
    assert slab_ids <= set(_table(tmp_path / "sub.zarr", SLICES)["image_id"])
    assert (
        json.loads((tmp_path / "sub.zarr" / "zarr.json").read_text())["attributes"]["ichkit"]["image_ids"] == "sop_uid"
    )
    assert verify_store(tmp_path / "sub.zarr").ok


def test_a_volume_ids_csv_names_the_studies_and_patients_of_nifti_volumes(nifti, tmp_path):
    from ichprep.reading.nifti import read_volume_ids

    names = sorted(p.name for p in nifti.volumes)
    mapping = tmp_path / "ids.csv"
    mapping.write_text("volume,study,patient\n" + "".join(f"{n},S{i},P{i // 2}\n" for i, n in enumerate(names[1:])))
    summary = convert(nifti.out_dir / "ct_scans", tmp_path / "n.zarr", SPEC, volume_ids=read_volume_ids(mapping))
    studies = _table(tmp_path / "n.zarr", STUDIES)
    assert summary.n_studies == nifti.n_volumes
    unmapped = names[0].split(".")[0]  # keeps its file name
    assert sorted(studies["study_uid"]) == sorted([unmapped, *(f"S{i}" for i in range(len(names) - 1))])
    assert studies.set_index("study_uid").loc["S1", "patient_id"] == "P0"
    assert _table(tmp_path / "n.zarr", SLICES)["image_id"].str.match(r"^\d{3}_\d{3}$").all()  # labels still match


def test_a_volume_ids_csv_with_a_repeated_volume_names_its_lines(tmp_path):
    from ichprep.reading.nifti import read_volume_ids

    path = tmp_path / "ids.csv"
    path.write_text("volume,study\n049.nii,A\n050.nii,B\n049.nii.gz,C\n")
    with pytest.raises(ValueError, match=r"line\(s\) 2, 4"):
        read_volume_ids(path)


def test_a_kaggle_store_is_in_the_order_of_the_rule_before_series_and_keeps_every_study(store6):
    """One series per study: the order is study, then z, then InstanceNumber, then image id, as it always was."""
    slices = _table(store6, SLICES)
    expected = slices.sort_values(["study_uid", "z", "instance_number", "image_id"], kind="stable")
    assert slices["image_id"].tolist() == expected["image_id"].tolist()
    series = _table(store6, SERIES)
    assert series["kept"].all()
    assert len(series) == slices["study_uid"].nunique()
    rejected = pd.read_csv(store6 / REJECTED)
    assert not (rejected["stage"] == "series").any()
