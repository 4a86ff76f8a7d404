"""``ichprep`` command line: thin click commands that call one library function each."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click
from tqdm import tqdm

from .cluster import MIN_FILES_FOR_CLUSTER
from .errors import IchprepError
from .reading.studylabels import READER_RULES
from .spec import COMPRESSORS
from .synthlayouts import LAYOUTS

logger = logging.getLogger("ichprep")


def _new_bar(total: int | None, unit: str, desc: str) -> tqdm:
    """A progress bar on stderr; silent when stderr is not a terminal."""
    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, disable=None, file=sys.stderr)


@contextmanager
def _bar(total: int | None, unit: str, desc: str):
    """A tqdm bar whose ``update`` is the library's ``progress`` callback."""
    with _new_bar(total, unit, desc) as bar:
        yield bar.update


@contextmanager
def _bars():
    """A ``progress(stage, total)`` factory for the library: one bar per stage, all closed on exit."""
    units = {"scan": "file", "convert": "slice"}
    with ExitStack() as stack:
        yield lambda stage, total: stack.enter_context(_new_bar(total, units.get(stage, "item"), stage)).update


class StoreParam(click.ParamType):
    """A store: a local folder (checked to exist when ``exists``) or an fsspec URL such as s3://bucket/cache.zarr."""

    name = "STORE"

    def __init__(self, exists: bool = True):
        self.exists = exists

    def convert(self, value, param, ctx):
        from .storage.location import is_url

        if is_url(value):
            return str(value)
        path = Path(value)
        if self.exists and not path.is_dir():
            self.fail(f"store {value!r} is not a folder (or an s3://... URL)", param, ctx)
        if path.exists() and not path.is_dir():
            self.fail(f"{value!r} is a file, not a store folder", param, ctx)
        return str(path)


class SourceParam(click.ParamType):
    """A DICOM source: a folder, a zip (ZIP or ZIP::FOLDER) or an fsspec URL; checked to exist, passed on as text."""

    name = "SOURCE"

    def convert(self, value, param, ctx):
        from .reading.source import parse_source

        try:
            return str(parse_source(value))
        except IchprepError as exc:
            self.fail(str(exc), param, ctx)


