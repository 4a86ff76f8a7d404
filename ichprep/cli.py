"""``ichprep`` command line: thin click commands that call one library function each."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from tqdm import tqdm

from .errors import IchprepError

logger = logging.getLogger("ichprep")


@contextmanager
def _bar(total: int | None, unit: str, desc: str):
    """A tqdm bar whose ``update`` is the library's ``progress`` callback; silent when not a terminal."""
    with tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, disable=None, file=sys.stderr) as bar:
        yield bar.update


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="ichkit")
def main(verbose: int) -> None:
    """Turn the RSNA intracranial hemorrhage DICOM archive into a sharded Zarr v3 training cache."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", type=click.IntRange(min=1), default=20, show_default=True, help="Number of studies.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
def synth(out_dir: Path, studies: int, seed: int) -> None:
    """Write a synthetic RSNA-style dataset to OUT_DIR (stage_2_train/ + stage_2_train.csv)."""
    from .synth import generate

    with _bar(None, "slice", "synth") as progress:
        summary = generate(out_dir, studies=studies, seed=seed, progress=progress)
    click.echo(
        f"wrote {summary.n_slices} slices of {summary.n_studies} studies ({summary.n_patients} patients, "
        f"{summary.n_positive_slices} positive slices) to {summary.dicom_dir}\nlabels: {summary.labels_csv}"
    )
    for quirk, ids in summary.quirks.items():
        click.echo(f"  quirk {quirk}: {len(ids)} slice(s)")


def cluster_options(command):
    """--workers / --scheduler, shared by every command that runs on Dask."""
    command = click.option(
        "--scheduler", metavar="ADDRESS", default=None,
        help="Address of an existing Dask scheduler (tcp://host:8786) instead of a local cluster.",
    )(command)
    return click.option(
        "--workers", type=click.IntRange(min=1), default=None,
        help="Worker processes of the local Dask cluster [default: one per core].",
    )(command)


@main.command()
@click.argument("dicom_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kaggle label CSV (ID,Label).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Parquet file to write, e.g. slices.parquet.")
@cluster_options
def scan(dicom_dir: Path, labels_csv: Path | None, output: Path, workers: int | None, scheduler: str | None) -> None:
    """Read every DICOM header under DICOM_DIR in parallel and write one Parquet row per file."""
    from .cluster import dask_client
    from .scan import list_dicom_files, scan as run_scan, write_scan

    if workers and scheduler:
        raise click.UsageError("give --workers or --scheduler, not both")
    try:
        total = len(list_dicom_files(dicom_dir))
        with dask_client(workers, scheduler) as client, _bar(total, "file", "scan") as progress:
            table, summary = run_scan(dicom_dir, labels_csv, client=client, progress=progress)
        write_scan(table, output)
    except (IchprepError, OSError) as exc:
        _fail(exc)
    click.echo(
        f"scanned {summary.n_files} files: {summary.n_ok} ok in {summary.n_studies} studies "
        f"({summary.n_patients} patients), {summary.n_labelled} labelled, {summary.n_rejected} rejected"
    )
    for reason, count in summary.rejected.items():
        click.echo(f"  rejected {reason}: {count}")
    if summary.labels_without_file:
        click.echo(f"  {summary.labels_without_file} labelled ids have no file")
    click.echo(f"wrote {output}")
