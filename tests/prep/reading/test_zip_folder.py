"""ichprep.reading.source: a folder of zips (CQ500's download, one ``CQ500-CT-<N>.zip`` per study) is a SOURCE."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import fsspec
import pandas as pd
import pydicom
import pytest
from conftest import pydicom_file
from pydicom.uid import generate_uid

from ichprep.convert import convert
from ichprep.errors import ZipMemberError
from ichprep.reading.scan import OK, scan
from ichprep.reading.source import ZIP_SEP, by_path, list_members, parse_source, read_member
from ichprep.spec import PreprocessSpec
from ichprep.storage.store import open_store

SERIES = "Unknown Study/CT 5mm"
#: zip name -> (compression, number of slices); the second zip stores, the first deflates.  Ten and more
#: slices a series, so that a rule leaving out short series keeps them.
STUDIES = {"CQ500-CT-1.zip": (zipfile.ZIP_DEFLATED, 12), "CQ500-CT-2.zip": (zipfile.ZIP_STORED, 10)}


def _slice(study: str, series: str, number: int) -> bytes:
    """CT_small.dcm as slice ``number`` of its own study and series (a distinct SOPInstanceUID and z)."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number + 1
    ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 5.0 * number]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def cq500(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A CQ500-like folder: two study zips, a loose file (one more slice of the second study's series) and a
    damaged zip; and every good member's bytes by path."""
    folder = tmp_path_factory.mktemp("cq500") / "cq500"
    folder.mkdir()
    originals = {}
    for n, (name, (method, count)) in enumerate(STUDIES.items(), 1):
        top = f"CQ500CT{n} CQ500CT{n}"
        study, series = generate_uid(), generate_uid()
        with zipfile.ZipFile(folder / name, "w", compression=method) as archive:
            archive.writestr(f"{top}/{SERIES}/", b"")  # a folder entry: not a member
            for i in range(count):
                member = f"{top}/{SERIES}/CT{i:06d}.dcm"  # the same member names in every zip, as in CQ500
                data = _slice(study, series, i)
                archive.writestr(member, data)
                originals[f"{folder / name}{ZIP_SEP}{member}"] = data
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w") as nested:
                nested.writestr("hidden.dcm", _slice(study, series, 99))
            archive.writestr(f"{top}/nested.zip", inner.getvalue())  # a zip inside a zip is not followed
    (folder / "extra").mkdir()
    loose = _slice(study, series, count)
    (folder / "extra" / "loose.dcm").write_bytes(loose)
    originals[str(folder / "extra" / "loose.dcm")] = loose
    cut = (folder / "CQ500-CT-1.zip").read_bytes()
    (folder / "CQ500-CT-9.zip").write_bytes(cut[: len(cut) // 2])  # a download cut short: no central directory
    (folder / "notes.txt").write_text("not listed")
    return folder, originals


def test_list_members_lists_the_zips_members_next_to_loose_files(cq500, caplog):
    folder, originals = cq500
    with caplog.at_level(logging.WARNING, logger="ichprep.reading.source"):
        members = list_members(parse_source(folder))
    damaged = str(folder / "CQ500-CT-9.zip")
    assert [m.path for m in members] == sorted([*originals, damaged])
    assert any("CQ500-CT-9.zip" in r.getMessage() for r in caplog.records)  # the skipped zip is named
    by_name = {m.path: m for m in members}
    for path, data in originals.items():
        member = by_name[path]
        if ZIP_SEP in path:
            assert member.size == len(data)
            assert member.offset is not None and member.crc is not None
            assert member.method == STUDIES[Path(path.split(ZIP_SEP)[0]).name][0]
        else:
            assert member.offset is None
    assert by_name[damaged].offset == 0 and by_name[damaged].method is None


def test_members_read_from_their_own_zip_and_loose_files_by_path(cq500):
    folder, originals = cq500
    source = parse_source(folder)
    members = {m.path: m for m in list_members(source)}
    for path, data in originals.items():
        member = members[path]
        assert by_path(source, member) == (ZIP_SEP not in path)
        assert bytes(read_member(source, member)) == data
        assert bytes(read_member(source, member, head=200))[:200] == data[:200]
        assert bytes(read_member(source, member, reuse=True)) == data
    # the zip SOURCE of one study and the folder give each member the same bytes
    one = folder / "CQ500-CT-2.zip"
    for member in list_members(parse_source(one)):
        assert not by_path(parse_source(one), member)
        assert bytes(read_member(parse_source(one), member)) == originals[member.path]


def test_relative_paths_name_the_zip_and_the_member(cq500):
    folder, originals = cq500
    source = parse_source(folder)
    paths = sorted(originals)
    expected = {
        f"CQ500-CT-1.zip::CQ500CT1 CQ500CT1/{SERIES}/CT000000.dcm",
        f"CQ500-CT-2.zip::CQ500CT2 CQ500CT2/{SERIES}/CT000001.dcm",
        "extra/loose.dcm",
    }
    assert expected <= set(source.relative_all(paths))
    assert source.relative_all(paths) == [source.relative(p) for p in paths]
    assert parse_source(f"{folder}/").relative(paths[0]) == source.relative(paths[0])  # another spelling
    assert source.relative(f"{folder / 'CQ500-CT-1.zip'}::a/b.dcm") == "CQ500-CT-1.zip::a/b.dcm"


def test_the_scan_reads_every_member_and_rejects_the_damaged_zip(cq500):
    folder, originals = cq500
    table, summary = scan(folder)
    rows = table.set_index("path")
    assert set(rows.index) == {*originals, str(folder / "CQ500-CT-9.zip")}
    assert (rows.loc[list(originals), "status"] == OK).all()
    bad = rows.loc[str(folder / "CQ500-CT-9.zip")]
    assert bad["status"] == "bad_zip_member"
    assert "not a readable zip file" in bad["error"]
    assert summary.n_files == len(originals) + 1 and summary.rejected == {"bad_zip_member": 1}
    zipped = [p for p in originals if ZIP_SEP in p]
    assert rows.loc[zipped, "zip_offset"].notna().all()
    assert rows.loc[str(folder / "extra" / "loose.dcm"), ["zip_offset"]].isna().all()


def test_a_folder_of_zips_converts(cq500, tmp_path):
    folder, originals = cq500
    root = tmp_path / "store.zarr"
    summary = convert(folder, root, spec=PreprocessSpec(size=64, shard_slices=4))
    assert summary.n_slices == len(originals) == 23
    assert summary.n_studies == 2 and summary.n_shards >= 6  # 23 slices, 4 a shard
    assert summary.rejected == {"bad_zip_member": 1}
    slices = open_store(root).slices
    assert slices["ok"].all()
    assert f"CQ500-CT-1.zip::CQ500CT1 CQ500CT1/{SERIES}/CT000011.dcm" in set(slices["path"])
    assert "extra/loose.dcm" in set(slices["path"])
    rejected = pd.read_csv(root / "rejected.csv", dtype=str)
    assert rejected["path"].str.endswith("CQ500-CT-9.zip").tolist() == [True]


def test_a_bucket_prefix_of_zips_lists_and_reads_the_same(cq500):
    folder, originals = cq500
    fs = fsspec.filesystem("memory")
    url = "memory://cq500-bucket/download"
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{url}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    source = parse_source(url)
    members = list_members(source)
    local = parse_source(folder)
    assert [source.relative(m.path) for m in members] == local.relative_all([m.path for m in list_members(local)])
    for member in members:
        assert not by_path(source, member)
        if member.path.endswith("CQ500-CT-9.zip"):
            assert member.size == (folder / "CQ500-CT-9.zip").stat().st_size
            with pytest.raises(ZipMemberError, match="not a readable zip file"):
                read_member(source, member)
        else:
            assert bytes(read_member(source, member)) == originals[f"{folder}/{source.relative(member.path)}"]
    fs.rm(url, recursive=True)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_thread_keeps_one_zip_open_however_many_zips_it_reads(cq500):
    folder, _ = cq500
    source = parse_source(folder)
    for member in list_members(source):
        if member.method is not None:
            read_member(source, member)
    fds = Path("/proc/self/fd")
    open_zips = [p for p in fds.iterdir() if str(folder) in str(p.resolve()) and p.resolve().suffix == ".zip"]
    assert len(open_zips) == 1  # CQ500 is 491 zips: one handle each per thread would exhaust the descriptors
