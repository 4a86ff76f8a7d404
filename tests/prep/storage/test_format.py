"""ichprep.storage.upgrade: store format 3, format-1 and format-2 stores still read, and upgrade.

Format 3: ``images`` carries Zarr v3 dimension_names (since 2) and the recorded pipeline names the real readers
(since 3).
"""

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
from ichprep.spec import AXES, FORMAT_VERSION, PIPELINE, PreprocessSpec
from ichprep.storage.manifest import verify_store, with_metadata
from ichprep.storage.shardcodec import encode_shard
from ichprep.storage.store import IMAGES, MANIFEST, compressor, open_reader, open_store, shard_path
from ichprep.storage.upgrade import upgrade_store
from ichtrain.checkpoint import check_spec
from ichtrain.data.stream import ShardStream
from ichtrain.data.tables import targets

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


#: The pipeline formats 1 and 2 recorded: its first step said pydicom decodes every file.
OLD_PIPELINE = ["decode pixels (pydicom, all transfer syntaxes with pylibjpeg plugins)", *PIPELINE[2:]]


def make_old(root, version):
    """What a store converted as format 1 (no dimension_names) or 2 holds, with the manifest to match."""
    group_meta = json.loads((root / "zarr.json").read_text())
    group_meta["attributes"]["ichkit"].update(format_version=version, pipeline=OLD_PIPELINE)
    written = {"zarr.json": json.dumps(group_meta, indent=2).encode()}
    if version == 1:
        images_meta = json.loads((root / IMAGES / "zarr.json").read_text())
        del images_meta["dimension_names"]
        written[f"{IMAGES}/zarr.json"] = json.dumps(images_meta, indent=2).encode()
    for name, data in written.items():
        (root / name).write_bytes(data)
    run = json.loads((root / ".ichprep" / "run.json").read_text())
    run["spec"].update(format_version=version, pipeline=OLD_PIPELINE)
    (root / ".ichprep" / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    manifest = with_metadata(json.loads((root / MANIFEST).read_text()), written, group_meta["attributes"]["ichkit"])
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


@pytest.fixture(params=[1, 2], ids=["format1", "format2"])
def old(current, tmp_path, request):
    root = make_old(copy_of(current, tmp_path, "old.zarr"), request.param)
    assert verify_store(root).ok  # a consistent old store, not a damaged one
    return root


def version_of(root) -> int:
    return json.loads((root / "zarr.json").read_text())["attributes"]["ichkit"]["format_version"]


def upgrade_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ichprep upgrade" in r.message]


# ---------------------------------------------------------------- format 3


def test_images_carry_dimension_names_and_the_spec_stays_in_the_group(current):
    meta = json.loads((current / IMAGES / "zarr.json").read_text())
    assert meta["dimension_names"] == ["slice", "channel", "y", "x"] == list(AXES)
    attrs = json.loads((current / "zarr.json").read_text())["attributes"]["ichkit"]
    assert attrs["format_version"] == FORMAT_VERSION == 3
    assert attrs["layout"]["axes"] == list(AXES)
    assert attrs["pipeline"] == list(PIPELINE)
    assert "plainread" in PIPELINE[0]
    assert "pydicom.dcmread" in PIPELINE[0]
    assert "windows" in attrs
    assert "ichkit" not in meta["attributes"]


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


# ---------------------------------------------------------------- formats 1 and 2 still read


def test_an_older_store_opens_with_one_warning_and_the_same_pixels(current, old, caplog):
    version = version_of(old)
    with caplog.at_level(logging.WARNING):
        before = open_store(old)
    (message,) = upgrade_warnings(caplog)
    assert f"format {version}" in message
    assert "recorded pipeline" in message
    assert f"ichprep upgrade {old}" in message
    assert ("dimension_names" in message) == (version == 1)
    new = open_store(current)
    assert before.spec == new.spec
    np.testing.assert_array_equal(before.images[:], new.images[:])
    np.testing.assert_array_equal(open_reader(old)[0 : len(before.slices)], new.images[:])
    counts = before.slices["ok"].to_numpy(bool).astype(np.int64)
    seen = {}
    for store in (before, new):
        stream = ShardStream.from_store(store, counts, targets(store.slices, "rsna"), shuffle=False)
        seen[store.root.url] = {int(s): img for b in stream for img, s in zip(b.images.numpy(), b.slots)}
    a, b = seen.values()
    assert a.keys() == b.keys()
    assert len(a) == counts.sum()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_model_trained_on_an_older_store_accepts_a_current_one_and_back(current, old):
    """The pipeline's wording is not a preprocessing difference: checkpoints keep working across formats."""
    old_spec = json.loads((old / "zarr.json").read_text())["attributes"]["ichkit"]
    check_spec(open_store(current), old_spec, "a checkpoint of the older store")
    check_spec(open_store(old), open_store(current).spec.to_attrs(), "a checkpoint of the current store")
    with pytest.raises(ValueError, match="another preprocessing spec.*size: 48 vs 32"):
        check_spec(open_store(old), {**old_spec, "size": 48}, "a checkpoint at another size")


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


def test_upgrade_gives_the_bytes_of_a_fresh_conversion_and_verifies(current, old, caplog):
    version = version_of(old)
    shards = shard_files(old)
    summary = upgrade_store(old)
    assert (summary.from_version, summary.to_version) == (version, FORMAT_VERSION)
    images_meta = {f"{IMAGES}/zarr.json"} if version == 1 else set()
    assert set(summary.rewritten) == images_meta | {".ichprep/run.json", MANIFEST, "zarr.json"}
    assert shard_files(old) == shards
    for name in ("zarr.json", f"{IMAGES}/zarr.json", MANIFEST, ".ichprep/run.json"):
        assert (old / name).read_bytes() == (current / name).read_bytes(), name
    report = verify_store(old)
    assert report.ok, [str(p) for p in report.problems]
    with caplog.at_level(logging.WARNING):
        open_store(old)
    assert not upgrade_warnings(caplog)
    assert upgrade_store(old).rewritten == ()


def test_rerunning_convert_on_an_upgraded_store_resumes(synth_dataset, old):
    upgrade_store(old)
    before = (old / MANIFEST).read_bytes()
    summary = convert(synth_dataset / "stage_2_train", old, SPEC, labels_csv=synth_dataset / "stage_2_train.csv")
    assert summary.shards_skipped == summary.n_shards
    assert (old / MANIFEST).read_bytes() == before


def test_upgrade_refuses_a_store_whose_metadata_was_altered(old):
    version = version_of(old)
    (old / "zarr.json").write_text((old / "zarr.json").read_text() + " ")
    with pytest.raises(StoreError, match="differs from the manifest.*ichprep verify"):
        upgrade_store(old)
    assert version_of(old) == version


@pytest.fixture
def format1(current, tmp_path):
    return make_old(copy_of(current, tmp_path, "old.zarr"), 1)


@NOT_ZARR
def test_upgrade_command(format1, tmp_path):
    xr = pytest.importorskip("xarray")
    with pytest.raises(KeyError, match="dimension_names"):  # the reason for format 2
        xr.open_zarr(format1, zarr_format=3, consolidated=False)
    published = tmp_path / "published.json"
    result = CliRunner().invoke(main, ["upgrade", str(format1), "--manifest-out", str(published)])
    assert result.exit_code == 0, result.output
    assert "from store format 1 to 3" in result.output
    assert "shards untouched" in result.output
    assert published.read_bytes() == (format1 / MANIFEST).read_bytes()
    assert CliRunner().invoke(main, ["verify", str(format1), "--manifest", str(published)]).exit_code == 0
    assert xr.open_zarr(format1, zarr_format=3, consolidated=False)["images"].dims == AXES
    again = CliRunner().invoke(main, ["upgrade", str(format1)])
    assert again.exit_code == 0
    assert "already store format 3" in again.output


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
    assert (len(data) < expected) == smaller
    assert len(data) != expected
    shard.write_bytes(data)
    (problem,) = [p for p in verify_store(root).problems if p.path == shard_path(0)]
    assert problem.kind == "size"
    assert problem.detail == f"differs from the manifest (size {len(data)}, expected {expected})"
    result = CliRunner().invoke(main, ["verify", str(root)])
    assert result.exit_code == 1
    assert f"differs from the manifest (size {len(data)}, expected {expected})" in result.output
