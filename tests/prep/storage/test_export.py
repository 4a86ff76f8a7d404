"""ichprep.storage.export: a whole store copied verbatim, and the refusals of an export."""

from __future__ import annotations

import pytest

from ichprep.errors import StoreError, StoreExistsError
from ichprep.storage.export import export_store
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST


def test_whole_store_copy_verifies_against_the_published_manifest(store6, tmp_path):
    summary = export_store(store6, tmp_path / "copy.zarr")
    assert summary.copied_verbatim
    assert verify_store(tmp_path / "copy.zarr", store6 / MANIFEST).ok


def test_export_refuses_unknown_studies_and_existing_dest(store6, tmp_path):
    with pytest.raises(StoreError, match="1 studies are not in"):
        export_store(store6, tmp_path / "x.zarr", studies=["1.2.3.nope"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="--overwrite"):
        export_store(store6, tmp_path / "full")
