"""The Kaggle label CSV (``stage_2_train.csv``): parsing and validation.

Format: header ``ID,Label`` and six rows per image, ``ID_<hex>_<subtype>``
with Label 0 or 1.  Duplicate rows that agree are tolerated (the real file
has a few); conflicting duplicates, malformed ids and bad values are
rejected with a message naming the CSV line.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
    """Parse a label CSV into one row per image: index ``image_id``, six nullable Int8 columns.

    ``path``: a local file, a URL, or a CSV inside a zip (``rsna.zip::top/stage_2_train.csv``).

    Images with some but not all six labels get <NA> for the missing ones.
    """
    try:
        # Arrow strings: the ID regex then runs in pyarrow, not once per row in Python (4.5M rows in RSNA).
        raw = read_csv(path, dtype=pd.ArrowDtype(pa.string()), keep_default_na=False)
    except SourceError as exc:
        raise LabelsError(f"label CSV {path}: {exc}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise LabelsError(f"{path}: not a readable CSV ({exc})") from exc
    if list(raw.columns) != ["ID", "Label"]:
        raise LabelsError(f"{path}: header must be 'ID,Label' (Kaggle format), got {','.join(raw.columns)!r}")

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


def write_labels(labels: pd.DataFrame, path: str | Path) -> None:
    """Write one-row-per-image labels back to Kaggle's long format."""
    rows = [
        (f"{image_id}_{name}", int(value))
        for image_id, values in labels[list(LABELS)].iterrows()
        for name, value in values.items()
        if not pd.isna(value)
    ]
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
