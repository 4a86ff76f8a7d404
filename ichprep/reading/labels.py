"""The Kaggle label CSV (``stage_2_train.csv``): parsing and validation.

Format: header ``ID,Label`` and six rows per image, ``ID_<hex>_<subtype>``
with Label 0 or 1.  Duplicate rows that agree are tolerated (the real file
has a few); conflicting duplicates, malformed ids and bad values are
rejected with a message naming the CSV line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import LabelsError, SourceError
from .source import read_csv

logger = logging.getLogger(__name__)

SUBTYPES: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
#: The six label columns, in Kaggle's row order (``any`` last).
LABELS: tuple[str, ...] = SUBTYPES + ("any",)

_ID_PATTERN = r"^(?P<image_id>ID_[0-9A-Za-z]+)_(?P<subtype>" + "|".join(LABELS) + r")$"


def _line(index) -> int:
    """Line number in the file of a data row (header is line 1)."""
    return int(index) + 2


def _fail(path: Path, rows: pd.DataFrame, what: str, hint: str) -> None:
    first = rows.index[0]
    shown = ", ".join(f"line {_line(i)}" for i in rows.index[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise LabelsError(f"{path}: {what} at {shown}{more} (first: {rows.loc[first].to_dict()}); {hint}")


def read_labels(path: str | Path) -> pd.DataFrame:
    """Parse a slice-label CSV (Kaggle's, or CT-ICH's per-slice form) into one row per image.

    Index ``image_id``, six nullable Int8 columns.

    ``path``: a local file, a URL, or a CSV inside a zip (``rsna.zip::top/stage_2_train.csv``).

    Images with some but not all six labels get <NA> for the missing ones.
    """
    raw = _read_raw(path)
    if is_ctich_csv(raw.columns):
        return _ctich_labels(path, raw)
    if list(raw.columns) != ["ID", "Label"]:
        raise LabelsError(
            f"{path}: header must be 'ID,Label' (Kaggle format) or CT-ICH's "
            f"'{','.join(CTICH_COLUMNS)}', got {','.join(raw.columns)!r}"
        )

    parts = raw["ID"].str.strip().str.extract(_ID_PATTERN)
    bad_id = parts["image_id"].isna()
    if bad_id.any():
        _fail(path, raw[bad_id], "malformed ID", f"expected ID_<hex>_<subtype> with subtype one of {', '.join(LABELS)}")
    value = pd.to_numeric(raw["Label"].str.strip(), errors="coerce").astype("float64")  # NaN, not NA, for junk
    bad_value = ~value.isin([0, 1])
    if bad_value.any():
        _fail(path, raw[bad_value], "Label is not 0 or 1", "labels must be 0 or 1")

    long = pd.DataFrame({"image_id": parts["image_id"], "subtype": parts["subtype"], "label": value.astype("int8")})
    key = ["image_id", "subtype"]
    dup = long.duplicated(key, keep=False)
    if dup.any():
        spread = long[dup].groupby(key)["label"].transform("nunique")
        conflicts = long[dup][spread > 1]
        if len(conflicts):
            _fail(
                path,
                conflicts,
                "conflicting duplicate labels",
                "each ID must have one label; fix or drop one of the rows",
            )
        logger.info(
            "%s: %d duplicate rows that agree were merged",
            path,
            int(dup.sum() - long[dup].drop_duplicates(key).shape[0]),
        )
        long = long.drop_duplicates(key)

    wide = long.pivot(index="image_id", columns="subtype", values="label")
    wide = wide.reindex(columns=list(LABELS)).astype("Int8")
    wide.columns.name = None
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        logger.warning("%s: %d images lack some of the six labels (kept as missing)", path, int(incomplete.sum()))
    wide.index = wide.index.astype(object)
    return wide.sort_index()


#: CT-ICH's subtype columns, by the RSNA label each one is.
CTICH_SUBTYPES: dict[str, str] = {  # in the order of the file's columns
    "Intraventricular": "intraventricular",
    "Intraparenchymal": "intraparenchymal",
    "Subarachnoid": "subarachnoid",
    "Epidural": "epidural",
    "Subdural": "subdural",
}
_CTICH_KEYS = ("PatientNumber", "SliceNumber")
_CTICH_NONE = "No_Hemorrhage"
#: Columns every CT-ICH label CSV has (``Fracture_Yes_No`` may follow; it is not an RSNA label).
CTICH_COLUMNS: tuple[str, ...] = (*_CTICH_KEYS, *CTICH_SUBTYPES, _CTICH_NONE)


def is_ctich_csv(columns: Iterable[str]) -> bool:
    """Whether a CSV header is CT-ICH's per-slice form (rather than Kaggle's ``ID,Label``)."""
    return set(CTICH_COLUMNS) <= {str(c).strip() for c in columns}


def read_ctich_labels(path: str | Path) -> pd.DataFrame:
    """Parse CT-ICH's ``hemorrhage_diagnosis_raw_ct.csv`` into one row per slice.

    Index ``image_id`` = ``<PatientNumber:03d>_<SliceNumber:03d>`` (the image id
    :func:`ichprep.reading.nifti.scan_volume` gives slices of ``<PatientNumber:03d>.nii``), the six RSNA
    label columns as nullable Int8, ``any`` the largest subtype.  ``path``: a local file, a URL, or ``ZIP::PATH``.

    Raises LabelsError naming the CSV line(s): missing columns, values other than 0/1, slice numbers
    that are not positive integers, No_Hemorrhage contradicting the subtypes, and conflicting duplicate
    rows (duplicates that agree are merged).
    """
    return _ctich_labels(path, _read_raw(path))


def _read_raw(path: str | Path) -> pd.DataFrame:
    """A label CSV as text cells; a CSV that does not read is a LabelsError naming it."""
    try:
        # Arrow strings: the ID regex then runs in pyarrow, not once per row in Python (4.5M rows in RSNA).
        return read_csv(path, dtype=pd.ArrowDtype(pa.string()), keep_default_na=False)
    except SourceError as exc:
        raise LabelsError(f"label CSV {path}: {exc}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise LabelsError(f"{path}: not a readable CSV ({exc})") from exc


def _ctich_labels(path: str | Path, raw: pd.DataFrame) -> pd.DataFrame:
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in CTICH_COLUMNS if c not in raw.columns]
    if missing:
        raise LabelsError(
            f"{path}: not a CT-ICH label CSV: missing column(s) {', '.join(missing)} "
            f"(expected {','.join(CTICH_COLUMNS)}[,Fracture_Yes_No])"
        )
    raw = raw[list(CTICH_COLUMNS)].apply(lambda column: column.str.strip())
    numbers = raw.apply(lambda column: pd.to_numeric(column, errors="coerce")).astype("float64")  # NaN for junk

    for name in _CTICH_KEYS:
        value = numbers[name]
        low = 1 if name == "SliceNumber" else 0
        bad = ~((value == value.round()) & (value >= low))
        if bad.any():
            _fail(path, raw[bad], f"{name} is not an integer >= {low}", f"{name} must be an integer >= {low}")
    flags = [*CTICH_SUBTYPES, _CTICH_NONE]
    bad = ~numbers[flags].isin([0, 1]).all(axis=1)
    if bad.any():
        _fail(path, raw[bad], "a label is not 0 or 1", f"{', '.join(flags)} must be 0 or 1")

    labels = numbers[list(CTICH_SUBTYPES)].astype("int8").rename(columns=CTICH_SUBTYPES)
    labels["any"] = labels.max(axis=1)
    contradicts = numbers[_CTICH_NONE].astype("int8") == labels["any"]  # No_Hemorrhage must be 1 - any
    if contradicts.any():
        _fail(
            path,
            raw[contradicts],
            "No_Hemorrhage contradicts the subtype columns",
            "No_Hemorrhage must be 1 exactly where no subtype is 1",
        )
    patient = numbers["PatientNumber"].astype("int64")
    slice_number = numbers["SliceNumber"].astype("int64")
    labels.index = [f"{p:03d}_{s:03d}" for p, s in zip(patient, slice_number)]
    labels.index.name = "image_id"

    dup = labels.index.duplicated(keep=False)
    if dup.any():
        spread = labels[dup].groupby(level=0).transform("nunique").max(axis=1)
        conflicting = np.flatnonzero(dup)[spread.to_numpy() > 1]
        if len(conflicting):
            _fail(
                path,
                raw.iloc[conflicting],
                "conflicting duplicate rows for one (PatientNumber, SliceNumber)",
                "each slice must have one set of labels; fix or drop one of the rows",
            )
        merged = labels[~labels.index.duplicated(keep="first")]
        logger.info("%s: %d duplicate rows that agree were merged", path, len(labels) - len(merged))
        labels = merged

    labels = labels[list(LABELS)].astype("Int8")
    labels.index = labels.index.astype(object)
    return labels.sort_index()


def write_labels(labels: pd.DataFrame, path: str | Path) -> None:
    """Write one-row-per-image labels back to Kaggle's long format."""
    rows = [
        (f"{image_id}_{name}", int(value))
        for image_id, values in labels[list(LABELS)].iterrows()
        for name, value in values.items()
        if not pd.isna(value)
    ]
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
