"""ichprep.reading.limits: a hostile archive (a zip bomb, a lying header, a huge file) is refused fast and in
bounded memory, and every other slice converts as before."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import zarr
from click.testing import CliRunner
from pydicom.uid import generate_uid

from ichprep.cli import main
from ichprep.convert import convert
from ichprep.errors import SizeMismatchError
from ichprep.reading.limits import HEADER_BYTES, MIB, ReadLimits
from ichprep.reading.scan import OK, scan, scan_file, scan_volume_file
from ichprep.reading.source import ZIP_SEP, Member, list_members, parse_source, read_member
from ichprep.spec import PreprocessSpec

SPEC = PreprocessSpec(size=64, shard_slices=16)
GIB = 1 << 30


def _deflated_zeros(n_mib: int) -> bytes:
    """A raw deflate stream of ``n_mib`` MiB of zeros, built from one repeated full-flush block (no 2 GiB buffer)."""
    chunk = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) == block  # a full flush makes every later block alike
    return first + block * (n_mib - 2) + c.compress(chunk) + c.flush()


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _write_zip(path: Path, members: list[tuple[str, bytes, int, int]]) -> None:
    """A zip of deflated members given as (name, deflate stream, declared size, declared CRC-32): headers may lie."""
    local, central = bytearray(), bytearray()
    for name, stream, size, crc in members:
        encoded, offset = name.encode(), len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(stream), size, len(encoded), 0)
        local += encoded + stream
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(stream), size, len(encoded), *[0] * 5, offset
        )
        central += encoded
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))


def _good_members(folder: Path) -> list[tuple[str, bytes, int, int]]:
    return [
        (f"arc/train/{p.name}", _deflate(data), len(data), zlib.crc32(data))
        for p in sorted(folder.glob("ID_*.dcm"))
        for data in [p.read_bytes()]
    ]


def _timed(fn):
    """fn()'s result, wall seconds and peak traced memory in bytes."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
        return result, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _one_slice_study(path: Path) -> bytes:
    """The file at ``path`` as the only slice of a study of its own (no duplicate of the original)."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _images_by_id(root: Path) -> dict[str, np.ndarray]:
    images = zarr.open_array(root / "images")[:]
    ids = pd.read_parquet(root / "slices.parquet")["image_id"]
    return dict(zip(ids, images))


@pytest.fixture(scope="module")
def bomb_zip(synth_dataset, tmp_path_factory) -> Path:
    """A Kaggle-style zip of the synth slices plus a 2 GiB bomb, a 48 MiB bomb under the size limit, a member
    whose header declares half of a real slice, and a member whose 1 GiB of zeros declare one slice's size."""
    folder = synth_dataset / "stage_2_train"
    real = _one_slice_study(sorted(folder.glob("ID_*.dcm"))[3])
    bomb = _deflated_zeros(2048)
    assert len(bomb) < 4 * MIB  # small on disk, 2 GiB inflated
    members = _good_members(folder)
    members += [
        ("arc/train/ID_bomb.dcm", bomb, 2 * GIB, 0),
        ("arc/train/ID_dense.dcm", _deflated_zeros(48), 48 * MIB, 0),
        ("arc/train/ID_halfsize.dcm", _deflate(real), len(real) // 2, zlib.crc32(real[: len(real) // 2])),
        ("arc/train/ID_liar.dcm", _deflated_zeros(1024), 600_000, 0),
    ]
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    _write_zip(path, members)
    return path


def _member(source, name: str) -> Member:
    return next(m for m in list_members(source) if m.path.endswith(name))


@pytest.mark.parametrize(
    "name, status, words",
    [
        ("ID_bomb.dcm", "too_large", "member too large"),
        ("ID_dense.dcm", "suspicious_ratio", "suspicious compression ratio"),
        ("ID_liar.dcm", "size_mismatch", "inflate past"),  # under 1 MiB: its header read is the whole member
    ],
)
def test_a_hostile_member_is_rejected_unread_in_well_under_a_second(bomb_zip, name, status, words):
    source = parse_source(f"{bomb_zip}{ZIP_SEP}arc/train")
    member = _member(source, name)
    row, seconds, peak = _timed(lambda: scan_file(member.path, source, member))
    assert row["status"] == status and words in row["error"]
    assert seconds < 0.5
    assert peak < 2 * HEADER_BYTES + 4 * MIB  # at most one header read's worth, never the member


def _raised(error, fn, *args):
    try:
        fn(*args)
    except error as exc:
        return exc
    raise AssertionError(f"{fn.__name__} raised no {error.__name__}")


def test_a_member_whose_data_run_past_its_declared_size_stops_there(bomb_zip):
    source = parse_source(bomb_zip)
    liar = _member(source, "ID_liar.dcm")  # 1 GiB of zeros declaring 600 kB
    exc, seconds, peak = _timed(lambda: _raised(SizeMismatchError, read_member, source, liar))
    assert "inflate past the 600000 bytes its header declares" in str(exc)
    assert seconds < 0.5 and peak < 4 * MIB  # inflated to the declared size plus a margin, no further
    half = _member(source, "ID_halfsize.dcm")  # a real slice declaring half its size
    assert _raised(SizeMismatchError, read_member, source, half).reason == "size_mismatch"


def test_the_scan_and_the_store_list_each_reason_and_keep_every_other_slice(bomb_zip, synth_dataset, tmp_path):
    folder = synth_dataset / "stage_2_train"
    table, summary = scan(f"{bomb_zip}{ZIP_SEP}arc/train")
    reasons = table.set_index(table["path"].str.rsplit("/", n=1).str[-1])["status"]
    assert reasons["ID_bomb.dcm"] == "too_large" and reasons["ID_dense.dcm"] == "suspicious_ratio"
    assert reasons["ID_liar.dcm"] == "size_mismatch"
    assert summary.n_ok == len(list(folder.glob("ID_*.dcm"))) + 1  # the half-size member's header reads

    convert(f"{bomb_zip}{ZIP_SEP}arc/train", tmp_path / "z.zarr", SPEC)
    convert(folder, tmp_path / "plain.zarr", SPEC)
    rejected = pd.read_csv(tmp_path / "z.zarr" / "rejected.csv", dtype=str).set_index("path")
    assert rejected.loc["ID_bomb.dcm", "reason"] == "too_large"
    assert rejected.loc["ID_halfsize.dcm", "reason"] == "size_mismatch"
    assert "inflate past" in rejected.loc["ID_halfsize.dcm", "detail"]
    zipped, plain = _images_by_id(tmp_path / "z.zarr"), _images_by_id(tmp_path / "plain.zarr")
    assert set(zipped) - set(plain) == {"ID_halfsize"}  # its slot stays, zero-filled
    assert not zipped["ID_halfsize"].any()
    for image_id, image in plain.items():  # every other slice exactly as from the plain folder
        np.testing.assert_array_equal(zipped[image_id], image)


def test_a_huge_plain_file_is_rejected_from_its_size(synth_dataset, tmp_path):
    folder = tmp_path / "dicoms"
    shutil.copytree(synth_dataset / "stage_2_train", folder)
    huge = folder / "ID_huge.dcm"
    with open(huge, "wb") as f:
        f.write((synth_dataset / "stage_2_train").glob("ID_*.dcm").__next__().read_bytes()[:4096])
        f.truncate(2 * GIB)  # sparse: 2 GiB by its size, nothing on disk
    row, seconds, peak = _timed(lambda: scan_file(str(huge), parse_source(folder), Member(str(huge))))
    assert row["status"] == "too_large" and "file too large: it declares 2048.0 MiB" in row["error"]
    assert row["file_size"] == 2 * GIB
    assert seconds < 0.1 and peak < MIB
    convert(folder, tmp_path / "s.zarr", SPEC)
    convert(synth_dataset / "stage_2_train", tmp_path / "plain.zarr", SPEC)
    rejected, before = (pd.read_csv(tmp_path / s / "rejected.csv", dtype=str) for s in ("s.zarr", "plain.zarr"))
    added = rejected.merge(before, how="left", indicator=True).query("_merge == 'left_only'")
    assert added[["path", "reason"]].values.tolist() == [["ID_huge.dcm", "too_large"]]
    assert len(rejected) == len(before) + 1  # the synth set's own quirks, and the huge file
    np.testing.assert_array_equal(
        zarr.open_array(tmp_path / "s.zarr" / "images")[:], zarr.open_array(tmp_path / "plain.zarr" / "images")[:]
    )


def test_a_bucket_object_over_the_limit_is_never_fetched(synth_dataset):
    fs = fsspec.filesystem("memory")
    url = "memory://limits-bucket/train"
    good = sorted((synth_dataset / "stage_2_train").glob("ID_*.dcm"))[0]
    fs.pipe_file(f"{url}/ID_good.dcm", good.read_bytes())
    fs.pipe_file(f"{url}/ID_big.dcm", bytes(2 * MIB))
    try:
        source = parse_source(url, ReadLimits(max_file_bytes=MIB))
        rows = {m.path.rsplit("/", 1)[-1]: scan_file(m.path, source, m) for m in list_members(source)}
        assert rows["ID_good.dcm"]["status"] == OK
        assert rows["ID_big.dcm"]["status"] == "too_large" and "over the 1.0 MiB limit" in rows["ID_big.dcm"]["error"]
    finally:
        fs.rm("memory://limits-bucket", recursive=True)


def test_a_header_scan_never_inflates_the_pixel_data(synth_dataset, tmp_path):
    """A 32 MiB member: a plain header is read from its first 16 kB, a raw (non-plain) one from 1 MiB at most."""
    template = pydicom.dcmread(sorted((synth_dataset / "stage_2_train").glob("ID_*.dcm"))[0])
    template.Rows = template.Columns = 4096
    template.PixelData = np.random.default_rng(0).integers(0, 2000, (4096, 4096), dtype=np.uint16).tobytes()
    plain = tmp_path / "plain.dcm"
    template.save_as(plain, enforce_file_format=True)
    raw = tmp_path / "raw.dcm"
    raw.write_bytes(plain.read_bytes()[132:])  # no preamble and no "DICM": pydicom's to read
    data = {p.name: p.read_bytes() for p in (plain, raw)}
    _write_zip(
        tmp_path / "big.zip", [(f"big/{n}", _deflate(b), len(b), zlib.crc32(b)) for n, b in sorted(data.items())]
    )
    source = parse_source(tmp_path / "big.zip")
    for member in list_members(source):
        row, seconds, peak = _timed(lambda m=member: scan_file(m.path, source, m))
        assert row["status"] == OK and row["rows"] == 4096, row["error"]
        assert peak < 3 * HEADER_BYTES  # not the 32 MiB member
        assert member.size > 30 * MIB


def _volume(path: Path, shape: tuple[int, int, int], data: np.ndarray | None = None) -> None:
    image = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16) if data is None else data, np.eye(4))
    image.header.set_data_shape(shape)
    image.header.set_data_offset(352)
    header = image.header.binaryblock + b"\0" * 4  # vox_offset 352
    body = b"" if data is None else data.tobytes(order="F")
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def test_a_volume_over_its_limits_is_rejected_from_its_header(tmp_path):
    huge = tmp_path / "huge.nii.gz"
    _volume(huge, (512, 512, 10_000))  # announces 5000 MiB of voxels in a file of a few hundred bytes
    rows = scan_volume_file(str(huge), parse_source(tmp_path), Member(str(huge)))
    assert [(r["status"], r["error"].split(":")[0]) for r in rows] == [("too_large", "volume too large")]
    dense = tmp_path / "dense.nii.gz"
    _volume(dense, (512, 512, 40), np.zeros((512, 512, 40), np.int16))  # 20 MiB of zeros in ~20 kB
    rows = scan_volume_file(str(dense), parse_source(tmp_path), Member(str(dense)))
    assert [r["status"] for r in rows] == ["suspicious_ratio"]
    noisy = tmp_path / "noisy.nii.gz"
    _volume(noisy, (64, 64, 40), np.random.default_rng(0).integers(-1000, 1000, (64, 64, 40), dtype=np.int16))
    rows = scan_volume_file(str(noisy), parse_source(tmp_path), Member(str(noisy)))
    assert [r["status"] for r in rows] == [OK] * 40


