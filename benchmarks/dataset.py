"""The benchmark's input: a synthetic RSNA-style archive made here, or a DICOM folder given on the command line."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ichprep.synth import generate


@dataclass(frozen=True)
class Dataset:
    dicom_dir: Path
    labels_csv: Path | None
    source: str  # "synthetic" or "folder"
    studies: int | None  # synthetic only
    seed: int | None
    synth_s: float | None  # time to generate it (not a benchmark figure)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "dicom_dir": str(self.dicom_dir),
            "labels_csv": str(self.labels_csv) if self.labels_csv else None,
            "studies_requested": self.studies,
            "seed": self.seed,
            "synth_s": self.synth_s,
        }


def prepare(
    work: Path, studies: int, seed: int = 0, dicom_dir: str | Path | None = None, labels_csv: str | Path | None = None
) -> Dataset:
    if dicom_dir is not None:
        dicom_dir = Path(dicom_dir)
        if not dicom_dir.is_dir():
            raise SystemExit(f"--dicom-dir {dicom_dir} is not a folder")
        return Dataset(dicom_dir, Path(labels_csv) if labels_csv else None, "folder", None, None, None)
    out = work / "data"
    marker = out / "bench-synth.json"
    wanted = {"studies": studies, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:  # --work DIR reused with the same data
        return Dataset(out / "stage_2_train", out / "stage_2_train.csv", "synthetic", studies, seed, None)
    if out.exists():
        if not marker.is_file():
            raise SystemExit(f"{out} exists and was not made by the benchmark; choose another --work folder")
        shutil.rmtree(out)
    started = time.perf_counter()
    # The real archive's lesion rate; lesions and labels do not change any speed figure.
    summary = generate(out, studies=studies, seed=seed)
    marker.write_text(json.dumps(wanted) + "\n")
    return Dataset(
        summary.dicom_dir, summary.labels_csv, "synthetic", studies, seed, round(time.perf_counter() - started, 3)
    )
