"""ichprep.reading.labels: the Kaggle label CSV read and written, duplicates merged, bad lines named."""

from __future__ import annotations

import pandas as pd
import pytest

from ichprep.errors import LabelsError
from ichprep.reading.labels import LABELS, read_labels, write_labels


def _csv(tmp_path, rows, header="ID,Label"):
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _image(image_id, values):
    return [f"{image_id}_{name},{v}" for name, v in zip(LABELS, values)]


def test_parses_kaggle_format(tmp_path):
    path = _csv(tmp_path, _image("ID_0000000aa", [0, 0, 0, 1, 0, 1]) + _image("ID_0000000bb", [0] * 6))
    labels = read_labels(path)
    assert list(labels.columns) == list(LABELS)
    assert labels.loc["ID_0000000aa", "subarachnoid"] == 1
    assert labels.loc["ID_0000000aa", "any"] == 1
    assert labels.loc["ID_0000000bb"].sum() == 0
    assert str(labels.dtypes["any"]) == "Int8"


def test_agreeing_duplicates_are_merged(tmp_path):
    rows = _image("ID_0000000aa", [1, 0, 0, 0, 0, 1])
    path = _csv(tmp_path, rows + rows[:2])
    assert read_labels(path).loc["ID_0000000aa", "epidural"] == 1


def test_conflicting_duplicates_name_the_lines(tmp_path):
    rows = _image("ID_0000000aa", [1, 0, 0, 0, 0, 1]) + ["ID_0000000aa_epidural,0"]
    with pytest.raises(LabelsError, match=r"conflicting duplicate labels at line 2, line 8"):
        read_labels(_csv(tmp_path, rows))


@pytest.mark.parametrize(
    "row, message",
    [
        ("ID_0000000aa_lung,1", "malformed ID at line 8"),
        ("0000000aa_any,1", "malformed ID at line 8"),
        ("ID_0000000cc_any,yes", "Label is not 0 or 1 at line 8"),
        ("ID_0000000cc_any,0.5", "Label is not 0 or 1 at line 8"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, row, message):
    rows = _image("ID_0000000aa", [0] * 6) + [row]
    with pytest.raises(LabelsError, match=message):
        read_labels(_csv(tmp_path, rows))


def test_bad_header(tmp_path):
    with pytest.raises(LabelsError, match="header must be 'ID,Label'"):
        read_labels(_csv(tmp_path, ["a,b"], header="Image,Value"))


def test_missing_file(tmp_path):
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "nope.csv")


def test_round_trip(tmp_path):
    path = _csv(tmp_path, _image("ID_0000000aa", [0, 1, 0, 0, 0, 1]))
    labels = read_labels(path)
    out = tmp_path / "out.csv"
    write_labels(labels, out)
    pd.testing.assert_frame_equal(read_labels(out), labels)
    assert out.read_text().splitlines()[1] == "ID_0000000aa_epidural,0"
