"""Study-level labels (``convert --study-labels CSV``): parsing the CSV and joining it onto studies.parquet.

Archives other than Kaggle's (CQ500, a hospital's export) label whole studies, not slices.  Two CSV forms:

(a) **label columns**: a key column and any of the six RSNA names (``epidural``, ``intraparenchymal``,
    ``intraventricular``, ``subarachnoid``, ``subdural``, ``any``) or the CQ500/CT-ICH short names
    (``ICH``=any, ``IPH``, ``IVH``, ``SDH``, ``EDH``, ``SAH``), case-insensitive.  A missing ``any``
    (column or cell) is the maximum of the subtypes given; ``any`` 0 with a subtype 1 is an error.
(b) **reader columns**, as CQ500's ``reads.csv``: ``R1:ICH, R1:IPH, ..., R3:SAH`` (other findings such as
    ``R1:Fracture`` are ignored).  Readers are combined per label by a rule (:data:`READER_RULES`):

    - ``majority``: positive when at least half of the readers who gave a value say 1 (2 of 3; with an
      even count a tie, 1 of 2 or 2 of 4, counts as **positive**: the screening-side choice);
    - ``any``: positive when any reader says 1;
    - a reader's name (``R2``): that reader alone.

    Each reader's own values are kept as ``<reader>:<label>`` columns (``R1:intraparenchymal``).
    When a CSV has both forms, the label columns are the labels and the reader columns are only kept.

Values are 0 or 1, an empty cell is unknown (NA); anything else, conflicting duplicate keys, and
inconsistent ``any`` are :class:`~ichprep.errors.LabelsError` naming the CSV lines.

**Matching** (:func:`match_study_labels`): a CSV key is compared with each study's ``study_uid``, its
``patient_id`` (both exactly, after stripping blanks), and the top folder of its files relative to the
SOURCE, normalised by :func:`folder_key`: lower case, an archive suffix (``.zip``, ``.tar.gz``...)
dropped, a folder that repeats one word (``CQ500CT12 CQ500CT12``) taken once, then everything but
letters and digits dropped -- so ``CQ500-CT-12``, ``CQ500-CT-12.zip`` and ``CQ500CT12 CQ500CT12`` all
become ``cq500ct12``.  The rule that matches the most CSV keys wins (ties: the order above).  Slice-derived
labels win over the CSV; a study where they disagree is listed in ``StudyMatch.conflicts``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import LabelsError, SourceError
from .labels import LABELS, SUBTYPES
from .source import read_csv

logger = logging.getLogger(__name__)

#: Ways to combine reader columns; a reader's own name (``R2``) is accepted as well.
READER_RULES: tuple[str, ...] = ("majority", "any")
#: ``StudyLabels.rule`` when the CSV has label columns (reader columns, if any, are not combined).
COLUMNS_RULE = "columns"
#: The matching rules of :func:`match_study_labels`, in the order they are tried (and ties go).
MATCH_RULES: tuple[str, ...] = ("study_uid", "patient_id", "folder")

#: CQ500 / CT-ICH abbreviations for the RSNA label names.
SHORT_NAMES: dict[str, str] = {
    "ich": "any",
    "iph": "intraparenchymal",
    "ivh": "intraventricular",
    "sdh": "subdural",
    "edh": "epidural",
    "sah": "subarachnoid",
}
#: Column names taken as the key when none is given, in order of preference (compared by :func:`_squash`).
KEY_CANDIDATES: tuple[str, ...] = (
    "name",
    "StudyInstanceUID",
    "study_uid",
    "PatientID",
    "patient_id",
    "study",
    "study_id",
    "AccessionNumber",
    "patient",
    "PatientNumber",
    "case",
    "case_id",
    "folder",
    "id",
)

_READER_COLUMN = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*?)\s*:\s*(.+?)\s*$")
_ARCHIVE_SUFFIX = re.compile(r"\.(zip|tar|tar\.gz|tgz|tar\.bz2|tar\.xz|7z)$")
_SHOWN = 5  # lines or values quoted in a message


class KeyLine(NamedTuple):
    """A CSV key and the line of its (first) row."""

    key: str
    line: int


@dataclass(frozen=True)
class StudyLabels:
    """A parsed study-label CSV.

    ``table``: index = key (str); the six LABELS (Int8, NA where unknown), then ``<reader>:<label>`` Int8
    columns when the CSV has reader columns.  ``lines``: the CSV line of each key's first row.
    ``rule``: ``majority``, ``any``, a reader name, or ``columns`` (the CSV's own label columns).
    """

    table: pd.DataFrame
    key_column: str
    readers: tuple[str, ...]
    rule: str
    lines: pd.Series
    path: str = ""

    def reader_columns(self) -> list[str]:
        return [f"{reader}:{label}" for reader in self.readers for label in LABELS]


@dataclass(frozen=True)
class StudyMatch:
    """The CSV joined onto studies.parquet's rows (see :func:`match_study_labels`)."""

    studies: pd.DataFrame
    matched_by: str
    unmatched_keys: tuple[KeyLine, ...]
    studies_without_labels: tuple[str, ...]
    #: One row per (study, label) where slice maxima and the CSV disagree: study_uid, key, label, slices, csv.
    conflicts: pd.DataFrame
    #: Keys matched by each rule tried, e.g. (("study_uid", 0), ("patient_id", 0), ("folder", 491)).
    counts: tuple[tuple[str, int], ...]


def _squash(text: str) -> str:
    """Lower case, letters and digits only: ``Study Instance UID`` and ``study_uid`` alike."""
    return re.sub(r"[^0-9a-z]", "", str(text).lower())


def folder_key(name: str) -> str:
    """A top folder, zip name or CSV key normalised for matching (module docstring): ``cq500ct12``."""
    text = str(name).strip().strip("/").split("/")[0].lower()
    text = _ARCHIVE_SUFFIX.sub("", text)
    words = text.split()
    if len(words) > 1 and len(set(words)) == 1:  # CQ500 names each study's folder twice: "CQ500CT3 CQ500CT3"
        text = words[0]
    return re.sub(r"[^0-9a-z]", "", text)


def _label_name(text: str) -> str | None:
    """The RSNA label a column (or a reader column's finding) names, if any."""
    low = text.strip().lower()
    if low in LABELS:
        return low
    return SHORT_NAMES.get(low)


def _line(index) -> int:
    """Line number in the file of a data row (header is line 1; blank lines are kept in the count)."""
    return int(index) + 2


def _fail(path: str, rows: pd.DataFrame, what: str, hint: str) -> None:
    shown = ", ".join(f"line {_line(i)}" for i in rows.index[:_SHOWN])
    more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
    first = rows.iloc[0].to_dict()
    raise LabelsError(f"{path}: {what} at {shown}{more} (first: {first}); {hint}")


def _natural(name: str) -> tuple:
    """Sort key putting R2 before R10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _read(path: str | Path) -> pd.DataFrame:
    try:
        # Strings throughout, blank lines kept: every row's index then gives its true line number.
        raw = read_csv(
            path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig", skipinitialspace=True
        )
    except SourceError as exc:
        raise LabelsError(f"study label CSV {path}: {exc}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise LabelsError(f"{path}: not a readable CSV ({exc})") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    blank = raw.fillna("").apply(lambda column: column.str.strip() == "").all(axis=1)
    return raw[~blank]


def _find_key(path: str, columns: list[str], key_column: str | None) -> str:
    if key_column is not None:
        if key_column in columns:
            return key_column
        folded = [c for c in columns if c.lower() == key_column.strip().lower()]
        if folded:
            return folded[0]
        raise LabelsError(f"{path}: no key column {key_column!r}; the columns are {', '.join(columns)}")
    by_squash = {}
    for column in columns:
        by_squash.setdefault(_squash(column), column)
    found = [by_squash[_squash(c)] for c in KEY_CANDIDATES if _squash(c) in by_squash]
    if not found:
        raise LabelsError(
            f"{path}: no key column found among {', '.join(columns)}; name one "
            f"(key_column / --study-key), e.g. one of {', '.join(KEY_CANDIDATES)}"
        )
    if len(found) > 1:
        logger.info("%s: key column %r (also candidates: %s)", path, found[0], ", ".join(found[1:]))
    return found[0]


def _values(path: str, raw: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Cells of ``columns`` (CSV name -> output name) as Int8: 0, 1, or NA for an empty cell."""
    out = {}
    bad = pd.Series(False, index=raw.index)
    for source, target in columns.items():
        text = raw[source].fillna("").str.strip()
        number = pd.to_numeric(text.where(text != ""), errors="coerce").astype("float64")
        bad |= (text != "") & ~number.isin([0, 1])
        out[target] = number
    if bad.any():
        _fail(path, raw.loc[bad], "a label is not 0 or 1", "labels must be 0, 1 or an empty cell")
    return pd.DataFrame(
        {target: pd.array(np.where(np.isnan(n), None, n), dtype="Int8") for target, n in out.items()}, index=raw.index
    )


def _complete_any(path: str, raw: pd.DataFrame, values: pd.DataFrame, who: str = "") -> pd.DataFrame:
    """All six LABELS: a missing ``any`` is the max of the subtypes given; ``any`` 0 under a subtype 1 fails."""
    values = values.reindex(columns=list(LABELS))
    subtypes = values[list(SUBTYPES)].astype("Float64").max(axis=1, skipna=True)
    values = values.astype("Int8")
    inconsistent = (values["any"] == 0) & (subtypes == 1)
    if inconsistent.fillna(False).any():
        rows = raw.loc[inconsistent.fillna(False).to_numpy()]
        _fail(
            path,
            rows,
            f"{who}any (ICH) is 0 while a subtype is 1",
            "any must be 1 when a subtype is; fix the row or leave any empty to have it computed",
        )
    values["any"] = values["any"].fillna(subtypes.round().astype("Int8"))
    return values


def _combine(per_reader: dict[str, pd.DataFrame], rule: str) -> pd.DataFrame:
    """The six LABELS from the readers' values by ``rule`` (module docstring); NA where no reader gave one."""
    if rule in per_reader:
        return per_reader[rule].copy()
    stack = np.stack([frame[list(LABELS)].to_numpy(dtype=np.float64, na_value=np.nan) for frame in per_reader.values()])
    given = (~np.isnan(stack)).sum(axis=0)
    positive = np.nansum(stack, axis=0)
    if rule == "majority":
        ties = (2 * positive == given) & (given > 0) & (positive > 0)
        if ties.any():
            logger.info("majority of readers: %d tied labels counted as positive", int(ties.sum()))
        value = (2 * positive >= given).astype(np.float64)
    else:  # "any"
        value = (positive > 0).astype(np.float64)
    value[given == 0] = np.nan
    index = next(iter(per_reader.values())).index
    return pd.DataFrame(
        {
            label: pd.array(np.where(np.isnan(value[:, i]), None, value[:, i]), dtype="Int8")
            for i, label in enumerate(LABELS)
        },
        index=index,
    )


def _check_rule(path: str, rule: str, readers: tuple[str, ...]) -> str:
    if rule in READER_RULES:
        return rule
    by_fold = {r.lower(): r for r in readers}
    if rule.strip().lower() in by_fold:
        return by_fold[rule.strip().lower()]
    valid = ", ".join((*READER_RULES, *readers))
    found = f"readers found: {', '.join(readers)}" if readers else "the CSV has no reader columns"
    raise LabelsError(f"{path}: unknown reader rule {rule!r}; use one of {valid} ({found})")


def read_study_labels(path: str | Path, *, key_column: str | None = None, readers: str = "majority") -> StudyLabels:
    """Parse a study-label CSV (either form of the module docstring) into one row per key.

    ``path``: a local file, a URL, or a CSV inside a zip (``cq500.zip::reads.csv``).
    ``key_column``: the column holding the study key; by default the first of :data:`KEY_CANDIDATES` present.
    ``readers``: how reader columns are combined: ``majority``, ``any`` or one reader's name (``R2``).

    Raises LabelsError for an unreadable CSV, no key or no label columns, values other than 0/1/empty,
    an inconsistent ``any``, conflicting duplicate keys, or an unknown rule or reader.
    """
    name = str(path)
    raw = _read(path)
    columns = list(raw.columns)
    key = _find_key(name, columns, key_column)

    label_columns: dict[str, str] = {}
    reader_columns: dict[str, dict[str, str]] = {}
    for column in columns:
        if column == key:
            continue
        label = _label_name(column)
        if label is not None:
            if label in label_columns.values():
                other = next(c for c, lab in label_columns.items() if lab == label)
                raise LabelsError(f"{name}: columns {other!r} and {column!r} both give {label!r}; keep one")
            label_columns[column] = label
            continue
        match = _READER_COLUMN.match(column)
        if match and _label_name(match.group(2)) is not None:
            reader, label = match.group(1), _label_name(match.group(2))
            mine = reader_columns.setdefault(reader, {})
            if label in mine.values():
                raise LabelsError(f"{name}: reader {reader} has two columns for {label!r}; keep one")
            mine[column] = label
    found_readers = tuple(sorted(reader_columns, key=_natural))
    rule = _check_rule(name, readers, found_readers)
    if not label_columns and not reader_columns:
        raise LabelsError(
            f"{name}: no label columns among {', '.join(columns)}; expected some of {', '.join(LABELS)} "
            f"(or {', '.join(s.upper() for s in SHORT_NAMES)}), or reader columns such as R1:ICH"
        )

    keys = raw[key].fillna("").str.strip()
    if (keys == "").any():
        _fail(name, raw[keys == ""], f"empty key ({key})", "every row needs a key")

    # Messages quote only the key and the columns read, not CQ500's 44 columns.
    used = [key, *label_columns, *(c for reader in found_readers for c in reader_columns[reader])]
    per_reader = {}
    for reader in found_readers:
        shown = raw[[key, *reader_columns[reader]]]
        per_reader[reader] = _complete_any(
            name, shown, _values(name, shown, reader_columns[reader]), who=f"reader {reader}: "
        )
    if label_columns:
        shown = raw[[key, *label_columns]]
        labels = _complete_any(name, shown, _values(name, shown, label_columns))
        if reader_columns:
            logger.info("%s: label columns used as the labels; reader columns kept, not combined", name)
        rule = COLUMNS_RULE
    else:
        labels = _combine(per_reader, rule)
    parts = [labels] + [
        frame.rename(columns=lambda label, r=reader: f"{r}:{label}") for reader, frame in per_reader.items()
    ]
    table = pd.concat(parts, axis=1)
    table.insert(0, "_key", keys)

    dup = table.duplicated("_key", keep=False)
    if dup.any():
        # Agreeing duplicates are one study listed twice; only differing label cells are an error.
        spread = table[dup].astype({c: "float64" for c in table.columns[1:]}).fillna(-1)
        differs = spread.groupby("_key").transform("nunique").gt(1).any(axis=1)
        conflicts = differs[differs].index
        if len(conflicts):
            _fail(
                name,
                raw.loc[conflicts, used],
                f"conflicting rows for one key ({key})",
                "one row per study expected; fix or drop one of the rows",
            )
        logger.info("%s: %d duplicate rows that agree were merged", name, int(table.duplicated("_key").sum()))
    first = ~table.duplicated("_key")
    lines = pd.Series([_line(i) for i in table.index[first]], index=keys[first].to_numpy(), dtype="int64")
    table = table[first].set_index("_key")
    table.index = pd.Index(table.index.astype(object), name=key)
    lines.index = table.index
    logger.info(
        "%s: %d study labels by %r (key %r, readers: %s)",
        name,
        len(table),
        rule,
        key,
        ", ".join(found_readers) or "none",
    )
    return StudyLabels(table=table, key_column=key, readers=found_readers, rule=rule, lines=lines, path=name)


def _as_keys(values, normalise: bool) -> list[str | None]:
    """Study identifiers as comparable strings; None where missing."""
    out = []
    for value in values:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            out.append(None)
            continue
        text = str(value).strip()
        text = folder_key(text) if normalise else text
        out.append(text or None)
    return out


def _folders_for(studies: pd.DataFrame, folders: pd.Series | None) -> list | None:
    if folders is None:
        return None
    if folders.index.equals(studies.index):
        return folders.tolist()
    uids = studies["study_uid"].astype(object)
    if uids.isin(folders.index).all():  # indexed by study_uid instead
        return folders.reindex(uids.to_numpy()).tolist()
    raise ValueError("folders must be indexed like studies or by study_uid")


def _preview(values, n: int = 3) -> str:
    shown = [repr(v) for v in list(dict.fromkeys(v for v in values if v is not None))[:n]]
    return ", ".join(shown) if shown else "no values"


def match_study_labels(studies: pd.DataFrame, labels: StudyLabels, *, folders: pd.Series | None = None) -> StudyMatch:
    """Join study labels onto studies.parquet's rows (matching rule: module docstring).

    ``studies``: one row per study (``study_uid``, ``patient_id``, the six LABELS from the slices).
    ``folders``: per study, the first path component of its files relative to the SOURCE (indexed like
    ``studies`` or by study_uid); without it the folder rule is not tried.

    Returns a :class:`StudyMatch`: ``studies`` is a copy whose NA labels are filled from the CSV (slice values
    kept, disagreements listed in ``conflicts``), with the ``<reader>:<label>`` columns added.  CSV keys that
    match no study are logged and returned; LabelsError only when no key matches any study, or when two
    keys with different labels match one study.
    """
    table = labels.table
    csv_keys = table.index.astype(str).tolist()
    candidates = {
        "study_uid": _as_keys(studies["study_uid"].astype(object), normalise=False),
        "patient_id": _as_keys(studies["patient_id"].astype(object), normalise=False),
    }
    folder_names = _folders_for(studies, folders)
    if folder_names is not None:
        candidates["folder"] = _as_keys(folder_names, normalise=True)

    best, best_hits, counts = None, None, []
    for rule, study_keys in candidates.items():
        lookup = [folder_key(k) for k in csv_keys] if rule == "folder" else csv_keys
        # Study row positions per (normalised) key, then each CSV key's list of study rows.
        positions: dict[str, list[int]] = {}
        for position, study_key in enumerate(study_keys):
            if study_key is not None:
                positions.setdefault(study_key, []).append(position)
        hits = {key: positions[k] for key, k in zip(csv_keys, lookup) if k in positions}
        counts.append((rule, len(hits)))
        if best_hits is None or len(hits) > len(best_hits):
            best, best_hits = rule, hits
    if not best_hits:
        shown = {"study_uid": candidates["study_uid"], "patient_id": candidates["patient_id"]}
        if folder_names is not None:
            shown["folder"] = _as_keys(folder_names, normalise=False)  # as the user knows them, not normalised
        tried = "; ".join(f"{rule} ({_preview(keys)})" for rule, keys in shown.items())
        untried = "" if folder_names is not None else "; folder not tried (no folders given)"
        raise LabelsError(
            f"{labels.path}: no key of column {labels.key_column!r} ({_preview(csv_keys)}) matches a study; "
            f"tried {tried}{untried}"
        )

    study_of: dict[int, str] = {}
    for key, rows in best_hits.items():
        for position in rows:
            other = study_of.setdefault(position, key)
            if other != key and not table.loc[[other]].reset_index(drop=True).equals(
                table.loc[[key]].reset_index(drop=True)
            ):
                raise LabelsError(
                    f"{labels.path}: keys {other!r} (line {labels.lines[other]}) and {key!r} "
                    f"(line {labels.lines[key]}) both match study {studies['study_uid'].iloc[position]} "
                    f"by {best} but differ"
                )
    several = sum(len(rows) > 1 for rows in best_hits.values())
    if several:
        logger.warning(
            "%s: %d keys match several studies by %s; each gets the key's labels", labels.path, several, best
        )

    key_per_study = [study_of.get(position) for position in range(len(studies))]
    found = table.reindex(pd.Index(key_per_study, dtype=object))
    found.index = studies.index
    out = studies.copy()
    conflict_rows = []
    uids = studies["study_uid"].astype(object)
    for label in LABELS:
        csv = found[label].astype("Int8")
        own = out[label].astype("Int8") if label in out else pd.Series(pd.NA, index=out.index, dtype="Int8")
        differ = (own.notna() & csv.notna() & (own != csv)).fillna(False)
        for position in np.flatnonzero(differ.to_numpy()):
            conflict_rows.append(
                (uids.iloc[position], key_per_study[position], label, int(own.iloc[position]), int(csv.iloc[position]))
            )
        out[label] = own.fillna(csv)  # slice-derived maxima win where they exist
    for column in labels.reader_columns():
        out[column] = found[column].astype("Int8")
    conflicts = pd.DataFrame(conflict_rows, columns=["study_uid", "key", "label", "slices", "csv"])
    if len(conflicts):
        logger.warning(
            "%s: %d studies whose slice labels disagree with the CSV (slice labels kept), e.g. %s",
            labels.path,
            conflicts["study_uid"].nunique(),
            ", ".join(map(str, conflicts["study_uid"].unique()[:_SHOWN])),
        )

    unmatched = tuple(KeyLine(key, int(labels.lines[key])) for key in csv_keys if key not in best_hits)
    if unmatched:
        logger.warning(
            "%s: %d keys match no study by %s: %s",
            labels.path,
            len(unmatched),
            best,
            ", ".join(f"{u.key} (line {u.line})" for u in unmatched[:_SHOWN]),
        )
    without = tuple(str(uids.iloc[p]) for p in range(len(studies)) if key_per_study[p] is None)
    if without:
        logger.info("%s: %d studies have no CSV row", labels.path, len(without))
    logger.info("%s: %d of %d keys matched by %s", labels.path, len(best_hits), len(csv_keys), best)
    return StudyMatch(
        studies=out,
        matched_by=best,
        unmatched_keys=unmatched,
        studies_without_labels=without,
        conflicts=conflicts,
        counts=tuple(counts),
    )