def test_the_limits_are_options_and_bad_values_are_refused(bomb_zip, tmp_path):
    runner = CliRunner()
    source = f"{bomb_zip}{ZIP_SEP}arc/train"
    result = runner.invoke(main, ["scan", source, "-o", str(tmp_path / "s.parquet"), "--max-ratio", "5000"])
    assert result.exit_code == 0, result.output
    assert "rejected too_large: 1" in result.output and "suspicious_ratio" not in result.output
    statuses = pd.read_parquet(tmp_path / "s.parquet").set_index("image_id")["status"]
    assert statuses["ID_dense"] == "not_dicom"  # allowed by the ratio, read (1 MiB of it) and found no DICOM
    result = runner.invoke(main, ["scan", source, "-o", str(tmp_path / "t.parquet"), "--max-ratio", "1"])
    assert result.exit_code == 2 and "--max-ratio" in result.output
    help_text = runner.invoke(main, ["convert", "--help"]).output
    assert "--max-file-mb" in help_text and "--max-volume-mb" in help_text and "rejected unread" in help_text
    with pytest.raises(ValueError, match="max_file_bytes must be at least 1 MiB"):
        ReadLimits(max_file_bytes=1000)
    with pytest.raises(ValueError, match="max_ratio must be a finite number above 1"):
        ReadLimits(max_ratio=float("inf"))


