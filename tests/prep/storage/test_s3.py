"""ichprep.storage.location on S3: a real moto server on 127.0.0.1, credentials from the environment."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from ichprep.convert import convert
from ichprep.errors import StoreLockedError
from ichprep.spec import PreprocessSpec
from ichprep.storage.export import export_store
from ichprep.storage.location import Location
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST, open_store

BIN = Path(sys.executable).parent
SPEC = PreprocessSpec(size=64, shard_slices=16)


@pytest.fixture(scope="module")
def local_and_s3(s3_env, synth_dataset, tmp_path_factory):
    local = tmp_path_factory.mktemp("s3ref") / "cache.zarr"
    convert(synth_dataset / "stage_2_train", local, SPEC, labels_csv=synth_dataset / "stage_2_train.csv")
    url = "s3://ichkit-test/caches/demo.zarr"
    convert(synth_dataset / "stage_2_train", url, SPEC, labels_csv=synth_dataset / "stage_2_train.csv")
    return local, url


def test_convert_to_s3_gives_the_same_bytes_as_local(local_and_s3):
    local, url = local_and_s3
    remote = Location(url)
    assert remote.read_bytes(MANIFEST) == (local / MANIFEST).read_bytes()
    assert not remote.exists(".ichprep/lock")  # the lease is gone after the run
    assert verify_store(url).ok
    store = open_store(url)
    assert store.images.shape[0] == len(store.slices)
    assert store.images[3].any()


def test_verify_on_s3_catches_a_deleted_and_an_altered_shard(local_and_s3, tmp_path):
    _, url = local_and_s3
    copy = "s3://ichkit-test/caches/damaged.zarr"
    export_store(url, copy)
    remote = Location(copy)
    remote.remove("images/c/1/0/0/0")
    data = bytearray(remote.read_bytes("images/c/0/0/0/0"))
    data[99] ^= 0xFF
    remote.write_bytes("images/c/0/0/0/0", bytes(data))
    kinds = {p.path: p.kind for p in verify_store(copy).problems}
    assert kinds["images/c/1/0/0/0"] == "missing"
    assert kinds["images/c/0/0/0/0"] == "altered"


def test_rerun_on_s3_resumes_and_export_to_local_verifies(local_and_s3, synth_dataset, tmp_path):
    local, url = local_and_s3
    again = convert(synth_dataset / "stage_2_train", url, SPEC, labels_csv=synth_dataset / "stage_2_train.csv")
    assert again.shards_skipped == again.n_shards
    export_store(url, tmp_path / "back.zarr")
    assert verify_store(tmp_path / "back.zarr", local / MANIFEST).ok


def test_live_lease_refuses_a_second_converter(s3_env, synth_dataset):
    url = "s3://ichkit-test/caches/leased.zarr"
    Location(url).write_json(".ichprep/lock", {"owner": "pid 1 on elsewhere", "expires": time.time() + 60})
    with pytest.raises(StoreLockedError, match="pid 1 on elsewhere"):
        convert(synth_dataset / "stage_2_train", url, SPEC)
