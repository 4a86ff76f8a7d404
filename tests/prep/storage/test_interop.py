"""ichprep.storage.store read without ichkit: zarr-python, Dask, xarray, tensorstore and a plain PyTorch Dataset.

Every reader must return, for every slot, the bytes of ichkit's own reader (``open_reader(root)[0:N]``),
on the layouts that matter: zstd (ichkit's direct shard encoder) and blosc-lz4 (written through zarr),
16- and 64-slice shards, a partial last shard, zero-filled slots (absent chunks).  The recipes are the code
blocks of README.md's "Reading a cache without ichkit", extracted and run as they are, so the README cannot
drift from what works.  The other way round, a store whose ``images`` array zarr-python rewrote (another
shard size, another codec, no shards) must still feed ``ichtrain``'s ShardStream the same values.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner

from ichprep.reading.labels import LABELS
from ichprep.spec import PreprocessSpec
from ichprep.storage.store import open_reader, open_store

# zarr lists the group's other files (the tables, the manifest) with a warning the README calls harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized as a component:UserWarning")

README = Path(__file__).resolve().parents[3] / "README.md"
SECTION = "## Reading a cache without ichkit"
#: A phrase found in exactly one python block of the section, per recipe.
RECIPES = {
    "zarr": 'group.attrs["ichkit"]',
    "xarray": "xr.open_zarr",
    "dask": "da.from_zarr",
    "tensorstore": "ts.open",
    "torch": "class CacheDataset",
}
DIMS = ("slice", "channel", "y", "x")
#: Store layouts read back: (spec, or None for the session's store6: 256², zstd, 16-slice shards).
VARIANTS = {
    "zstd-64": PreprocessSpec(size=64),  # 58 slots: one partial shard
    "zstd-16": PreprocessSpec(size=64, shard_slices=16),  # 3 full shards and a partial one of 10
    "blosc-lz4-64": PreprocessSpec(size=64, compressor="blosc-lz4"),
    "blosc-lz4-16": PreprocessSpec(size=64, shard_slices=16, compressor="blosc-lz4", compression_level=5),
    "store6-256": None,
}


def readme_blocks(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(rf"^```{lang}\n(.*?)^```", text[start : end if end > 0 else None], re.S | re.M)


def recipe(name: str) -> str:
    found = [block for block in readme_blocks("python") if RECIPES[name] in block]
    assert len(found) == 1, f"README section has {len(found)} {name} recipes"
    return found[0]


def run_recipe(name: str, store: Path, monkeypatch) -> dict:
    """Run the README's recipe as written (it opens "cache.zarr" in the working directory); its globals."""
    assert store.name == "cache.zarr"
    monkeypatch.chdir(store.parent)
    namespace: dict = {"__name__": f"readme_{name}"}
    exec(compile(recipe(name), f"README.md[{name}]", "exec"), namespace)
    return namespace


class Variant:
    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        self.slices = pd.read_parquet(root / "slices.parquet")
        self.studies = pd.read_parquet(root / "studies.parquet")
        self.n = len(self.slices)
        self.ref = open_reader(root)[0 : self.n]  # ichkit's own reader: the reference bytes
        self.shard_slices = zarr.open_group(root, mode="r").attrs["ichkit"]["layout"]["shard_slices"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, synth_dataset, tmp_path_factory) -> Variant:
    spec = VARIANTS[request.param]
    if spec is None:
        root = request.getfixturevalue("store6")
    else:
        from ichprep.convert import convert

        root = tmp_path_factory.mktemp(f"interop-{request.param}") / "cache.zarr"
        convert(synth_dataset / "stage_2_train", root, spec, labels_csv=synth_dataset / "stage_2_train.csv")
    return Variant(request.param, root)


def assert_same_bytes(actual, v: Variant, what: str) -> None:
    actual = np.asarray(actual)
    assert actual.dtype == np.uint8, f"{what}: dtype {actual.dtype}"
    assert actual.shape == v.ref.shape, f"{what}: shape {actual.shape} vs {v.ref.shape}"
    differ = np.flatnonzero((actual != v.ref).reshape(v.n, -1).any(axis=1))
    assert len(differ) == 0, f"{what} on {v.name}: slots {differ.tolist()} differ from ichkit's reader"


