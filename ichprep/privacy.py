"""Pseudonymisation: keyed hashes in place of identifiers, so a cache can leave the institution.

``--pseudonymize-key KEY`` replaces every patient, study, series and image
identifier, and every source file path, in the tables and the manifest by an
HMAC-SHA256 of the value under KEY.  The same key gives the same pseudonyms
(stores made with one key can be joined, reruns resume); without the key the
originals cannot be recovered or confirmed by hashing guesses.  Error texts
that quote an identifier or path are rewritten the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import re

import pandas as pd

from .reading.source import DICOM_SUFFIX

#: Column -> pseudonym prefix.  The prefix keeps pseudonyms readable ("which kind of id is this?").
ID_COLUMNS = {"patient_id": "P", "study_uid": "S", "series_uid": "SE", "image_id": "ID", "sop_uid": "SOP"}
_DIGITS = 20  # 80 bits of HMAC: no collisions at archive scale, short enough to read


def pseudonym(key: str, kind: str, value: str) -> str:
    digest = hmac.new(key.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}_{digest[:_DIGITS]}"


def check_key(key: str) -> str:
    if len(key) < 16:
        raise ValueError(
            "--pseudonymize-key must be at least 16 characters (it is the only secret protecting "
            "the identifiers); generate one with: python -c 'import secrets; print(secrets.token_hex(16))'"
        )
    return key


def pseudonymize_scan(table: pd.DataFrame, key: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """A scan table with identifiers, paths and error texts replaced by keyed pseudonyms, and the map used.

    ``path`` becomes ``<pseudonymous image id>.dcm``; ``abs_path`` (the converter's own column, never
    written to the store) is kept so the pixels can still be read.  The map (original -> pseudonym)
    lets later free text (errors raised while decoding) be scrubbed with :func:`scrub`.
    """
    check_key(key)
    table = table.copy()
    originals: dict[str, str] = {}
    for column, kind in ID_COLUMNS.items():
        if column not in table:
            continue
        values = table[column].astype("string")
        mapping = {v: pseudonym(key, kind, v) for v in values.dropna().unique()}
        originals.update(mapping)
        table[column] = values.map(mapping).astype("string")
    new_paths = table["image_id"].astype("string") + DICOM_SUFFIX
    for column in ("path", "abs_path"):
        if column in table:
            originals.update({str(p): str(n) for p, n in zip(table[column], new_paths) if pd.notna(p)})
    table["path"] = new_paths
    if "error" in table and originals:
        table["error"] = scrub(table["error"], originals)
    return table, originals


def scrub(texts: pd.Series, originals: dict[str, str]) -> pd.Series:
    """Replace every original identifier or path quoted in free text by its pseudonym (longest first)."""
    pattern = re.compile("|".join(re.escape(o) for o in sorted(originals, key=len, reverse=True)))
    return (
        texts.astype("string")
        .map(lambda t: pattern.sub(lambda m: originals[m.group(0)], t), na_action="ignore")
        .astype("string")
    )
