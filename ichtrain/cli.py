"""``ichtrain`` command line."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ichkit")
def main() -> None:
    """Train hemorrhage detectors from an ichprep Zarr cache."""
