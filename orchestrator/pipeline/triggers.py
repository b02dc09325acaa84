"""Generations the pipeline makes besides the listed ones: one per data snapshot, or one
per schedule slot, each from `pipeline.template`.

`effective_config(cfg, reg)` is the config with those generations appended, in a stable
order (listed ones first, then snapshots by modification time and name, then schedule
slots by time): every restart rebuilds the same list, and the names are stable (from the
file, or the slot), so the registry's records keep meaning the same generation. The first
time a snapshot is taken it is recorded in the audit log with its path and sha256: the
lineage says what data each generation saw.
"""

from __future__ import annotations

import glob
import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from orchestrator.config import RunConfig
from orchestrator.registry import Registry
from serving.index import sha256_file
from workers.specs import GenerationSpec

SUBJECT = "pipeline"
_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def generation_name(template: str, stem: str) -> str:
    """A valid, stable generation name from `template` ("{stem}" replaced).

    >>> generation_name("snap-{stem}", "2026-12-07 batch#3")
    'snap-2026-12-07-batch-3'
    """
    name = _BAD.sub("-", template.replace("{stem}", stem)).strip("-.") or "snapshot"
    if not name[0].isalnum():
        name = "s" + name
    return name[:64]


def _substitute(obj: Any, path: str) -> Any:
    if isinstance(obj, str):
        return obj.replace("{snapshot}", path)
    if isinstance(obj, dict):
        return {k: _substitute(v, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, path) for v in obj]
    return obj


def snapshot_files(cfg: RunConfig, now: Optional[float] = None) -> list[Path]:
    """Files matching the snapshot pattern that have settled, oldest first (then by name)."""
    spec = cfg.pipeline.snapshots
    if spec is None:
        return []
    now = time.time() if now is None else now
    out = []
    for f in glob.glob(spec.pattern, recursive=True):
        p = Path(f)
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file() and now - st.st_mtime >= spec.settle_seconds:
            out.append((st.st_mtime_ns, p.name, p.resolve()))
    return [p for _, _, p in sorted(out)]


def _snapshot_generations(cfg: RunConfig, reg: Optional[Registry], taken: set[str],
                          record: bool) -> list[GenerationSpec]:
    spec = cfg.pipeline.snapshots
    known = {g.name for g in cfg.generations}
    recorded = {e.data.get("path"): e.data.get("generation")
                for e in (reg.events(SUBJECT, actions=("pipeline_snapshot",)) if reg is not None else [])}
    out = []
    for path in snapshot_files(cfg):
        name = recorded.get(str(path)) or generation_name(spec.name, path.stem)
        if name in known or name in taken:
            continue  # a listed generation, or two files with one name: the first keeps it
        data = _substitute(spec.data or {"source": "npz", "path": "{snapshot}"}, str(path))
        gen = GenerationSpec.model_validate({**cfg.pipeline.template, "name": name, "train_data": data})
        if record and reg is not None and str(path) not in recorded:
            reg.audit("pipeline", "pipeline_snapshot", SUBJECT, f"{path} -> generation {name}",
                      data={"path": str(path), "sha256": sha256_file(path), "generation": name,
                            "train_data": json.loads(json.dumps(data))})
        taken.add(name)
        out.append(gen)
    return out


def _schedule_generations(cfg: RunConfig, reg: Optional[Registry], taken: set[str], record: bool,
                          now: Optional[float] = None) -> list[GenerationSpec]:
    every = cfg.pipeline.schedule_seconds
    if every is None or reg is None:
        return []
    now = time.time() if now is None else now
    start = next((e.data.get("start") for e in reg.events(SUBJECT, actions=("pipeline_schedule",))), None)
    if start is None:
        if not record:
            return []
        start = int(now // every) * every
        reg.audit("pipeline", "pipeline_schedule", SUBJECT, f"a generation every {every:g} s from {start:.0f}",
                  data={"start": start, "every": every})
    out = []
    slot = float(start)
    while slot <= now:
        name = generation_name(cfg.pipeline.schedule_prefix + "{stem}",
                               time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(slot)))
        if name not in taken and name not in {g.name for g in cfg.generations}:
            out.append(GenerationSpec.model_validate({**cfg.pipeline.template, "name": name}))
            taken.add(name)
        slot += every
    return out


def effective_config(cfg: RunConfig, reg: Optional[Registry] = None, record: bool = False) -> RunConfig:
    """`cfg` with the generations its triggers made so far appended (see the module doc).
    `record` (the pipeline itself): new snapshots and the schedule's start are written to
    the audit log; otherwise (status) nothing is written and the schedule counts only from
    a recorded start."""
    if cfg.pipeline.template is None:
        return cfg
    taken: set[str] = set()
    extra = _snapshot_generations(cfg, reg, taken, record) + _schedule_generations(cfg, reg, taken, record)
    if not extra:
        return cfg
    return cfg.model_copy(update={"generations": [*cfg.generations, *extra]})


def next_trigger(cfg: RunConfig) -> Optional[str]:
    """What makes the next generation, for `graceful status`."""
    parts = []
    if cfg.pipeline.snapshots is not None:
        parts.append(f"a new file matching {cfg.pipeline.snapshots.pattern}")
    if cfg.pipeline.schedule_seconds is not None:
        every = cfg.pipeline.schedule_seconds
        nxt = (int(time.time() // every) + 1) * every
        parts.append(f"the schedule at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(nxt))}")
    return " or ".join(parts) or None
