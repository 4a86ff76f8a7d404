"""Store format 2: ``images`` carries Zarr v3 dimension_names; format-1 stores still read, and upgrade."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from ichprep.cli import main
from ichprep.convert import convert
from ichprep.errors import StoreError
from ichprep.manifest import verify_store, with_metadata
from ichprep.shardcodec import encode_shard
from ichprep.spec import AXES, FORMAT_VERSION, PreprocessSpec
from ichprep.store import IMAGES, MANIFEST, compressor, open_reader, open_store, shard_path
from ichprep.upgrade import upgrade_store
from ichtrain.data import ShardStream, targets

SPEC = PreprocessSpec(size=32, shard_slices=8)


@pytest.fixture(scope="module")
def current(synth_dataset, tmp_path_factory):
    """The two-study synthetic set converted by this version (tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("format") / "cache.zarr"
    convert(synth_dataset / "stage_2_train", root, SPEC, labels_csv=synth_dataset / "stage_2_train.csv")
    return root


def copy_of(root, tmp_path, name="copy.zarr"):
    return shutil.copytree(root, tmp_path / name)


def shard_files(root) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / IMAGES / "c").rglob("*")) if p.is_file()
    }


def make_format1(root):
    """What a store converted before format 2 holds: no dimension_names, format_version 1, manifest to match."""
    images_meta = json.loads((root / IMAGES / "zarr.json").read_text())
    del images_meta["dimension_names"]
    group_meta = json.loads((root / "zarr.json").read_text())
    group_meta["attributes"]["ichkit"]["format_version"] = 1
    written = {
        f"{IMAGES}/zarr.json": json.dumps(images_meta, indent=2).encode(),
        "zarr.json": json.dumps(group_meta, indent=2).encode(),
    }
    for name, data in written.items():
        (root / name).write_bytes(data)
    run = json.loads((root / ".ichprep" / "run.json").read_text())
    run["spec"]["format_version"] = 1
    (root / ".ichprep" / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    manifest = with_metadata(json.loads((root / MANIFEST).read_text()), written, group_meta["attributes"]["ichkit"])
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


@pytest.fixture
def format1(current, tmp_path):
    root = make_format1(copy_of(current, tmp_path, "old.zarr"))
    assert verify_store(root).ok  # a consistent old store, not a damaged one
    return root


def upgrade_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ichprep upgrade" in r.message]


# ---------------------------------------------------------------- format 2


def test_images_carry_dimension_names_and_the_spec_stays_in_the_group(current):
    meta = json.loads((current / IMAGES / "zarr.json").read_text())
    assert meta["dimension_names"] == ["slice", "channel", "y", "x"] == list(AXES)
    attrs = json.loads((current / "zarr.json").read_text())["attributes"]["ichkit"]
    assert attrs["format_version"] == FORMAT_VERSION == 2 and attrs["layout"]["axes"] == list(AXES)
    assert "windows" in attrs and "ichkit" not in meta["attributes"]


#: The tables and .ichprep/ next to the arrays are not Zarr nodes; zarr says so when xarray lists the group.
NOT_ZARR = pytest.mark.filterwarnings("ignore:Object at .* is not recognized as a component of a Zarr hierarchy")


@NOT_ZARR
def test_xarray_opens_the_store_with_named_axes(current):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(current, zarr_format=3, consolidated=False)
    assert ds["images"].dims == AXES
    assert dict(ds.sizes) == {"slice": len(open_store(current).slices), "channel": 3, "y": 32, "x": 32}
    np.testing.assert_array_equal(ds["images"].values, open_store(current).images[:])


def test_dimension_names_leave_the_shard_bytes_unchanged(current, tmp_path):
    """The converter's shards equal zarr's for the same pixels in an array without dimension_names (format 1)."""
    pixels = open_store(current).images[:]
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3).create_array(
        IMAGES,
        shape=pixels.shape,
        chunks=(1,) + pixels.shape[1:],
        shards=(SPEC.shard_slices,) + pixels.shape[1:],
        dtype="uint8",
        fill_value=0,
        compressors=compressor(SPEC),
    )
    plain[:] = pixels
    assert "dimension_names" not in json.loads((tmp_path / "plain.zarr" / IMAGES / "zarr.json").read_text())
    assert shard_files(tmp_path / "plain.zarr") == shard_files(current)
    first = bytes(encode_shard(pixels[: SPEC.shard_slices], SPEC.shard_slices, SPEC.compression_level))
    assert first == (current / shard_path(0)).read_bytes()


# ---------------------------------------------------------------- format 1 still reads


