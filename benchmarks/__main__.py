"""``python -m benchmarks [--quick] [--studies N] [--out FILE.json] [--dicom-dir DIR [--labels CSV]] ...``"""

from __future__ import annotations

import argparse
import shlex
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Conversion, size, loader and training-step benchmarks of ichkit, side by side in one run. "
        "Prints a table and writes JSON; targets are reported, never asserted.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 studies, 1 repeat, one epoch per loader run, ResNet-18 at 64² for 1 step",
    )
    parser.add_argument("--studies", type=int, default=None, help="synthetic studies (default 12, quick 2)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (default 0)")
    parser.add_argument("--dicom-dir", default=None, help="benchmark this DICOM folder instead of a synthetic one")
    parser.add_argument("--labels", default=None, help="label CSV for --dicom-dir (optional)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 3, quick 1)")
    parser.add_argument(
        "--min-samples",
        type=int,
        default=None,
        help="slices per timed loader run; whole epochs are added until reached (default 2000)",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="LocalCluster sizes to convert with, comma-separated (default 1,2; '' for none)",
    )
    parser.add_argument("--train-device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="write every figure, raw repeats, ratios and targets here (JSON)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    args = parser.parse_args(argv)
    for name in ("studies", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    try:
        args.cluster_workers = tuple(int(w) for w in args.workers.split(",") if w.strip())
    except ValueError:
        parser.error("--workers must be comma-separated integers, e.g. 1,2")
    if any(w < 1 for w in args.cluster_workers):
        parser.error("--workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .suite import run

    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    run(
        quick=args.quick,
        studies=args.studies,
        out=args.out,
        repeats=args.repeats,
        dicom_dir=args.dicom_dir,
        labels_csv=args.labels,
        work=args.work,
        keep=args.keep,
        seed=args.seed,
        min_samples=args.min_samples,
        cluster_workers=args.cluster_workers,
        train_device=args.train_device,
        command=command.strip(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