def test_variants_cover_partial_shards_and_zero_filled_slots(variant):
    assert variant.n % variant.shard_slices != 0, "the last shard should be partial"
    assert (~variant.slices["ok"]).any(), "a zero-filled slot (absent chunk) should be read back too"
    assert not variant.ref[~variant.slices["ok"].to_numpy(bool)].any()
    assert (
        variant.ref[variant.slices["ok"].to_numpy(bool)].reshape(int(variant.slices["ok"].sum()), -1).any(axis=1).all()
    )


def test_readme_section_has_every_recipe():
    assert len(readme_blocks("python")) == len(RECIPES)
    for name in RECIPES:
        recipe(name)
    assert len(readme_blocks("sh")) == 1


def test_zarr_python_recipe(variant, monkeypatch):
    ns = run_recipe("zarr", variant.root, monkeypatch)
    assert_same_bytes(ns["images"][:], variant, "zarr")
    assert_same_bytes(ns["images"][0 : variant.n], variant, "zarr slice")
    np.testing.assert_array_equal(ns["block"], variant.ref[:64])
    assert ns["images"].shards[0] == variant.shard_slices
    assert PreprocessSpec.from_attrs(ns["spec"]).shard_slices == variant.shard_slices


def test_dask_recipe(variant, monkeypatch):
    ns = run_recipe("dask", variant.root, monkeypatch)
    x = ns["x"]
    assert x.chunks[0][0] == min(variant.shard_slices, variant.n)  # one task per shard
    assert_same_bytes(x.compute(), variant, "dask")
    np.testing.assert_allclose(ns["channel_means"], variant.ref.mean(axis=(0, 2, 3), dtype=np.float64))
    import dask.array as da  # the plain call, per-slice chunks, reads the same

    assert_same_bytes(da.from_zarr(str(variant.root), component="images").compute(), variant, "dask default chunks")


def test_tensorstore_recipe(variant, monkeypatch):
    pytest.importorskip("tensorstore")
    ns = run_recipe("tensorstore", variant.root, monkeypatch)
    assert_same_bytes(ns["images"].read().result(), variant, "tensorstore")
    np.testing.assert_array_equal(ns["block"], variant.ref[:64])
    # Slice by slice too: each read decodes one inner chunk through the shard index.
    for i in range(0, variant.n, 7):
        np.testing.assert_array_equal(ns["images"][i].read().result(), variant.ref[i])


def test_xarray_recipe_joins_the_slice_table(variant, monkeypatch):
    pytest.importorskip("xarray")
    ns = run_recipe("xarray", variant.root, monkeypatch)
    ds = ns["ds"]
    assert ds["images"].dims == DIMS
    assert_same_bytes(ds["images"].values, variant, "xarray")
    table = variant.slices
    np.testing.assert_array_equal(ds["study_uid"].values, table["study_uid"].to_numpy(str))
    np.testing.assert_array_equal(ds["z"].values, table["z"].to_numpy("float32", na_value=np.nan))
    for label in LABELS:
        assert ds[label].dims == ("slice",)
        np.testing.assert_array_equal(ds[label].values, table[label].to_numpy("float32", na_value=np.nan))
    first = variant.studies.iloc[0]
    assert ns["study"].dims == DIMS
    np.testing.assert_array_equal(ns["study"].values, variant.ref[first["start"] : first["stop"]])


