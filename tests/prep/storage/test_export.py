from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ichprep.cli import main
from ichprep.errors import StoreError, StoreExistsError
from ichprep.storage.export import export_store
from ichprep.storage.manifest import verify_store
from ichprep.storage.store import MANIFEST, open_store


def test_whole_store_copy_verifies_against_the_published_manifest(store6, tmp_path):
    summary = export_store(store6, tmp_path / "copy.zarr")
    assert summary.copied_verbatim
    assert verify_store(tmp_path / "copy.zarr", store6 / MANIFEST).ok


def test_subset_of_studies_is_resharded_with_its_own_manifest(store6, tmp_path):
    source = open_store(store6)
    wanted = list(source.studies["study_uid"].iloc[[4, 1]])  # order in the file does not matter
    listing = tmp_path / "studies.txt"
    listing.write_text("# studies for a collaborator\n" + "\n".join(wanted) + "\n\n")
    dest = tmp_path / "subset.zarr"
    result = CliRunner().invoke(
        main, ["export", str(store6), str(dest), "--studies", str(listing), "--shard-slices", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "ichprep verify" in result.output
    assert verify_store(dest).ok
    copy = open_store(dest)
    assert set(copy.studies["study_uid"]) == set(wanted)
    assert copy.images.shards[0] == 8
    for row in copy.studies.itertuples():
        src_row = source.studies.set_index("study_uid").loc[row.study_uid]
        np.testing.assert_array_equal(copy.images[row.start : row.stop], source.images[src_row.start : src_row.stop])
        assert (
            copy.slices.iloc[row.start : row.stop]["image_id"].to_numpy()
            == source.slices.iloc[src_row.start : src_row.stop]["image_id"].to_numpy()
        ).all()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["counts"]["studies"] == 2 and len(manifest["source"]["export_of"]) == 64


def test_export_refuses_unknown_studies_and_existing_dest(store6, tmp_path):
    with pytest.raises(StoreError, match="1 studies are not in"):
        export_store(store6, tmp_path / "x.zarr", studies=["1.2.3.nope"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="--overwrite"):
        export_store(store6, tmp_path / "full")