SOURCE_HELP = (
    "SOURCE is a folder (its *.dcm files, the members of its *.zip files, e.g. CQ500's one zip per study, and "
    "its *.nii/*.nii.gz volumes), a zip file (rsna.zip, or a folder inside it: "
    "rsna.zip::rsna-intracranial-hemorrhage-detection/stage_2_train) or a URL (s3://bucket/stage_2_train/)."
)
LABELS_HELP = (
    "Slice-label CSV: Kaggle's (ID,Label) or CT-ICH's per-slice form (PatientNumber,SliceNumber,...): a file, "
    "a URL, or a CSV inside the zip (rsna.zip::top/stage_2_train.csv)."
)


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
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="kaggle",
    show_default=True,
    help="kaggle: the RSNA 2019 download. hospital: CQ500-style studies, several series each (thin, thick, "
    "bone, contrast, scouts, dose screens; tilts, repeated positions, gaps), reads.csv and the archive's "
    "truth (series_truth.csv, study_truth.csv). nifti: PhysioNet CT-ICH-style ct_scans/NNN.nii, masks/ "
    "and hemorrhage_diagnosis_raw_ct.csv.",
)
@click.option("--studies", type=click.IntRange(min=1), default=20, show_default=True, help="Number of studies.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option(
    "--lesion-rate",
    type=click.FloatRange(0, 1),
    default=0.4,
    show_default=True,
    help="Chance that a study has hemorrhage (real archive ~0.41).",
)
@click.option(
    "--min-lesion-pixels",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Lesion cross-sections smaller than this (pixels at 512²) are neither drawn nor labelled; "
    "raise it (e.g. 600) for an easy set whose labels are all visible at low resolution.",
)
@click.option(
    "--test-studies",
    type=click.IntRange(min=0),
    default=None,
    help="kaggle: extra studies of other patients, unlabelled, in stage_2_test/ and listed in "
    "stage_2_sample_submission.csv; the train files stay the same bytes "
    "[default: 0, with --zip studies // 5 (at least 1)].",
)
@click.option(
    "--zip",
    "as_zip",
    is_flag=True,
    help="kaggle: OUT is a new zip file (e.g. rsna.zip) laid out like the Kaggle download: "
    "rsna-intracranial-hemorrhage-detection/ with both DICOM folders and both CSVs. "
    "hospital: one zip per study, OUT/CQ500-CT-<N>.zip, as CQ500 ships.",
)
@click.option(
    "--zip-method",
    type=click.Choice(["deflated", "stored"]),
    default="deflated",
    show_default=True,
    help="kaggle: compression of the zip members (Kaggle's zip is deflated).",
)
@click.option(
    "--partial-volume",
    is_flag=True,
    help="kaggle: show each lesion on its first and last slice at a random share (0-1) of its contrast, as a "
    "5 mm slice through a bleed's edge averages blood with brain; those slices stay labelled, as readers who "
    "scroll through a study label them. Stage-1 errors then sit where the neighbouring slices can mend them.",
)
@click.option(
    "--size",
    type=click.IntRange(64, 1024),
    default=None,
    help="hospital, nifti: rows and columns of the axial images (even); the head keeps its size in mm [default: 512].",
)
@click.option("--nii-gz", is_flag=True, help="nifti: write .nii.gz volumes instead of .nii.")
def synth(
    out: Path,
    layout: str,
    studies: int,
    seed: int,
    lesion_rate: float,
    min_lesion_pixels: int,
    test_studies: int | None,
    as_zip: bool,
    zip_method: str,
    partial_volume: bool,
    size: int | None,
    nii_gz: bool,
) -> None:
    """Write a synthetic head-CT archive to OUT, laid out as --layout.

    kaggle: OUT is a folder (stage_2_train/ + stage_2_train.csv, and with --test-studies stage_2_test/ +
    stage_2_sample_submission.csv), or with --zip a zip file holding all four under
    rsna-intracranial-hemorrhage-detection/, whose DICOMs are then the source
    OUT::rsna-intracranial-hemorrhage-detection/stage_2_train.

    hospital: OUT/CQ500CT<N> CQ500CT<N>/Unknown Study/CT <description>/CT000000.dcm ... (or with --zip
    OUT/CQ500-CT-<N>.zip), OUT/reads.csv, OUT/series_truth.csv, OUT/study_truth.csv.

    nifti: OUT/ct_scans/049.nii ..., OUT/masks/049.nii ..., OUT/hemorrhage_diagnosis_raw_ct.csv.
    """
    _refuse_other_layouts(layout)
    if layout == "kaggle":
        _synth_kaggle(
            out, studies, seed, lesion_rate, min_lesion_pixels, test_studies, as_zip, zip_method, partial_volume
        )
    elif layout == "hospital":
        _synth_hospital(out, studies, seed, lesion_rate, min_lesion_pixels, as_zip, size)
    else:
        _synth_nifti(out, studies, seed, lesion_rate, min_lesion_pixels, nii_gz, size)


# Options that mean something for some layouts only: flag, those layouts, a hint for the others.
_LAYOUT_OPTIONS = {
    "test_studies": ("--test-studies", ("kaggle",), ""),
    "zip_method": ("--zip-method", ("kaggle",), ""),
    "partial_volume": ("--partial-volume", ("kaggle",), ""),
    "as_zip": ("--zip", ("kaggle", "hospital"), "; for compressed NIfTI volumes give --nii-gz"),
    "size": ("--size", ("hospital", "nifti"), ""),
    "nii_gz": ("--nii-gz", ("nifti",), ""),
}


