"""ichprep.reading.source: one archive as a folder, a stored or deflated zip and from S3 (zip, objects): one store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import kill_after_shards

from ichprep.convert import convert
from ichprep.errors import ScanTableError, SourceError, ZipMemberError
from ichprep.reading.scan import list_dicom_files, scan
from ichprep.reading.source import Member, parse_source, read_file, read_member
from ichprep.spec import PreprocessSpec
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST, STATE, open_store
from ichprep.synth import KAGGLE_TOP

SPEC = PreprocessSpec(size=64, shard_slices=16)
BIN = Path(sys.executable).parent


def _train(zip_path: Path | str) -> str:
    return f"{zip_path}::{KAGGLE_TOP}/stage_2_train"


def _labels(zip_path: Path | str) -> str:
    return f"{zip_path}::{KAGGLE_TOP}/stage_2_train.csv"


@pytest.fixture(scope="module")
def reference(archives, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref") / "cache.zarr"
    folder = archives["folder"]
    convert(folder / "stage_2_train", root, SPEC, labels_csv=folder / "stage_2_train.csv")
    return root


@pytest.mark.parametrize("method", ["deflated", "stored"])
def test_a_zip_converts_to_the_folders_bytes(archives, reference, method, tmp_path):
    zip_path = archives[method]
    assert {i.compress_type for i in zipfile.ZipFile(zip_path).infolist() if i.filename.endswith(".dcm")} == {
        zipfile.ZIP_DEFLATED if method == "deflated" else zipfile.ZIP_STORED
    }
    root = tmp_path / "cache.zarr"
    summary = convert(_train(zip_path), root, SPEC, labels_csv=_labels(zip_path))
    assert (root / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()
    assert summary.n_slices == len(open_store(reference).slices[open_store(reference).slices["ok"]])
    assert verify_store(root).ok


def test_the_scan_records_where_each_member_lies(archives):
    table, summary = scan(_train(archives["deflated"]))
    assert summary.n_files == len(list_dicom_files(archives["folder"] / "stage_2_train"))
    assert table["zip_offset"].notna().all()
    assert (table["zip_method"] == zipfile.ZIP_DEFLATED).all()
    assert (table["zip_csize"] < table["file_size"]).all()  # deflated members are smaller than the files
    assert table["path"].str.startswith(f"{archives['deflated']}::{KAGGLE_TOP}/stage_2_train/").all()


def test_a_damaged_member_is_rejected_with_a_reason_and_the_rest_converts(archives, reference, tmp_path):
    damaged = tmp_path / "damaged.zip"
    shutil.copy(archives["stored"], damaged)
    with zipfile.ZipFile(damaged) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(".dcm") and "stage_2_train/" in i.filename)
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    with open(damaged, "r+b") as f:  # flip bytes inside the pixel data: the header still parses
        f.seek(data_start + info.file_size - 1000)
        f.write(b"\xff" * 16)
    root = tmp_path / "cache.zarr"
    summary = convert(_train(damaged), root, SPEC, labels_csv=_labels(damaged))
    rejected = pd.read_csv(root / "rejected.csv", dtype=str)
    name = info.filename.rsplit("/", 1)[1][: -len(".dcm")]
    row = rejected[rejected["image_id"] == name]
    assert row["reason"].tolist() == ["bad_zip_member"]
    assert "CRC-32" in row["detail"].iloc[0]
    assert summary.n_slices == open_store(reference).slices["ok"].sum() - 1


def test_a_damaged_deflated_member_is_rejected(archives, tmp_path):
    damaged = tmp_path / "damaged.zip"
    shutil.copy(archives["deflated"], damaged)
    with zipfile.ZipFile(damaged) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(".dcm"))
    member = Member(
        f"{damaged}::{info.filename}",
        info.file_size,
        info.header_offset,
        info.compress_size,
        info.compress_type,
        info.CRC,
    )
    source = parse_source(damaged)
    assert bytes(read_member(source, member)) == zipfile.ZipFile(damaged).read(info.filename)
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    with open(damaged, "r+b") as f:
        f.seek(data_start + info.compress_size // 2)
        f.write(b"\x00" * 64)
    with pytest.raises(ZipMemberError) as caught:
        read_member(parse_source(damaged), member)
    assert caught.value.reason == "bad_zip_member"
    assert str(damaged) in str(caught.value)


def test_a_truncated_zip_is_a_clear_error_naming_it(archives, tmp_path):
    cut = tmp_path / "cut.zip"
    data = archives["stored"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.zip is not a readable zip file"):
        convert(_train(cut), tmp_path / "cache.zarr", SPEC)
    result = subprocess.run(
        [str(BIN / "ichprep"), "convert", _train(cut), "-o", str(tmp_path / "c2.zarr")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "cut.zip is not a readable zip file" in result.stderr


def test_source_errors_say_what_is_wrong(archives, tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        parse_source(tmp_path / "nothing")
    with pytest.raises(SourceError, match="holds no folder 'nope'"):
        convert(f"{archives['stored']}::nope", tmp_path / "c.zarr", SPEC)
    (tmp_path / "one.dcm").write_bytes(b"DICM" * 40)
    with pytest.raises(SourceError, match="one.dcm is neither a folder nor a zip file"):
        convert(tmp_path / "one.dcm", tmp_path / "c.zarr", SPEC)
    with pytest.raises(SourceError, match="holds no file"):
        read_file(f"{archives['stored']}::{KAGGLE_TOP}/missing.csv")


def test_a_long_local_extra_field_is_read_with_a_second_range(archives, tmp_path):
    """Zip writers may put long extra fields in the local header; the member's bytes are still found."""
    original = archives["folder"] / "stage_2_train"
    first = sorted(original.glob("*.dcm"))[0]
    zip_path = tmp_path / "extra.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo(f"x/{first.name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.extra = b"\xfe\xca" + (996).to_bytes(2, "little") + b"\x07" * 996  # 1000 bytes, unknown id
        archive.writestr(info, first.read_bytes())
    info = zipfile.ZipFile(zip_path).infolist()[0]
    member = Member(
        f"{zip_path}::{info.filename}",
        info.file_size,
        info.header_offset,
        info.compress_size,
        info.compress_type,
        info.CRC,
    )
    assert bytes(read_member(parse_source(zip_path), member)) == first.read_bytes()
    assert bytes(read_member(parse_source(zip_path), member, head=4096))[:4096] == first.read_bytes()[:4096]


def test_labels_and_relative_paths_are_the_same_from_every_source(archives, reference):
    ref = open_store(reference).slices
    folder = parse_source(archives["folder"] / "stage_2_train")
    assert parse_source(f"file://{archives['folder']}/stage_2_train/") == folder  # one spelling per place
    assert parse_source(f"file://{archives['stored']}").url == str(archives["stored"])
    assert folder.relative(str(archives["folder"] / "stage_2_train" / "a" / "ID_1.dcm")) == "a/ID_1.dcm"
    assert ref["path"].str.endswith(".dcm").all()
    assert not ref["path"].str.contains("::").any()
    assert not ref["path"].str.startswith("/").any()


def test_kill_9_then_resume_from_a_zip_source(archives, reference, tmp_path):
    """kill -9 a converter reading a deflated zip mid-run; the same command then finishes with the folder's bytes."""
    root = tmp_path / "killed.zarr"
    zip_path = archives["deflated"]
    cmd = [
        str(BIN / "ichprep"),
        "convert",
        _train(zip_path),
        "--labels",
        _labels(zip_path),
        "-o",
        str(root),
        "--size",
        "64",
        "--shard-slices",
        "16",
        "--workers",
        "1",
    ]
    done = kill_after_shards(cmd, root / STATE / "shards", shards=2)
    total = -(-len(open_store(reference).slices) // 16)
    assert 1 <= done < total, f"kill landed outside the run ({done}/{total} shards)"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "already done, verified and skipped" in result.stdout
    assert (root / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()


def _upload(fs, local: Path, url: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{url}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_s3_zip_and_s3_objects_convert_to_the_folders_bytes(s3_env, archives, reference, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    _upload(fs, archives["folder"], "ichkit-test/sources/folder")
    fs.pipe_file("ichkit-test/sources/rsna.zip", archives["deflated"].read_bytes())
    loose = tmp_path / "loose.zarr"
    convert(
        "s3://ichkit-test/sources/folder/stage_2_train",
        loose,
        SPEC,
        labels_csv="s3://ichkit-test/sources/folder/stage_2_train.csv",
    )
    assert (loose / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()
    zipped = tmp_path / "zipped.zarr"
    convert(
        _train("s3://ichkit-test/sources/rsna.zip"),
        zipped,
        SPEC,
        labels_csv=_labels("s3://ichkit-test/sources/rsna.zip"),
    )
    assert (zipped / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()


def test_a_zip_replaced_at_the_same_path_is_read_afresh(tmp_path):
    """Workers keep a handle on each zip; a new file under the same name must not be read through the old one."""
    zip_path = tmp_path / "r.zip"
    for content in (b"first" * 100, b"second, longer" * 300):
        with zipfile.ZipFile(tmp_path / "new.zip", "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("a/ID_1.dcm", content)
        os.replace(tmp_path / "new.zip", zip_path)  # a new file (inode) under the old name, as synth writes
        (member,) = [
            m
            for m in [
                Member(f"{zip_path}::a/ID_1.dcm", i.file_size, i.header_offset, i.compress_size, i.compress_type, i.CRC)
                for i in zipfile.ZipFile(zip_path).infolist()
            ]
        ]
        assert bytes(read_member(parse_source(zip_path), member)) == content


def test_a_scan_table_of_another_source_is_refused(archives, tmp_path):
    table, _ = scan(archives["folder"] / "stage_2_train")
    with pytest.raises(ScanTableError, match="pass the SOURCE it was scanned from"):
        convert(_train(archives["stored"]), tmp_path / "c.zarr", SPEC, scan_table=table)
