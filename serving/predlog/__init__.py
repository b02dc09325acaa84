"""The prediction log: answered requests' predictions, joined with labels later.

    base    the one interface (`PredictionLog`), join rules, the batched writer
    memory  in the router's memory, bounded by bytes (tests; one replica)
    sqlite  a WAL file under the run directory (the default; replicas on one node)
    redis   Redis or Valkey (replicas across nodes)

`open_log(spec)` opens the store `serving.prediction_log` names.
"""

from __future__ import annotations

from serving.predlog.base import OUTCOMES, JoinOutcome, JoinResult, PredictionLog

__all__ = ["open_log", "PredictionLog", "JoinOutcome", "JoinResult", "OUTCOMES", "LogConfigError"]


class LogConfigError(ValueError):
    """The serving spec does not say enough to open its prediction log."""


def open_log(spec) -> PredictionLog:
    """The prediction log of a `serving.specs.ServingSpec`."""
    kind = spec.prediction_log
    if kind == "memory":
        from serving.predlog.memory import MemoryLog

        return MemoryLog(spec.prediction_retention_s, spec.prediction_log_max_bytes)
    if kind == "sqlite":
        from serving.predlog.sqlite import SqliteLog

        if not spec.prediction_log_path:
            raise LogConfigError("serving.prediction_log_path: required for the sqlite log (a run config "
                                 "sets it to <run_dir>/predictions.sqlite)")
        return SqliteLog(spec.prediction_log_path, spec.prediction_retention_s, spec.prediction_log_max_bytes)
    if kind == "redis":
        from serving.predlog.redis import RedisLog

        url = spec.resolved_redis_url()
        if not url:
            raise LogConfigError(f"serving.redis_url: required for the redis log (or set {spec.redis_url_env})")
        return RedisLog(url, spec.prediction_retention_s, spec.prediction_log_max_bytes, prefix=spec.redis_prefix)
    raise LogConfigError(f"serving.prediction_log: unknown store {kind!r}")