def _refuse_other_layouts(layout: str) -> None:
    """A layout-specific option given for another layout is an error, not silently dropped."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    for name, (flag, layouts, hint) in _LAYOUT_OPTIONS.items():
        given = ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
        if given and layout not in layouts:
            raise click.UsageError(f"{flag} applies to --layout {' or '.join(layouts)} only, not {layout}{hint}")


def _synth_kaggle(out, studies, seed, lesion_rate, min_lesion_pixels, test_studies, as_zip, zip_method, partial_volume):
    from .synth import generate

    with _bar(None, "slice", "synth") as progress:
        try:
            summary = generate(
                out,
                studies=studies,
                seed=seed,
                progress=progress,
                lesion_rate=lesion_rate,
                min_lesion_pixels=min_lesion_pixels,
                test_studies=test_studies,
                as_zip=as_zip,
                zip_method=zip_method,
                partial_volume=partial_volume,
            )
        except (ValueError, OSError) as exc:
            _fail(exc)
    click.echo(
        f"wrote {summary.n_slices} slices of {summary.n_studies} studies ({summary.n_patients} patients, "
        f"{summary.n_positive_slices} positive slices) to {summary.dicom_dir}\nlabels: {summary.labels_csv}"
    )
    if summary.test_dir is not None:
        click.echo(
            f"test: {summary.n_test_slices} slices of {summary.n_test_studies} studies "
            f"({summary.n_test_patients} patients, unlabelled) in {summary.test_dir}\n"
            f"sample submission: {summary.sample_submission}"
        )
    if summary.zip_path is not None:
        click.echo(f"zip: {summary.zip_path} ({summary.zip_path.stat().st_size} bytes, {zip_method})")
    for quirk, ids in summary.quirks.items():
        click.echo(f"  quirk {quirk}: {len(ids)} slice(s)")


def _synth_hospital(out, studies, seed, lesion_rate, min_lesion_pixels, as_zip, size):
    from .synthlayouts import REFERENCE_SIZE, generate_hospital

    with _bar(None, "file", "synth") as progress:
        try:
            summary = generate_hospital(
                out,
                studies,
                seed,
                as_zip=as_zip,
                size=size or REFERENCE_SIZE,
                lesion_rate=lesion_rate,
                min_lesion_pixels=min_lesion_pixels,
                progress=progress,
            )
        except (ValueError, OSError) as exc:
            _fail(exc)
    where = "one zip per study" if as_zip else "one folder per study"
    click.echo(
        f"wrote {summary.n_files} files in {summary.n_series} series of {summary.n_studies} studies "
        f"({summary.n_positive_studies} with hemorrhage, {summary.n_thin_only} thin-only) to {out}, {where}"
    )
    click.echo("  series: " + ", ".join(f"{kind} {n}" for kind, n in summary.kinds.items()))
    click.echo(f"reads: {summary.reads_csv}\ntruth: {summary.series_truth_csv}, {summary.study_truth_csv}")


def _synth_nifti(out, studies, seed, lesion_rate, min_lesion_pixels, nii_gz, size):
    from .synthlayouts import CT_DIR, MASK_DIR, REFERENCE_SIZE, generate_nifti

    with _bar(None, "slice", "synth") as progress:
        try:
            summary = generate_nifti(
                out,
                studies,
                seed,
                gz=nii_gz,
                size=size or REFERENCE_SIZE,
                lesion_rate=lesion_rate,
                min_lesion_pixels=min_lesion_pixels,
                progress=progress,
            )
        except (ValueError, OSError) as exc:
            _fail(exc)
    click.echo(
        f"wrote {summary.n_slices} slices of {summary.n_volumes} volumes ({summary.n_positive_slices} positive "
        f"slices) to {out / CT_DIR}, masks in {out / MASK_DIR}\nlabels: {summary.labels_csv}"
    )
    if summary.scaled or summary.reversed:
        click.echo(
            f"  scaled (scl_inter -1024): {', '.join(summary.scaled) or '-'}; "
            f"slices top down: {', '.join(summary.reversed) or '-'}"
        )


def cluster_options(command):
    """--workers / --scheduler, shared by every command that runs on Dask."""
    command = click.option(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="Address of an existing Dask scheduler (tcp://host:8786) instead of a local cluster.",
    )(command)
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Worker processes of a local Dask cluster [default: one per core, and no cluster for fewer than "
        f"{MIN_FILES_FOR_CLUSTER} files, where starting one costs more than it saves].",
    )(command)


def limit_options(command):
    """--max-file-mb / --max-volume-mb / --max-ratio (:class:`ichprep.reading.limits.ReadLimits`), for every
    command that reads a SOURCE."""
    from .reading.limits import MIB, ReadLimits

    default = ReadLimits()
    for flag, value, text in (
        ("--max-ratio", default.max_ratio, "A member of 2 MiB or more declaring more inflated bytes per stored byte"),
        ("--max-volume-mb", default.max_volume_bytes // MIB, "A NIfTI volume whose voxels take more MiB"),
        ("--max-file-mb", default.max_file_bytes // MIB, "A DICOM file, zip member or object of more MiB"),
    ):
        command = click.option(
            flag,
            type=click.FloatRange(min=1, min_open=flag == "--max-ratio"),
            default=value,
            show_default=True,
            help=f"{text} is rejected unread (a hostile or damaged archive).",
        )(command)
    return command


def _limited(dicom_dir: str, max_file_mb: float, max_volume_mb: float, max_ratio: float):
    """The SOURCE with the limits its options give."""
    from .reading.limits import ReadLimits
    from .reading.source import parse_source

    limits = ReadLimits.from_mib(max_file_mb=max_file_mb, max_volume_mb=max_volume_mb, max_ratio=max_ratio)
    return parse_source(dicom_dir, limits)


def _cluster(workers: int | None, scheduler: str | None):
    """The Dask client of --workers / --scheduler (a context manager); both at once is a usage error."""
    from .cluster import OnDemand

    if workers and scheduler:
        raise click.UsageError("give --workers or --scheduler, not both")
    return OnDemand(workers, scheduler)


@main.command(epilog=SOURCE_HELP)
@click.argument("dicom_dir", metavar="SOURCE", type=SourceParam())
@click.option("--labels", "labels_csv", metavar="CSV", help=LABELS_HELP)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Parquet file to write, e.g. slices.parquet.",
)
@cluster_options
@limit_options
def scan(
    dicom_dir: str, labels_csv: str | None, output: Path, workers: int | None, scheduler: str | None, **limits
) -> None:
    """Read every DICOM header of SOURCE in parallel and write one Parquet row per file."""
    from .reading.scan import scan as run_scan
    from .reading.scan import write_scan

    cluster = _cluster(workers, scheduler)  # starts nothing until entered
    try:
        source = _limited(dicom_dir, **limits)
        with cluster as client, _bars() as progress:
            table, summary = run_scan(source, labels_csv, client=client, progress=progress)
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


@main.command(epilog=SOURCE_HELP)
@click.argument("dicom_dir", metavar="SOURCE", type=SourceParam())
@click.option("--labels", "labels_csv", metavar="CSV", help=LABELS_HELP)
@click.option(
    "-o",
    "--output",
    "store",
    type=StoreParam(exists=False),
    required=True,
    help="Zarr store to write: a folder (cache.zarr) or an object-store URL (s3://bucket/cache.zarr).",
)
@click.option(
    "--scan",
    "scan_parquet",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Use this `ichprep scan` table instead of scanning headers again.",
)
@click.option(
    "--size",
    type=click.IntRange(16, 2048),
    default=256,
    show_default=True,
    help="Side of the square cached image, pixels.",
)
@click.option(
    "--window",
    "windows",
    multiple=True,
    metavar="NAME|NAME:CENTER:WIDTH",
    help="A channel: preset brain, subdural, soft, bone, or a custom window. Repeat for each channel "
    "[default: brain, subdural, soft].",
)
@click.option(
    "--shard-slices",
    type=click.IntRange(1, 4096),
    default=64,
    show_default=True,
    help="Slices per shard file (the unit of writing and of streaming).",
)
@click.option("--compressor", type=click.Choice(COMPRESSORS), default=COMPRESSORS[0], show_default=True)
@click.option(
    "--compression-level",
    type=click.IntRange(1, 22),
    default=1,
    show_default=True,
    help="zstd level (1-22) or blosc clevel (1-9); 1 measured smallest-and-fastest on CT slices.",
)
@cluster_options
@click.option("--overwrite", is_flag=True, help="Replace a store made with other inputs or options.")
@click.option("--overwrite-any", is_flag=True, help="Replace the output folder even where it is not an ichprep store.")
@click.option(
    "--manifest-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the manifest here, e.g. data_manifests/rsna-256.json.",
)
@click.option(
    "--pseudonymize-key",
    envvar="ICHPREP_PSEUDONYMIZE_KEY",
    metavar="KEY",
    default=None,
    help="Replace patient/study/series/image ids and file paths in the store by HMAC-SHA256 "
    "pseudonyms under KEY (>= 16 characters; also read from $ICHPREP_PSEUDONYMIZE_KEY, "
    "which keeps it out of the process list).",
)
@click.option(
    "--series",
    "series_mode",
    default="auto",
    show_default=True,
    metavar="auto|all|FILE",
    help="Which series of each study to keep: auto, the one a 5 mm non-contrast soft-tissue model reads (the "
    "rule: README, 'Archives other than Kaggle's'); all, every eligible series as its own run; or FILE, a "
    "list of SeriesInstanceUIDs, one per line. Every decision is in STORE/series.parquet.",
)
@click.option(
    "--slab-mm",
    "slab",
    default="auto",
    show_default=True,
    metavar="auto|off|MM",
    help="Average a thin series' HU over consecutive slices into slabs: auto slabs a series under 3 mm to 5 mm "
    "(a Kaggle archive never), MM slabs every kept series thinner than MM, off never.",
)
@click.option(
    "--soft-kernel",
    "soft_kernels",
    multiple=True,
    metavar="NAME",
    help="A ConvolutionKernel of your scanners to count as soft tissue (repeat; adds to the built-in list).",
)
@click.option(
    "--sharp-kernel",
    "sharp_kernels",
    multiple=True,
    metavar="NAME",
    help="A ConvolutionKernel to count as bone/lung (repeat; adds to the built-in list).",
)
@click.option(
    "--study-labels",
    "study_labels_csv",
    metavar="CSV",
    help="Study-level labels: a key column and label columns (any, IPH, SDH, ...) or reader columns like CQ500's "
    "reads.csv (R1:ICH, R2:IPH, ...), matched against StudyInstanceUID, PatientID or the top folder name; written "
    "to studies.parquet.",
)
@click.option(
    "--volume-ids",
    "volume_ids_csv",
    metavar="CSV",
    help="NIfTI volumes' study (and patient) ids: a CSV volume,study[,patient] [default: the file names].",
)
@click.option("--study-key", metavar="COLUMN", default=None, help="The study-labels CSV's key column [default: found].")
@click.option(
    "--readers",
    default="majority",
    show_default=True,
    metavar="|".join(READER_RULES) + "|READER",
    help="How reader columns combine: majority (2 of 3), any, or one reader's name (R1).",
)
@limit_options
def convert(
    dicom_dir,
    labels_csv,
    store,
    scan_parquet,
    size,
    windows,
    shard_slices,
    compressor,
    compression_level,
    workers,
    scheduler,
    overwrite,
    overwrite_any,
    manifest_out,
    pseudonymize_key,
    series_mode,
    slab,
    soft_kernels,
    sharp_kernels,
    study_labels_csv,
    study_key,
    readers,
    volume_ids_csv,
    **limits,
) -> None:
    """Convert every DICOM slice of SOURCE into one sharded Zarr v3 store.

    Per study the store holds the series --series chooses, each along its slice normal; thin series
    become 5 mm slabs (--slab-mm).  Rerunning the same command after an interruption resumes:
    completed shards are verified and skipped.
    """
    from .convert import convert as run_convert
    from .reading.nifti import read_volume_ids
    from .reading.scan import read_scan
    from .reading.series import SERIES_MODES, SeriesRule, read_series_list
    from .reading.slabs import parse_slab
    from .reading.studylabels import read_study_labels
    from .report import format_bytes
    from .spec import PreprocessSpec
    from .windows import parse_windows

    cluster = _cluster(workers, scheduler)  # starts nothing until entered
    try:
        spec = PreprocessSpec(
            windows=parse_windows(windows),
            size=size,
            shard_slices=shard_slices,
            compressor=compressor,
            compression_level=compression_level,
        )
        scan_table = read_scan(scan_parquet) if scan_parquet else None
        series = series_mode if series_mode in SERIES_MODES else read_series_list(series_mode)
        rule = SeriesRule().extended(soft=soft_kernels, sharp=sharp_kernels)
        study_labels = (
            read_study_labels(study_labels_csv, key_column=study_key, readers=readers) if study_labels_csv else None
        )
        volume_ids = read_volume_ids(volume_ids_csv) if volume_ids_csv else None
        source = _limited(dicom_dir, **limits)
        with cluster as client, _bars() as progress:
            summary = run_convert(
                source,
                store,
                spec,
                labels_csv=labels_csv,
                scan_table=scan_table,
                client=client,
                overwrite=overwrite,
                overwrite_any=overwrite_any,
                progress=progress,
                pseudonymize_key=pseudonymize_key,
                manifest_out=manifest_out,
                series=series,
                series_rule=rule,
                slab=parse_slab(slab),
                study_labels=study_labels,
                volume_ids=volume_ids,
            )
    except (IchprepError, OSError, ValueError) as exc:
        _fail(exc)
    click.echo(f"wrote {summary.store}")
    click.echo(
        f"  slices written   {summary.n_slices} in {summary.n_studies} studies, {summary.n_shards} shards"
        + (f" ({summary.shards_skipped} already done, verified and skipped)" if summary.shards_skipped else "")
    )
    click.echo(
        f"  rejected         {summary.n_rejected}"
        + "".join(f"\n    {reason}: {count}" for reason, count in summary.rejected.items())
    )
    _echo_series(summary)
    click.echo(f"  wall time        {summary.wall_s:.1f} s ({summary.slices_per_s:.0f} slices/s)")
    click.echo(
        f"  size on disk     {format_bytes(summary.store_bytes)} = {summary.ratio:.3f} x the source files "
        f"({format_bytes(summary.source_bytes)})"
    )
    if manifest_out:
        click.echo(f"  manifest also written to {manifest_out}")
    if summary.n_rejected:
        click.echo(
            f"completed with {summary.n_rejected} rejected (listed with reasons in {summary.store}/rejected.csv)"
        )
    else:
        click.echo("completed, nothing rejected")


def _echo_series(summary) -> None:
    """The series decisions, where there were any to make (more than one series in some study, or slabs)."""
    left_out = {reason: n for reason, n in summary.series.items() if reason != "kept"}
    if left_out or summary.n_slabs:
        click.echo(
            f"  series kept      {summary.series.get('kept', 0)}; left out {sum(left_out.values())} "
            "(every decision in series.parquet)"
            + "".join(f"\n    {reason}: {count}" for reason, count in left_out.items())
        )
    if summary.n_slabs:
        click.echo(f"  slabs            {summary.n_slabs} slabs of thin slices (members in slabs.parquet)")
    if summary.id_rule != "file_name":
        click.echo("  image ids        SOPInstanceUIDs (file names repeat across series)")
    if summary.study_labels is not None:
        unmatched = summary.study_labels_unmatched
        shown = ", ".join(f"{k.key!r} (line {k.line})" for k in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        click.echo(
            f"  study labels     matched by {summary.study_labels}"
            + (f"; {len(unmatched)} CSV keys match no study: {shown}" if unmatched else "")
        )


@main.command()
@click.argument("store", type=StoreParam())
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Check against this manifest (e.g. data_manifests/NAME.json) instead of STORE/manifest.json.",
)
def verify(store: Path, manifest_path: Path | None) -> None:
    """Recompute every checksum of STORE and check its tables; exit 1 listing every problem."""
    from .report import format_bytes
    from .storage.manifest import verify_store

    try:
        report = verify_store(store, manifest_path)
    except IchprepError as exc:
        _fail(exc)
    if report.ok:
        click.echo(f"OK: {report.files_checked} files, {format_bytes(report.bytes_checked)} match the manifest")
        return
    click.echo(f"FAILED: {len(report.problems)} problem(s) in {store}", err=True)
    for problem in report.problems:
        click.echo(f"  {problem}", err=True)
    raise SystemExit(1)


@main.command()
@click.argument("store", type=StoreParam())
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def info(store: Path, as_json: bool) -> None:
    """Spec, counts, label prevalence and size on disk of STORE; exit 1 where its files do not match its manifest."""
    import json

    from .errors import repair_hint
    from .report import format_info, store_info

    try:
        details = store_info(store)
    except (IchprepError, ValueError) as exc:
        _fail(exc)
    click.echo(json.dumps(details, indent=2) if as_json else format_info(details))
    if details["problems"]:
        raise click.ClickException(
            f"{len(details['problems'])} file(s) of {store} do not match its manifest (listed above); "
            f"to repair: {repair_hint(store)}"
        )


@main.command()
@click.argument("store", type=StoreParam())
@click.option("--study", default=None, metavar="UID", help="Show all slices of this StudyInstanceUID.")
@click.option(
    "--slot",
    "--index",
    "slot",
    type=click.IntRange(min=0),
    default=None,
    metavar="SLOT",
    help="Show the study of this slot (a row of the store), the slot highlighted.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write.")
@click.option(
    "--max-slices", type=click.IntRange(min=1), default=40, show_default=True, help="Subsample longer studies evenly."
)
def show(store: Path, study: str | None, slot: int | None, output: Path, max_slices: int) -> None:
    """Write a montage of a study's cached slices (a panel per window, labels as captions)."""
    from .report import save_montage

    if (study is None) == (slot is None):
        raise click.UsageError("give exactly one of --study UID or --slot SLOT")
    try:
        path = save_montage(store, output, study=study, slot=slot, max_slices=max_slices)
    except (IchprepError, ValueError) as exc:
        _fail(exc)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("store", type=StoreParam())
