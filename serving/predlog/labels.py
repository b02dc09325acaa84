"""Label files from a warehouse: the one reader of JSONL, CSV and Parquet label exports,
and their import into a prediction log (`graceful labels import CONFIG FILE`).

Every format holds one labelled request per row: `request_id` (the id the router
answered with) and `labels` (one class id per row of that request):

- `.jsonl` / `.ndjson`: `{"request_id": "...", "labels": [3, 1]}` per line (`labels: 3`
  for a one-row request);
- `.csv`: a header with `request_id` and `labels`; labels as `3`, `3 1`, `3;1`, `3|1`
  or `[3, 1]`;
- `.parquet`: columns `request_id` (string) and `labels` (integer or list of integers).

The whole file is checked before anything joins: a file with bad rows is refused with
each problem named by line (or row), and nothing in the log changes.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from serving.core import MAX_CLASS_ID
from serving.predlog.base import OUTCOMES, PredictionLog

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# Problems listed before the reader stops looking for more.
MAX_PROBLEMS = 20
_SEP = re.compile(r"[\s;|,]+")


class LabelFileError(ValueError):
    """A label file that cannot be imported; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _labels(v: Any) -> Optional[list[int]]:
    """Class ids from a cell: an int, a list of ints, or a string of them; None if not."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                v = json.loads(s)
            except json.JSONDecodeError:
                return None
        else:
            parts = [p for p in _SEP.split(s) if p]
            if not parts or not all(p.isdigit() for p in parts):
                return None
            v = [int(p) for p in parts]
    if hasattr(v, "tolist"):  # numpy / arrow values
        v = v.tolist()
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v:
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_CLASS_ID for x in v):
        return None
    return [int(x) for x in v]


def _check(rows: Iterable[tuple], name: str) -> list[tuple[str, list[int]]]:
    """(where, request id, labels cell[, error]) rows -> checked (request id, labels) items."""
    out, problems = [], []
    for where, rid, cell, *error in rows:
        if error:
            problems.append(f"{name}: {where}: {error[0]}")
        elif not isinstance(rid, str) or not rid or len(rid) > 256:
            problems.append(f"{name}: {where}: request_id: must be a non-empty string of at most 256 characters")
        else:
            labels = _labels(cell)
            if labels is None:
                problems.append(f"{name}: {where}: labels: must be class ids (integers from 0 to {MAX_CLASS_ID}), "
                                f"got {str(cell)[:60]!r}")
            else:
                out.append((rid, labels))
        if len(problems) >= MAX_PROBLEMS:
            problems.append(f"{name}: (stopped after {MAX_PROBLEMS} problems)")
            break
    if problems:
        raise LabelFileError(problems)
    return out


def _jsonl(path: Path) -> Iterable[tuple[str, Any, Any]]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {i}", None, None, f"not JSON ({e.msg})"
                continue
            if not isinstance(obj, dict):
                yield f"line {i}", None, None, "must be an object with request_id and labels"
                continue
            yield f"line {i}", obj.get("request_id"), obj.get("labels")


def _csv(path: Path) -> Iterable[tuple[str, Any, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"request_id", "labels"} - set(reader.fieldnames or ())
        if missing:
            raise LabelFileError([f"{path.name}: line 1: header must name request_id and labels; missing "
                                  f"{sorted(missing)} (has {reader.fieldnames or []})"])
        for i, row in enumerate(reader, 2):
            yield f"line {i}", row.get("request_id"), row.get("labels")


def _parquet(path: Path) -> Iterable[tuple[str, Any, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # arrow raises its own types for a file that is not Parquet
        raise LabelFileError([f"{path.name}: not a Parquet file ({type(e).__name__}: {e})"]) from None
    names = set(pf.schema_arrow.names)
    missing = {"request_id", "labels"} - names
    if missing:
        raise LabelFileError([f"{path.name}: columns must include request_id and labels; missing {sorted(missing)} "
                              f"(has {sorted(names)})"])
    row = 0
    for batch in pf.iter_batches(columns=["request_id", "labels"], batch_size=65536):
        for rid, cell in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            row += 1
            yield f"row {row}", rid, cell


def read_labels(path: "str | Path") -> list[tuple[str, list[int]]]:
    """Every (request id, labels) of a label file, checked; LabelFileError otherwise."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LabelFileError([f"{path.name}: unknown label file type {path.suffix or '(none)'!r}; "
                              f"known: {', '.join(sorted(FORMATS))}"])
    if not path.is_file():
        raise LabelFileError([f"{path}: file not found"])
    try:
        rows = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[fmt](path)
        return _check(rows, path.name)
    except UnicodeDecodeError as e:
        raise LabelFileError([f"{path.name}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except csv.Error as e:
        raise LabelFileError([f"{path.name}: not valid CSV ({e})"]) from None


@dataclass
class ImportSummary:
    rows: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {o: 0 for o in OUTCOMES})
    labelled_samples: int = 0
    seconds: float = 0.0

    @property
    def labels_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "outcomes": dict(self.outcomes), "joined": self.outcomes["joined"],
                "labelled_samples": self.labelled_samples, "seconds": round(self.seconds, 3),
                "labels_per_s": round(self.labels_per_s, 1)}


def import_labels(log: PredictionLog, items: list[tuple[str, list[int]]], batch_size: int = 5000,
                  progress: Optional[Callable[[ImportSummary], None]] = None) -> ImportSummary:
    """Join `items` into `log` in batches (each request once: repeats count as duplicates),
    calling `progress` after each batch."""
    summary = ImportSummary()
    t0 = time.perf_counter()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        results = log.join(chunk)
        for r, (_, labels) in zip(results, chunk):
            summary.outcomes[r.outcome.value] += 1
            if r.outcome.value == "joined":
                summary.labelled_samples += len(labels)
        summary.rows += len(results)
        summary.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(summary)
    summary.seconds = time.perf_counter() - t0
    return summary