def test_torch_dataset_recipe(variant, monkeypatch):
    import torch

    ns = run_recipe("torch", variant.root, monkeypatch)
    dataset = ns["dataset"]
    assert len(dataset) == variant.n
    labels = variant.slices[list(LABELS)].to_numpy("float32", na_value=np.nan)
    for i in range(variant.n):
        image, y = dataset[i]
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.numpy(), variant.ref[i])
        np.testing.assert_array_equal(y.numpy(), labels[i])
    dataset[0]  # the parent has used zarr's I/O thread before the fork, as in training
    workers = 2 if variant.name == "zstd-16" else 0  # forked workers (README: zarr resets after a fork), once
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=16, shuffle=False, num_workers=workers, multiprocessing_context="fork" if workers else None
    )
    images = torch.cat([batch[0] for batch in loader]).numpy()
    assert_same_bytes(images, variant, f"torch DataLoader, {workers} workers")


def test_verify_recipe_against_a_published_manifest(synth_dataset, tmp_path, monkeypatch):
    from ichprep.cli import main
    from ichprep.convert import convert

    root = tmp_path / "cache.zarr"
    convert(
        synth_dataset / "stage_2_train",
        root,
        PreprocessSpec(size=64, shard_slices=16),
        labels_csv=synth_dataset / "stage_2_train.csv",
    )
    shutil.copy(root / "manifest.json", tmp_path / "published.json")  # what the author published
    [line] = [line for block in readme_blocks("sh") for line in block.splitlines() if line.startswith("ichprep ")]
    args = shlex.split(line.split("#")[0])[1:]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    shard = root / "images" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "images/c/1/0/0/0" in result.output


# zarr-python, not ichkit, writes the images array of a copy; ichtrain must read the same values.
REWRITES = {
    "zstd-8-slice-shards": dict(
        chunks=(1, 3, 64, 64), shards=(8, 3, 64, 64), compressors=zarr.codecs.ZstdCodec(level=3)
    ),
    "blosc-zstd-32-slice-shards": dict(
        chunks=(1, 3, 64, 64),
        shards=(32, 3, 64, 64),
        compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
    ),
    "gzip-unsharded-5-slice-chunks": dict(chunks=(5, 3, 64, 64), compressors=zarr.codecs.GzipCodec(level=1)),
}


@pytest.fixture(scope="module")
def zstd16(synth_dataset, tmp_path_factory) -> Path:
    from ichprep.convert import convert

    root = tmp_path_factory.mktemp("interop-rewrite-base") / "cache.zarr"
    convert(
        synth_dataset / "stage_2_train",
        root,
        PreprocessSpec(size=64, shard_slices=16),
        labels_csv=synth_dataset / "stage_2_train.csv",
    )
    return root


@pytest.mark.parametrize("rewrite", list(REWRITES))
def test_shardstream_reads_images_written_by_zarr_python(zstd16, rewrite, tmp_path):
    from ichtrain.data.stream import ShardStream
    from ichtrain.data.tables import targets

    values = open_reader(zstd16)[0 : len(pd.read_parquet(zstd16 / "slices.parquet"))]
    copy = tmp_path / "cache.zarr"
    shutil.copytree(zstd16, copy)
    group = zarr.open_group(copy, mode="r+")
    group.create_array("images", shape=values.shape, dtype="uint8", fill_value=0, overwrite=True, **REWRITES[rewrite])[
        :
    ] = values
    np.testing.assert_array_equal(zarr.open_group(copy, mode="r")["images"][:], values)  # zarr wrote what we asked

    store = open_store(copy, check_files=False)  # its manifest still lists the files ichprep wrote
    ok = store.slices["ok"].to_numpy(bool)
    stream = ShardStream.from_store(
        store, ok.astype(np.int64), targets(store.slices, "rsna"), shuffle=False, batch_size=8
    )
    batches = list(stream)
    slots = np.concatenate([b.slots.numpy() for b in batches])
    np.testing.assert_array_equal(slots, np.flatnonzero(ok))
    images = np.concatenate([b.images.numpy() for b in batches])
    differ = np.flatnonzero((images != values[slots]).reshape(len(slots), -1).any(axis=1))
    assert len(differ) == 0, f"ShardStream on a zarr-python {rewrite} array: slots {slots[differ].tolist()} differ"
    np.testing.assert_array_equal(
        np.concatenate([b.targets.numpy() for b in batches]), targets(store.slices, "rsna")[slots]
    )