@click.argument("dest", type=StoreParam(exists=False))
@click.option(
    "--studies",
    "studies_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Only these studies: a text file with one StudyInstanceUID per line.",
)
@click.option(
    "--shard-slices",
    type=click.IntRange(1, 4096),
    default=None,
    help="Re-shard to this many slices per shard [default: as the source].",
)
@click.option("--overwrite", is_flag=True, help="Replace DEST where it is an ichprep store.")
@click.option("--overwrite-any", is_flag=True, help="Replace DEST whatever it holds.")
def export(
    store: Path, dest: Path, studies_file: Path | None, shard_slices: int | None, overwrite: bool, overwrite_any: bool
) -> None:
    """Copy STORE, or a subset of its studies, to DEST as a store with its own manifest."""
    from .storage.export import export_store, read_study_list

    try:
        studies = read_study_list(studies_file) if studies_file else None
        with _bar(None, "slice", "export") as progress:
            summary = export_store(store, dest, studies, shard_slices, overwrite, progress, overwrite_any)
    except (IchprepError, OSError) as exc:
        _fail(exc)
    how = "copied byte for byte" if summary.copied_verbatim else f"re-sharded into {summary.n_shards} shards"
    click.echo(
        f"exported {summary.n_studies} studies ({summary.n_slices} slices) to {dest}, {how}; "
        f"check it with: ichprep verify {dest}"
    )


@main.command()
@click.argument("store", type=StoreParam())
@click.option(
    "--manifest-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the restated manifest here, e.g. over data_manifests/NAME.json.",
)
def upgrade(store: Path, manifest_out: Path | None) -> None:
    """Bring STORE to the current store format by rewriting its metadata (shards are left byte for byte)."""
    from .storage.upgrade import upgrade_store

    try:
        summary = upgrade_store(store, manifest_out)
    except (IchprepError, OSError) as exc:
        _fail(exc)
    if not summary.rewritten:
        click.echo(f"{store} is already store format {summary.to_version}; nothing to do")
        return
    click.echo(
        f"upgraded {store} from store format {summary.from_version} to {summary.to_version}: rewrote "
        f"{', '.join(summary.rewritten)}; shards untouched; check it with: ichprep verify {store}"
    )
    from .storage.store import MANIFEST

    if MANIFEST in summary.rewritten and manifest_out is None:
        click.echo(
            "the manifest changed: replace any published copy of it (e.g. data_manifests/NAME.json) "
            f"with {store}/{MANIFEST}"
        )