def test_a_header_longer_than_a_header_read_is_named_so(synth_dataset, tmp_path):
    ds = pydicom.dcmread(sorted((synth_dataset / "stage_2_train").glob("ID_*.dcm"))[0])
    ds.private_block(0x0029, "ICHKIT TEST", create=True).add_new(0x10, "OB", bytes(HEADER_BYTES + MIB))
    plain = tmp_path / "long.dcm"
    ds.save_as(plain, enforce_file_format=True)
    raw = tmp_path / "long_raw.dcm"
    raw.write_bytes(plain.read_bytes()[132:])
    source = parse_source(tmp_path)
    for path in (plain, raw):
        row, seconds, peak = _timed(lambda p=path: scan_file(str(p), source, Member(str(p))))
        assert row["status"] == "header_too_long", (path.name, row["error"])
        assert f"no pixel data within the first {HEADER_BYTES} bytes" in row["error"]
        assert peak < 3 * HEADER_BYTES


def test_a_bomb_in_one_study_zip_of_a_folder_is_rejected_and_the_other_zips_read(synth_dataset, tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    members = _good_members(synth_dataset / "stage_2_train")
    half = len(members) // 2
    _write_zip(folder / "study-1.zip", members[:half])
    _write_zip(folder / "study-2.zip", members[half:] + [("arc/train/ID_bomb.dcm", _deflated_zeros(2048), 2 * GIB, 0)])
    table, summary = scan(folder)
    statuses = table.set_index("image_id")["status"]
    assert statuses["ID_bomb"] == "too_large"
    assert summary.n_files == len(members) + 1 and summary.rejected["too_large"] == 1
