"""Shared fixtures: real pydicom CT files and a small synthetic RSNA-style dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file


def pydicom_file(name: str) -> Path:
    """A file bundled with pydicom (download=False: tests never touch the network)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return Path(path)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """``ichprep synth --studies 2 --seed 0``: the smallest valid dataset (with quirks)."""
    from ichprep.synth import generate

    out = tmp_path_factory.mktemp("synth2")
    generate(out, studies=2, seed=0)
    return out
