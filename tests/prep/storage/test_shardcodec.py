"""ichprep.storage.shardcodec: direct shards byte-identical to zarr's, ranged reads, empty shards, a damaged index."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from ichprep.errors import StoreError
from ichprep.spec import PreprocessSpec
from ichprep.storage.shardcodec import ShardReader
from ichprep.storage.store import create_images, open_reader, shard_path, write_shard


@pytest.fixture
def arrays(tmp_path):
    """The same 5-slot array (shards of 2: two full shards, one partial) written by zarr and by write_shard."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 40, (5, 3, 16, 16), dtype=np.uint8)  # compressible, like windowed CT
    data[1] = 0  # a zero-filled slot: zarr leaves its chunk out
    spec = PreprocessSpec(size=16, shard_slices=2, compression_level=1)
    by_zarr, direct = tmp_path / "zarr.zarr", tmp_path / "direct.zarr"
    create_images(by_zarr, 5, spec)[:] = data
    create_images(direct, 5, spec)
    for k, start in enumerate(range(0, 5, 2)):
        write_shard(direct, spec, k, start, data[start : start + 2])
    return data, by_zarr, direct, spec


def test_direct_shards_are_byte_identical_to_zarr(arrays):
    data, by_zarr, direct, _ = arrays
    for k in range(3):
        assert (direct / shard_path(k)).read_bytes() == (by_zarr / shard_path(k)).read_bytes()
    np.testing.assert_array_equal(zarr.open_group(str(direct), mode="r")["images"][:], data)


@pytest.mark.parametrize("a, b", [(0, 5), (0, 2), (1, 4), (3, 4), (4, 5), (2, 2)])
def test_reader_ranges_equal_zarr(arrays, a, b):
    data, _, direct, _ = arrays
    reader = open_reader(direct)
    assert isinstance(reader, ShardReader)
    np.testing.assert_array_equal(reader[a:b], data[a:b])


def test_all_zero_shard_has_no_file_and_reads_as_zeros(tmp_path):
    spec = PreprocessSpec(size=16, shard_slices=2)
    create_images(tmp_path / "s.zarr", 2, spec)
    record = write_shard(tmp_path / "s.zarr", spec, 0, 0, np.zeros((2, 3, 16, 16), np.uint8))
    assert record["sha256"] is None
    assert not (tmp_path / "s.zarr" / shard_path(0)).exists()
    assert not open_reader(tmp_path / "s.zarr")[0:2].any()


def test_damaged_index_is_reported(arrays):
    _, _, direct, _ = arrays
    shard = direct / shard_path(0)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard index is damaged"):
        open_reader(direct)[0:2]


def test_blosc_stores_go_through_zarr(tmp_path):
    spec = PreprocessSpec(size=16, shard_slices=2, compressor="blosc-lz4")
    data = np.arange(2 * 3 * 16 * 16, dtype=np.uint32).astype(np.uint8).reshape(2, 3, 16, 16)
    create_images(tmp_path / "b.zarr", 2, spec)
    write_shard(tmp_path / "b.zarr", spec, 0, 0, data)
    reader = open_reader(tmp_path / "b.zarr")
    assert not isinstance(reader, ShardReader)
    np.testing.assert_array_equal(reader[0:2], data)