def test_format1_store_opens_with_one_warning_and_the_same_pixels(current, format1, caplog):
    with caplog.at_level(logging.WARNING):
        old = open_store(format1)
    (message,) = upgrade_warnings(caplog)
    assert "format 1" in message and "dimension_names" in message and f"ichprep upgrade {format1}" in message
    new = open_store(current)
    assert old.spec == new.spec
    np.testing.assert_array_equal(old.images[:], new.images[:])
    np.testing.assert_array_equal(open_reader(format1)[0 : len(old.slices)], new.images[:])
    counts = old.slices["ok"].to_numpy(bool).astype(np.int64)
    seen = {}
    for store in (old, new):
        stream = ShardStream.from_store(store, counts, targets(store.slices, "rsna"), shuffle=False)
        seen[store.root.url] = {int(s): img for b in stream for img, s in zip(b.images.numpy(), b.slots)}
    a, b = seen.values()
    assert a.keys() == b.keys() and len(a) == counts.sum()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_current_store_opens_without_the_warning(current, caplog):
    with caplog.at_level(logging.WARNING):
        open_store(current)
    assert not upgrade_warnings(caplog)


def test_unknown_format_is_refused_with_the_fix():
    attrs = PreprocessSpec().to_attrs()
    with pytest.raises(ValueError, match="newer than this ichkit reads.*update ichkit"):
        PreprocessSpec.from_attrs({**attrs, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="reconvert"):
        PreprocessSpec.from_attrs({**attrs, "format_version": 0})


# ---------------------------------------------------------------- upgrade


def test_upgrade_gives_the_bytes_of_a_fresh_conversion_and_verifies(current, format1, caplog):
    shards = shard_files(format1)
    summary = upgrade_store(format1)
    assert (summary.from_version, summary.to_version) == (1, FORMAT_VERSION)
    assert set(summary.rewritten) == {f"{IMAGES}/zarr.json", ".ichprep/run.json", MANIFEST, "zarr.json"}
    assert shard_files(format1) == shards
    for name in ("zarr.json", f"{IMAGES}/zarr.json", MANIFEST, ".ichprep/run.json"):
        assert (format1 / name).read_bytes() == (current / name).read_bytes(), name
    report = verify_store(format1)
    assert report.ok, [str(p) for p in report.problems]
    with caplog.at_level(logging.WARNING):
        open_store(format1)
    assert not upgrade_warnings(caplog)
    assert upgrade_store(format1).rewritten == ()


def test_rerunning_convert_on_an_upgraded_store_resumes(synth_dataset, format1):
    upgrade_store(format1)
    before = (format1 / MANIFEST).read_bytes()
    summary = convert(synth_dataset / "stage_2_train", format1, SPEC, labels_csv=synth_dataset / "stage_2_train.csv")
    assert summary.shards_skipped == summary.n_shards and (format1 / MANIFEST).read_bytes() == before


def test_upgrade_refuses_a_store_whose_metadata_was_altered(format1):
    (format1 / IMAGES / "zarr.json").write_text((format1 / IMAGES / "zarr.json").read_text() + " ")
    with pytest.raises(StoreError, match="differs from the manifest.*ichprep verify"):
        upgrade_store(format1)
    assert json.loads((format1 / "zarr.json").read_text())["attributes"]["ichkit"]["format_version"] == 1


@NOT_ZARR
def test_upgrade_command(format1, tmp_path):
    xr = pytest.importorskip("xarray")
    with pytest.raises(KeyError, match="dimension_names"):  # the reason for format 2
        xr.open_zarr(format1, zarr_format=3, consolidated=False)
    published = tmp_path / "published.json"
    result = CliRunner().invoke(main, ["upgrade", str(format1), "--manifest-out", str(published)])
    assert result.exit_code == 0, result.output
    assert "from store format 1 to 2" in result.output and "shards untouched" in result.output
    assert published.read_bytes() == (format1 / MANIFEST).read_bytes()
    assert CliRunner().invoke(main, ["verify", str(format1), "--manifest", str(published)]).exit_code == 0
    assert xr.open_zarr(format1, zarr_format=3, consolidated=False)["images"].dims == AXES
    again = CliRunner().invoke(main, ["upgrade", str(format1)])
    assert again.exit_code == 0 and "already store format 2" in again.output


# ---------------------------------------------------------------- verify wording


@pytest.mark.parametrize("level, smaller", [(19, True), (1, False)])
def test_verify_names_a_rewritten_shard_size_without_guessing_why(current, tmp_path, level, smaller):
    root = copy_of(current, tmp_path)
    shard = root / shard_path(0)
    expected = shard.stat().st_size
    pixels = open_reader(root)[0 : SPEC.shard_slices]
    data = bytes(encode_shard(pixels, SPEC.shard_slices, level))
    if not smaller:  # a larger rewrite: the same pixels plus noise in one slot
        noisy = pixels.copy()
        noisy[0] = np.random.default_rng(0).integers(0, 256, noisy[0].shape, dtype=np.uint8)
        data = bytes(encode_shard(noisy, SPEC.shard_slices, level))
    assert (len(data) < expected) == smaller and len(data) != expected
    shard.write_bytes(data)
    (problem,) = [p for p in verify_store(root).problems if p.path == shard_path(0)]
    assert problem.kind == "size"
    assert problem.detail == f"differs from the manifest (size {len(data)}, expected {expected})"
    result = CliRunner().invoke(main, ["verify", str(root)])
    assert (
        result.exit_code == 1 and f"differs from the manifest (size {len(data)}, expected {expected})" in result.output
    )
