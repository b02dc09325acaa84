"""Label files (JSONL, CSV, Parquet written by pyarrow) are read into checked items, and
a file with bad rows is refused naming each one."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.predlog.labels import LabelFileError, read_labels

WANT = [("r1", [3, 1]), ("r2", [0]), ("r3", [2, 2, 2])]


def test_jsonl_csv_and_parquet_give_the_same_items(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"request_id": r, "labels": y if len(y) > 1 else y[0]})
                                                for r, y in WANT) + "\n\n")
    (tmp_path / "a.csv").write_text('request_id,labels,extra\nr1,"[3, 1]",x\nr2,0,y\nr3,2;2;2,z\n')
    pq.write_table(pa.table({"request_id": [r for r, _ in WANT], "labels": [y for _, y in WANT]}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        assert read_labels(tmp_path / name) == WANT, name


def test_a_file_with_bad_rows_is_refused_naming_each_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"request_id": "r1", "labels": [1]}\nnot json\n{"request_id": "", "labels": [1]}\n'
                 '{"request_id": "r4", "labels": [-1]}\n[1, 2]\n')
    with pytest.raises(LabelFileError) as e:
        read_labels(p)
    lines = e.value.problems
    assert len(lines) == 4 and lines[0].startswith("bad.jsonl: line 2: not JSON")
    assert "line 3: request_id" in lines[1] and "line 4: labels" in lines[2] and "line 5: must be an object" in lines[3]


@pytest.mark.parametrize("name, content, match", [
    ("x.txt", "a", "unknown label file type '.txt'"),
    ("h.csv", "id,label\nr1,1\n", r"header must name request_id and labels; missing \['labels', 'request_id'\]"),
    ("b.csv", "request_id,labels\nr1,one\n", "line 2: labels"),
    ("n.parquet", "not parquet", "not a Parquet file"),
    ("u.jsonl", b"\xff\xfe", "not UTF-8")])
def test_unreadable_files_are_label_file_errors(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LabelFileError, match=match):
        read_labels(p)
    with pytest.raises(LabelFileError, match="file not found"):
        read_labels(tmp_path / "missing.csv")
