"""ichprep.cluster: the command line starts a local Dask cluster only for work that pays for it."""

from __future__ import annotations

import pytest

from ichprep.cluster import MIN_FILES_FOR_CLUSTER, OnDemand, resolve_client
from ichprep.convert import convert
from ichprep.spec import PreprocessSpec


def test_small_work_runs_in_process_and_starts_nothing():
    with OnDemand() as clients:
        assert clients.client(MIN_FILES_FOR_CLUSTER - 1) is None
        assert clients._client is None


def test_enough_files_or_explicit_workers_start_one_cluster_reused_and_closed():
    with OnDemand(workers=1) as clients:
        client = clients.client(1)  # --workers given: the user asked for a cluster
        assert client is not None
        assert sum(client.nthreads().values()) == 1
        assert clients.client(10**6) is client
    assert client.status in ("closed", "closing")
    with OnDemand(workers=None, min_files=5) as clients:
        assert clients.client(4) is None
        assert clients.client(5) is not None


def test_resolve_client_passes_clients_and_none_through():
    marker = object()
    assert resolve_client(marker, 1) is marker
    assert resolve_client(None, 10**6) is None


def test_convert_with_on_demand_matches_in_process_bytes(synth_dataset, tmp_path):
    spec = PreprocessSpec(size=64, shard_slices=16)
    convert(synth_dataset / "stage_2_train", tmp_path / "a.zarr", spec)
    with OnDemand(workers=None, min_files=1) as clients:  # forces the cluster path
        convert(synth_dataset / "stage_2_train", tmp_path / "b.zarr", spec, client=clients)
        assert clients._client is not None
    assert (tmp_path / "a.zarr" / "manifest.json").read_bytes() == (tmp_path / "b.zarr" / "manifest.json").read_bytes()


@pytest.mark.parametrize("workers", [0, -1])
def test_bad_worker_counts_fail_loudly(workers):
    with pytest.raises(ValueError, match="workers must be >= 1"), OnDemand(workers=workers) as clients:
        clients.client(1)
