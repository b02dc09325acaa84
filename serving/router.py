"""The router ingress: split, shadow, prediction log, feedback join, retrieval, admin.

Every answered request's predictions go to the prediction log (`serving.predlog`), with
a request id the router mints; labels join there, and the live counters behind
`/v1/status` are kept there too. With a shared log (sqlite on one node, redis across
nodes) several router replicas answer, join and count as one: their traffic plan and
attached generations are a state document in the log, which every replica follows
(`_sync_state`). Model generations are separate Serve applications reached through
deployment handles; the router attaches and detaches them at run time. The traffic plan
is an immutable value swapped in one assignment, so a change never drops or splits a
request in flight.
"""


import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from dataclasses import asdict
from typing import Any, Callable, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import metrics as serve_metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.core import (USER_HEADER, BadRequest, GenerationCounters, Latencies, TrafficPlan, as_shape, fuse, is_npy,
                          merge_latency, parse_feedback, parse_feedback_batch, parse_inputs, parse_json_object,
                          parse_npy, parse_user_id)
from serving.local import LocalGeneration
from serving.metric_names import DEFINED, LATENCY_BUCKETS_MS, LOG_GAUGE_COUNTERS
from serving.predlog import JoinOutcome, open_log
from serving.catalogue import Catalogue, CatalogueError, load_catalogue, read_manifest
from serving.refs import ModelRef
from serving.specs import ServingSpec

log = logging.getLogger("graceful.router")

# No `from __future__ import annotations` here: Serve's class-based view reads the
# handlers' annotations at run time and would take a string "Request" for a query param.
app = FastAPI(title="graceful router", docs_url=None, redoc_url=None, openapi_url=None)

_TIMEOUT, _ERROR = "timeout", "error"
# Background work of a replica, in seconds: follow the shared state, report itself (its
# latency windows) to the log, re-set the Prometheus gauges.
STATE_POLL_S, HEARTBEAT_S, GAUGES_S = 1.0, 2.0, 5.0
# A replica silent for longer is left out of /v1/status.
REPLICA_STALE_S = 15.0
# An answer waits this long at most for its log row's commit (prediction_log_sync).
LOG_WAIT_S = 5.0
# What the shared state records of each generation: enough for another replica to reach
# it (its app) or load it (its checkpoint).
_GEN_FIELDS = ("app", "sha256", "uri", "factory")


def _request_id() -> str:
    # The Serve proxy already puts this id in the X-Request-ID response header.
    try:
        rid = serve.context._get_serve_request_context().request_id
    except Exception:  # outside a request context (handle calls)
        rid = ""
    return rid or uuid.uuid4().hex


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status,
                    media_type="application/json")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # Unknown routes and wrong methods get the same JSON error shape as everything else.
    return _json({"error": str(exc.detail), "request_id": _request_id()}, exc.status_code)


def _make_metrics() -> dict[str, Any]:
    out = {}
    for name, (kind, tags, doc) in DEFINED.items():
        if kind == "counter":
            out[name] = serve_metrics.Counter(name, description=doc, tag_keys=tags)
        elif kind == "gauge":
            out[name] = serve_metrics.Gauge(name, description=doc, tag_keys=tags)
        else:
            out[name] = serve_metrics.Histogram(name, description=doc, boundaries=LATENCY_BUCKETS_MS,
                                                tag_keys=tags)
    return out


# A feed cursor: the log's epoch (hex microseconds) "." the store's position: an integer
# (memory, sqlite) or a Redis stream id; empty before the first flag.
_CURSOR = re.compile(r"^(?P<tag>[0-9a-f]{1,16})\.(?P<pos>(?:[0-9]{1,18}(?:-[0-9]{1,18})?)?)$")


def counters_of(raw: dict[str, int]) -> dict[str, int]:
    """Every `GenerationCounters` field of a generation, 0 where the log has none yet."""
    return {**asdict(GenerationCounters()), **{k: v for k, v in raw.items() if k in GenerationCounters.__annotations__}}


# Defined above the class: `serve.ingress` copies the class with the globals it has then.
@serve.ingress(app)
class Router:
    """Ingress of the serving plane. Construct through `serving.deploy.start_serving`."""

    def __init__(self, spec: dict, input_shape: "tuple[int, ...] | list[int] | int", production: str,
                 generations: dict[str, dict],
                 weights: dict[str, float], shadows: list[str], catalogue: Optional[str],
                 admin_token: Optional[str], plan_source: Optional[Callable[[list], dict]] = None,
                 feedback_token: Optional[str] = None, deployment_id: Optional[str] = None):
        self.spec = spec
        # Production's `model.input_shape`: every request's rows, and every attached generation.
        self.input_shape = as_shape(input_shape)
        self.input_dim = math.prod(self.input_shape)  # legacy: values per row
        self.admin_token = admin_token
        self.feedback_token = feedback_token
        self.fusion_weight = spec.get("fusion_weight")
        self.shadow_timeout_s = spec["shadow_timeout_s"]
        self.started = time.time()
        self.replica = uuid.uuid4().hex[:12]
        # Minted when the application is built (serving.deploy.router_application): every
        # replica of one deployment, restarted or not, shares it. A log's state left by an
        # earlier deployment (a previous `graceful serve` over the same run dir) is not ours.
        self.deployment_id = deployment_id or uuid.uuid4().hex
        self.latency = Latencies(spec["latency_window"])
        self.log = open_log(ServingSpec.model_validate(spec))
        self.m = _make_metrics()
        self.health = {"loop_errors": 0, "state_errors": 0, "log_errors": 0, "log_waits_timed_out": 0,
                       "log_rows_lost": 0, "catalogue_errors": 0}
        self.state_error: Optional[str] = None
        self.gens: dict[str, dict] = {}  # name -> {"app", "sha256", "uri", "factory", "handle"}
        for name, info in generations.items():
            self.gens[name] = self._entry(name, info)
        # Generations other replicas attached at run time (the shared log's state) join
        # the deployed ones, so this replica can take the plan that names them.
        version, shared = self.log.read_state()
        if shared is not None and shared.get("deployment") != self.deployment_id:
            shared = None
        for name, info in ((shared or {}).get("generations") or {}).items():
            if name not in self.gens:
                try:
                    self.gens[name] = self._entry(name, info)
                except Exception as e:  # gone meanwhile: the plan below decides without it
                    log.warning("router: generation %s of the shared state cannot be attached (%s)", name, e)
        # The control plane's plan wins over the shared state and the deploy-time
        # arguments: a replica that restarts (crash, upgrade) comes back to production and
        # the rollout's position as they are now, not as they were when it was deployed.
        self.plan_source = "arguments"
        self.plan_error: Optional[str] = None
        self.plan = None
        if plan_source is not None:
            try:
                p = plan_source(list(self.gens))
                self.plan = TrafficPlan.build(p["production"], p["weights"], p["shadows"], self.gens)
                self.plan_source = "registry"
            except Exception as e:  # unreadable, or it names a generation this router does not hold
                self.plan_error = f"{type(e).__name__}: {e}"
                log.error("router: plan source failed (%s); starting with the deployed plan", self.plan_error)
        if self.plan is None and shared is not None:
            try:
                self.plan = TrafficPlan.build(shared["production"], shared["weights"], shared["shadows"], self.gens)
                self.plan_source = "shared"
            except Exception as e:
                log.warning("router: shared plan unusable (%s); starting with the deployed plan", e)
        if self.plan is None:
            self.plan = TrafficPlan.build(production, weights, shadows, self.gens)
        self._state_version = version
        self._publish_state()
        self._publish_plan()
        self._loop_task: Optional[asyncio.Task] = None
        self._background: set[asyncio.Task] = set()
        self._pending: dict[str, list] = {}  # generation -> [queued shadow copies, rows]
        self._shadow_backlog = 0  # copies admitted and not finished
        # The retrieval catalogue, read from its directory (never from these arguments),
        # verified; a replica that cannot read it does not start.
        self.catalogue_path = catalogue
        self.catalogue: Optional[Catalogue] = load_catalogue(catalogue) if catalogue else None
        self._catalogue_checked = time.monotonic()
        self._catalogue_loading = False
        try:
            self._ensure_loop()
        except RuntimeError:  # no event loop while constructing: the first request starts it
            pass

    def __del__(self):
        # Serve calls this when it stops the replica: what is queued reaches the log.
        log_ = getattr(self, "log", None)
        if log_ is not None:
            log_.close()

    # --- generations and the shared state ----------------------------------------------

    @staticmethod
    def _entry(name: str, info: dict) -> dict:
        """A generation as this replica calls it: its app's handle, or the model loaded here."""
        entry = {k: info.get(k) for k in _GEN_FIELDS}
        entry["handle"] = (serve.get_app_handle(info["app"]) if info.get("app") else
                           LocalGeneration(ModelRef(name, info["uri"], info["sha256"], info.get("factory"))))
        return entry

    def _state(self) -> dict:
        return {**self.plan.as_dict(), "deployment": self.deployment_id,
                "generations": {g: {k: e.get(k) for k in _GEN_FIELDS} for g, e in self.gens.items()}}

    def _publish_state(self) -> None:
        """Store this replica's plan and generations as the new shared state."""
        self._state_version = self.log.write_state(self._state())

    async def _sync_state(self) -> None:
        """Adopt a newer shared state (another replica's traffic change, attach or detach)."""
        version, doc = await asyncio.to_thread(self.log.read_state)
        if version <= self._state_version or doc is None or doc.get("deployment") != self.deployment_id:
            return
        gens = dict(self.gens)
        for name in [g for g in gens if g not in doc["generations"]]:
            del gens[name]
        for name, info in doc["generations"].items():
            if name not in gens or gens[name]["sha256"] != info.get("sha256"):
                gens[name] = await asyncio.to_thread(self._entry, name, info)
        plan = TrafficPlan.build(doc["production"], doc["weights"], doc["shadows"], gens)
        self.gens, self.plan, self._state_version = gens, plan, version
        self._publish_plan()

    async def _tick_state(self) -> None:
        try:
            await self._sync_state()
            self.state_error = None
        except Exception as e:  # counted and retried next tick; the current plan keeps serving
            self.health["state_errors"] += 1
            if self.state_error is None:
                log.error("router: cannot follow the shared state: %s: %s", type(e).__name__, e)
            self.state_error = f"{type(e).__name__}: {e}"

    # --- helpers ---------------------------------------------------------------------

    def _error(self, e: BadRequest, rid: str, route: str) -> Response:
        self.m["graceful_bad_requests"].inc(tags={"route": route, "status": str(e.status)})
        return _json({"error": str(e), "request_id": rid}, e.status)

    async def _body(self, request: Request) -> bytes:
        limit = self.spec["max_body_bytes"]
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise BadRequest(f"body larger than {limit} bytes", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"body larger than {limit} bytes", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _json_body(self, request: Request) -> dict:
        return parse_json_object(await self._body(request))

    async def _inputs(self, request: Request) -> tuple[np.ndarray, Optional[str], dict]:
        """(rows, user id, other fields) of a data request: a JSON object whose `inputs`
        are nested lists of shape (N, *input_shape), or an npy body of that shape
        (`Content-Type: application/x-npy`) with the user id in the `X-Graceful-User`
        header and `k` in the query string. Both are bounded by max_body_bytes and max_rows."""
        body = await self._body(request)
        if not is_npy(request.headers.get("content-type")):
            obj = parse_json_object(body)
            return parse_inputs(obj, self.input_shape, self.spec["max_rows"]), parse_user_id(obj), obj
        x = parse_npy(body, self.input_shape, self.spec["max_rows"])
        fields: dict[str, Any] = {}
        user = request.headers.get(USER_HEADER)
        if user is not None:
            fields["user_id"] = user
        k = request.query_params.get("k")
        if k is not None:
            fields["k"] = int(k) if k.isascii() and k.isdigit() and len(k) < 4 else k
        return x, parse_user_id(fields), fields

    @staticmethod
    def _check_token(request: Request, token: Optional[str], what: str) -> None:
        """401 without a bearer token, 403 with a wrong one, or when `token` is None (off)."""
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise BadRequest(f"{what} route: missing bearer token (Authorization: Bearer ...)", status=401)
        if not token or not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            raise BadRequest(f"{what} route: token refused", status=403)

    def _publish_plan(self) -> None:
        for g in self.gens:
            self.m["graceful_traffic_weight"].set(self.plan.weights.get(g, 0.0), tags={"generation": g})
            self.m["graceful_shadow_enabled"].set(1.0 if g in self.plan.shadows else 0.0, tags={"generation": g})

    def _publish_log_gauges(self) -> None:
        """The log's shared counters as gauges: every replica exports the same numbers
        (Prometheus takes `max` across replicas), including labels imported by the CLI."""
        gens, feedback = self.log.counters()
        for g, c in gens.items():
            for name in LOG_GAUGE_COUNTERS:
                self.m["graceful_log_counts"].set(float(c.get(name, 0)), tags={"generation": g, "counter": name})
        info = self.log.describe()
        for key in ("requests", "bytes", "pending", "dropped", "write_errors"):
            if isinstance(info.get(key), (int, float)):
                self.m["graceful_prediction_log"].set(float(info[key]), tags={"field": key})

    def _report(self) -> dict[str, Any]:
        """This replica's own part of the status (taken on the event loop, which mutates it)."""
        return {"started_at": self.started, "latency": self.latency.snapshot(),
                "shadows_in_flight": self._shadow_backlog, "health": dict(self.health)}

    async def _loop(self) -> None:
        """Follow the shared state, report to the log, refresh gauges. Survives a bad tick
        (counted in `loop_errors`, exported in /v1/status); never ends while serving."""
        next_beat = next_gauges = 0.0
        while True:
            await self._tick_state()
            now = time.monotonic()
            try:
                if now >= next_beat:
                    next_beat = now + HEARTBEAT_S
                    await asyncio.to_thread(self.log.heartbeat, self.replica, self._report())
                if now >= next_gauges:
                    # Gauges set once in the constructor never reached Ray's exporter
                    # (checked on Ray 2.60); re-setting them keeps them visible and current.
                    next_gauges = now + GAUGES_S
                    self._publish_plan()
                    await asyncio.to_thread(self._publish_log_gauges)
            except Exception as e:
                self.health["loop_errors"] += 1
                log.warning("router: background tick failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(STATE_POLL_S)

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    def _observe(self, gen: str, role: str, ms: float, requests: int = 1) -> None:
        """One call's latency; `requests`: the requests it answered (a coalesced shadow
        call answers several, each of which waited this long)."""
        self.latency.add(gen, role, ms)
        self._count_timed(gen, requests, ms)
        self.m["graceful_latency_ms"].observe(ms, tags={"generation": gen, "role": role})

    def _count_timed(self, gen: str, requests: int, ms: float) -> None:
        slow = self.spec.get("slow_call_ms")
        if slow is not None:  # per request, for the rollout's sequential latency test
            self.log.count(gen, timed_calls=requests, slow_calls=requests if ms > slow else 0)

    def _count_request(self, gen: str, role: str) -> None:
        self.log.count(gen, **{"requests_primary" if role == "primary" else "requests_shadow": 1})
        self.m["graceful_requests"].inc(tags={"generation": gen, "role": role})

    async def _call_shadow(self, gen: str, x: np.ndarray, requests: int = 1):
        """One mirrored call (carrying `requests` requests), bounded by the shadow
        timeout: probabilities, or a marker. A timed-out call is a slow one for the latency
        test (it took at least the timeout)."""
        entry = self.gens.get(gen)
        if entry is None:  # detached meanwhile
            return _ERROR
        t0 = time.perf_counter()
        resp = entry["handle"].predict.remote(x)
        try:
            probs = await asyncio.wait_for(resp, self.shadow_timeout_s)
        except asyncio.TimeoutError:
            resp.cancel()
            self._count_timed(gen, requests, self.shadow_timeout_s * 1000)
            return _TIMEOUT
        except Exception:
            return _ERROR
        self._observe(gen, "shadow", (time.perf_counter() - t0) * 1000, requests)
        return probs

    def _count_failure(self, gen: str, outcome: str, n: int) -> None:
        if outcome == _TIMEOUT:
            self.log.count(gen, shadow_timeouts=n)
            self.m["graceful_shadow_timeouts"].inc(n, tags={"generation": gen})
        else:
            self.log.count(gen, shadow_errors=n)
            self.m["graceful_errors"].inc(n, tags={"generation": gen, "role": "shadow"})

    def _admit_shadow(self, gen: str) -> bool:
        """Memory and CPU stay bounded when shadows fall behind: beyond the backlog cap a
        copy is skipped, and counted."""
        if self._shadow_backlog >= self.spec["shadow_max_inflight"]:
            self.log.count(gen, shadow_dropped=1)
            self.m["graceful_shadow_dropped"].inc(tags={"generation": gen})
            return False
        self._shadow_backlog += 1
        self._count_request(gen, "shadow")
        return True

    async def _production_mirror(self, prod: str, x: np.ndarray):
        out = await self._call_shadow(prod, x)
        self._shadow_backlog -= 1
        if not isinstance(out, np.ndarray):
            self._count_failure(prod, out, 1)
        return out

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until done, or it may be collected
        task.add_done_callback(self._background.discard)

    def _candidate_view(self, prod_probs: Optional[np.ndarray], probs: np.ndarray) -> np.ndarray:
        """What a candidate would answer: its own probabilities, or fused with production."""
        if self.fusion_weight is None or prod_probs is None:
            return probs
        return fuse(prod_probs, probs, self.fusion_weight)

    def _enqueue_shadow(self, gen: str, rid: str, x: np.ndarray, ref) -> None:
        """Coalesce shadow copies: one handle call per generation carries every copy queued
        within `shadow_batch_wait_s` (or `max_batch_size` rows), so a shadow costs the
        router a fraction of a handle call per request."""
        queue = self._pending.setdefault(gen, [[], 0])
        queue[0].append((rid, x, ref))
        queue[1] += len(x)
        if queue[1] >= self.spec["max_batch_size"]:
            self._flush(gen)
        elif len(queue[0]) == 1:
            asyncio.get_running_loop().call_later(self.spec["shadow_batch_wait_s"], self._flush, gen)

    def _flush(self, gen: str) -> None:
        queue = self._pending.pop(gen, None)
        if queue:
            self._spawn(self._run_shadows(gen, queue[0]))

    def _log_prediction(self, rid: str, gen: str, pred: np.ndarray) -> None:
        entry = self.gens.get(gen)
        if entry is not None:
            self.log.add_prediction(rid, gen, entry["sha256"], pred)

    async def _run_shadows(self, gen: str, items: list) -> None:
        """Send coalesced copies, then log and compare each with production (off the response path)."""
        x = items[0][1] if len(items) == 1 else np.concatenate([item[1] for item in items])
        out = await self._call_shadow(gen, x, len(items))
        self._shadow_backlog -= len(items)
        if not isinstance(out, np.ndarray):
            self._count_failure(gen, out, len(items))
            return
        start = 0
        for rid, xi, ref in items:
            probs = out[start:start + len(xi)]
            start += len(xi)
            if isinstance(ref, asyncio.Future):
                ref = await ref
            if isinstance(ref, np.ndarray):
                pred = self._candidate_view(ref, probs).argmax(1)
                self._log_prediction(rid, gen, pred)
                self._compare(gen, ref.argmax(1), pred, rid)

    async def _finish_canary(self, rid: str, prod: str, primary: str, served_pred: np.ndarray,
                             early: asyncio.Future) -> None:
        ref = await early
        if isinstance(ref, np.ndarray):
            prod_pred = ref.argmax(1)
            self._log_prediction(rid, prod, prod_pred)
            self._compare(primary, prod_pred, served_pred, rid)

    def _compare(self, gen: str, prod_pred: np.ndarray, pred: np.ndarray, rid: str) -> None:
        n_dis = int(np.sum(prod_pred != pred))
        self.log.count(gen, compared=len(pred), disagreements=n_dis)
        self.m["graceful_compared_samples"].inc(len(pred), tags={"generation": gen})
        if n_dis:
            self.m["graceful_disagreements"].inc(n_dis, tags={"generation": gen})
            self.log.mark_wanted(rid)  # only a disagreement can be a negative flip: label it

    async def _logged(self, fut) -> None:
        """Wait for a request's log row to be committed (prediction_log_sync), bounded."""
        if fut.done():
            ok = fut.result()
        else:
            try:
                # shielded: a timeout must not cancel the batch's future, which every
                # request of the batch shares and the writer thread resolves
                ok = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), LOG_WAIT_S)
            except asyncio.TimeoutError:
                self.health["log_waits_timed_out"] += 1
                return
        if not ok:
            self.health["log_rows_lost"] += 1

    # --- data routes -----------------------------------------------------------------

    @app.post("/v1/predict")
    async def predict(self, request: Request) -> Response:
        self._ensure_loop()
        try:
            x, user, _ = await self._inputs(request)
        except BadRequest as e:
            return self._error(e, _request_id(), "predict")
        # Minted here, never taken from the client: labels join by this id only, so a
        # client cannot aim its labels at (or overwrite) another request's predictions.
        rid = uuid.uuid4().hex
        plan = self.plan
        primary = plan.choose(user if user is not None else rid)
        mirrors = plan.mirrors(primary)
        prod = plan.production
        # A candidate's production copy goes out with the primary: it is the fallback
        # when the candidate fails, the fusion partner and the flip reference. Pure shadows
        # go out after the primary answered, so they never compete with it for a core.
        early = None
        if primary != prod and self._admit_shadow(prod):
            early = asyncio.get_running_loop().create_task(self._production_mirror(prod, x))
        self._count_request(primary, "primary")
        t0 = time.perf_counter()
        probs: Optional[np.ndarray] = None
        served = primary
        try:
            probs = await self.gens[primary]["handle"].predict.remote(x)
            self._observe(primary, "primary", (time.perf_counter() - t0) * 1000)
        except Exception as e:
            self.log.count(primary, errors=1)
            self.m["graceful_errors"].inc(tags={"generation": primary, "role": "primary"})
            fallback = await early if early is not None else None
            if not isinstance(fallback, np.ndarray):
                return _json({"error": f"generation {primary} failed: {type(e).__name__}", "request_id": rid}, 503)
            self.log.count(primary, fallbacks=1)
            answer, served = fallback, prod
        else:
            answer = probs
            if early is not None and self.fusion_weight is not None:
                prod_probs = await early
                if isinstance(prod_probs, np.ndarray):
                    answer = self._candidate_view(prod_probs, probs)
        self.log.count(served, samples_primary=len(x))
        pred = answer.argmax(1)
        entry = self.gens.get(served)
        logged = self.log.record(rid, prod, {served: (entry["sha256"] if entry else "", pred)})
        if early is not None and served == primary:
            self._spawn(self._finish_canary(rid, prod, primary, pred, early))
        ref = probs if primary == prod else early
        for g in mirrors:
            if g != prod and self._admit_shadow(g):
                self._enqueue_shadow(g, rid, x, ref)
        if self.spec["prediction_log_sync"]:
            await self._logged(logged)
        return _json({"request_id": rid, "generation": served, "predictions": pred.tolist(),
                      "probabilities": np.round(answer, 6).tolist()})

    def _count_joins(self, results) -> None:
        for res in results:
            self.m["graceful_feedback"].inc(tags={"outcome": res.outcome.value})
            for gen, f in res.candidates.items():
                tags = {"generation": gen}
                self.m["graceful_labelled_samples"].inc(f.labelled, tags=tags)
                if f.negative_flips:
                    self.m["graceful_negative_flips"].inc(f.negative_flips, tags=tags)
                if f.positive_flips:
                    self.m["graceful_positive_flips"].inc(f.positive_flips, tags=tags)

    async def _from_log(self, fn, *args, note: str = ""):
        """`fn(*args)` on the prediction log, off the event loop; a store that is down (a
        restart, a failover) is counted and becomes a 503 naming it, `note` saying what
        the caller should know."""
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as e:
            self.health["log_errors"] += 1
            raise BadRequest(f"prediction log unavailable{note}: {type(e).__name__}: {e}", status=503) from None

    async def _join(self, items):
        # Sending the same labels again is safe: what did join answers "duplicate" (with
        # Redis, a request marked just as the store failed may have lost its flip counts).
        return await self._from_log(self.log.join, items, note=", labels not (or not all) joined; send them again")

    @app.post("/v1/feedback")
    async def feedback(self, request: Request) -> Response:
        """Labels of one answered request: 404 when its id was never served (or is past the
        retention), 422 when not one label per row, 200 with `"outcome": "duplicate"`
        (ignored) for a request labelled before."""
        rid = _request_id()
        try:
            self._check_token(request, self.feedback_token, "feedback")
            target, labels = parse_feedback(await self._json_body(request))
            [res] = await self._join([(target, labels)])
            self._count_joins([res])
            if res.outcome is JoinOutcome.UNKNOWN:
                raise BadRequest(f"{res.detail} ({target!r})", status=404)
            if res.outcome is JoinOutcome.MISMATCHED:
                raise BadRequest(res.detail, status=422)
        except BadRequest as e:
            return self._error(e, rid, "feedback")
        return _json({"request_id": rid, "outcome": res.outcome.value,
                      "joined": None if res.outcome is JoinOutcome.DUPLICATE else target,
                      "candidates": res.as_dict()["candidates"], **({"detail": res.detail} if res.detail else {})})

    @app.post("/v1/feedback/batch")
    async def feedback_batch(self, request: Request) -> Response:
        """Labels of many requests at once: `{"items": [{"request_id", "labels"}, ...]}`.
        A malformed item refuses the whole batch (400 naming it, nothing joined); otherwise
        200 with each item's outcome and the count of each outcome."""
        rid = _request_id()
        try:
            self._check_token(request, self.feedback_token, "feedback")
            items = parse_feedback_batch(await self._json_body(request), self.spec["feedback_max_items"])
            results = await self._join(items)
        except BadRequest as e:
            return self._error(e, rid, "feedback")
        self._count_joins(results)
        counts = {o.value: 0 for o in JoinOutcome}
        for res in results:
            counts[res.outcome.value] += 1
        return _json({"request_id": rid, "outcomes": counts,
                      "results": [{"request_id": r.request_id, "outcome": r.outcome.value,
                                   **({"detail": r.detail} if r.detail else {})} for r in results]})

    @app.get("/v1/labels/wanted")
    async def labels_wanted(self, request: Request) -> Response:
        """The requests worth labelling: those on which a candidate disagreed with
        production, not labelled yet, oldest first, after the cursor `after` (the `next`
        of the previous page; none: from the oldest kept), at most `limit` (1 to
        feedback_max_items, default 1000). Feedback token."""
        rid = _request_id()
        try:
            self._check_token(request, self.feedback_token, "feedback")
            after = request.query_params.get("after", "")
            m = _CURSOR.match(after) if after else None
            if after and (m is None or ("-" in m["pos"]) != (self.log.kind == "redis" and bool(m["pos"]))):
                raise BadRequest(f"after: not a cursor from this route ({after[:40]!r})")
            raw = request.query_params.get("limit", "1000")
            if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= self.spec["feedback_max_items"]):
                raise BadRequest(f"limit: a whole number from 1 to {self.spec['feedback_max_items']}, got {raw[:20]!r}")
            # A cursor of another log (a memory log's router restarted, a new file, a Redis
            # that lost its data) starts again from the oldest flag kept.
            tag = f"{int(self.log.epoch * 1e6):x}"
            pos = m["pos"] if m is not None and m["tag"] == tag else ""
            items, pos = await self._from_log(self.log.wanted, pos, int(raw))
        except BadRequest as e:
            return self._error(e, rid, "labels_wanted")
        return _json({"request_id": rid, "items": items, "next": f"{tag}.{pos}"})

    def _named(self, obj: dict, request: Request) -> Optional[str]:
        """The generation a request names (`generation` in the JSON body, or in the query
        string of an npy body), or None: the traffic plan chooses. It must be attached
        here (a query-only edge model, a candidate, production)."""
        g = obj.get("generation", request.query_params.get("generation"))
        if g is None:
            return None
        if not isinstance(g, str) or g not in self.gens:
            raise BadRequest(f"generation: {str(g)[:64]!r} is not served here; served: {sorted(self.gens)}", status=404)
        return g

    async def _embed(self, request: Request, rid: str) -> tuple[str, np.ndarray, dict]:
        x, user, obj = await self._inputs(request)
        gen = self._named(obj, request) or self.plan.choose(user if user is not None else rid)
        try:
            emb = await self.gens[gen]["handle"].embed.remote(x)
        except Exception as e:
            self.log.count(gen, errors=1)
            self.m["graceful_errors"].inc(tags={"generation": gen, "role": "primary"})
            raise BadRequest(f"generation {gen} failed: {type(e).__name__}", status=503) from None
        return gen, emb, obj

    @app.post("/v1/embed")
    async def embed(self, request: Request) -> Response:
        rid = _request_id()
        try:
            gen, emb, _ = await self._embed(request, rid)
        except BadRequest as e:
            return self._error(e, rid, "embed")
        return _json({"request_id": rid, "generation": gen, "embeddings": np.round(emb, 6).tolist()})

    async def _refresh_catalogue(self) -> None:
        """Load a newer version of the catalogue (items added) at most every
        catalogue_refresh_s, off the event loop; a version that cannot be read leaves the
        current one serving (counted in health.catalogue_errors)."""
        now = time.monotonic()
        if self._catalogue_loading or now - self._catalogue_checked < self.spec["catalogue_refresh_s"]:
            return
        self._catalogue_checked = now
        self._catalogue_loading = True
        try:
            m = await asyncio.to_thread(read_manifest, self.catalogue_path)
            if m is not None and int(m["version"]) != self.catalogue.version:
                self.catalogue = await asyncio.to_thread(load_catalogue, self.catalogue_path)
                log.info("router: catalogue version %d loaded (%d items)", self.catalogue.version, len(self.catalogue))
        except (CatalogueError, OSError, KeyError, ValueError) as e:
            self.health["catalogue_errors"] += 1
            log.error("router: catalogue at %s unreadable (%s); serving version %d", self.catalogue_path, e,
                      self.catalogue.version)
        finally:
            self._catalogue_loading = False

    @staticmethod
    def _check_catalogue_dim(cat: Catalogue, gen: str, emb: np.ndarray) -> None:
        """The catalogue's vectors have one size; a generation embedding into another (a
        custom model with its own embed) cannot query it: a 409 naming both sizes."""
        got = emb.shape[1] if getattr(emb, "ndim", 0) == 2 else None
        if got != cat.dim:
            what = f"{got} dimensions" if got is not None else f"an array of shape {list(np.shape(emb))}"
            raise BadRequest(f"search: {gen} embeds into {what}, the catalogue ({cat.generations[0]}) "
                             f"holds {cat.dim}; it cannot search this catalogue", status=409)

    @app.post("/v1/search")
    async def search(self, request: Request) -> Response:
        """The catalogue's k nearest items to each input, by cosine: item ids, scores and
        (-1 when unknown) labels. `generation` picks the query model (e.g. an edge model)."""
        rid = _request_id()
        try:
            if self.catalogue is None:
                raise BadRequest("search: no catalogue is configured on this server", status=404)
            await self._refresh_catalogue()
            gen, emb, obj = await self._embed(request, rid)
            k = obj.get("k", self.spec["search_top_k"])
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
                raise BadRequest("k: must be an integer from 1 to 100")
            cat = self.catalogue  # one version for the whole answer
            self._check_catalogue_dim(cat, gen, emb)
        except BadRequest as e:
            return self._error(e, rid, "search")
        scores, ids, labels = cat.search(np.asarray(emb, dtype=np.float32), k)
        return _json({"request_id": rid, "generation": gen, "gallery_generation": cat.generations[0],
                      "catalogue_version": cat.version, "ids": ids, "scores": np.round(scores, 6).tolist(),
                      "labels": labels})

    @app.get("/healthz")
    async def healthz(self) -> Response:
        self._ensure_loop()
        return _json({"ok": True, "request_id": _request_id(), "production": self.plan.production})

    def status(self, own: Optional[dict] = None) -> dict[str, Any]:
        """Plan, generations and cumulative counters of every replica (the rollout
        controller's input): counters from the shared log, latency merged over the
        replicas heard from lately (request counts summed, quantiles the worst)."""
        plan = self.plan
        counters, feedback = self.log.counters()
        reports = self.log.replicas(REPLICA_STALE_S)
        reports[self.replica] = own if own is not None else self._report()
        gens = {}
        for name in sorted(set(self.gens) | set(counters)):
            attached = name in self.gens
            role = ("production" if name == plan.production else
                    "shadow" if name in plan.shadows else "candidate" if attached else "detached")
            gens[name] = {"role": role, "weight": plan.weights.get(name, 0.0), "attached": attached,
                          "sha256": self.gens[name]["sha256"] if attached else None,
                          "counters": counters_of(counters.get(name, {})),
                          "latency": {r: merge_latency([(d.get("latency") or {}).get(name, {}).get(r)
                                                        for d in reports.values()])
                                      for r in ("primary", "shadow")}}
        return {"production": plan.production, "candidates": plan.candidates, "shadows": list(plan.shadows),
                "input_shape": list(self.input_shape),
                "weights": dict(plan.weights), "fusion_weight": self.fusion_weight,
                "started_at": self.started, "uptime_s": round(time.time() - self.started, 3),
                # The counters' epoch: it changes only when the counters start over (a new
                # log), not when a router restarts with a durable one.
                "counters_epoch": self.log.epoch,
                "plan_source": self.plan_source, "plan_error": self.plan_error, "state_error": self.state_error,
                "state_version": self._state_version,
                "feedback": feedback, "prediction_log": self.log.describe(),
                "replica": self.replica,
                "replicas": {r: {"started_at": d.get("started_at"), "shadows_in_flight": d.get("shadows_in_flight"),
                                 "health": d.get("health")} for r, d in sorted(reports.items())},
                "shadows_in_flight": sum(int(d.get("shadows_in_flight") or 0) for d in reports.values()),
                "generations": gens}

    @app.get("/v1/status")
    async def http_status(self) -> Response:
        self._ensure_loop()
        await self._tick_state()
        try:
            doc = await self._from_log(self.status, self._report())
        except BadRequest as e:  # the log is down: no counters to report, and no guess
            return _json({"error": str(e), "request_id": _request_id()}, e.status)
        return _json({"request_id": _request_id(), **doc})

    # --- admin -----------------------------------------------------------------------

    def set_traffic(self, weights: dict[str, float], shadows: Optional[list[str]] = None,
                    production: Optional[str] = None) -> dict[str, Any]:
        """Swap the traffic plan atomically; shadows and production unchanged when None."""
        plan = self.plan
        self.plan = TrafficPlan.build(production or plan.production, weights,
                                      plan.shadows if shadows is None else shadows, self.gens)
        self._publish_state()
        self._publish_plan()
        return self.plan.as_dict()

    async def attach(self, name: str, app_name: str, sha256: str, shadow: bool = True) -> dict[str, Any]:
        """Attach a deployed generation app (weight 0, shadow if asked) after checking that
        it serves the checkpoint `sha256`."""
        await self._tick_state()
        if name in self.gens:
            raise BadRequest(f"generation {name!r} is already attached", status=409)
        try:
            handle = await asyncio.to_thread(serve.get_app_handle, app_name)
            info = await handle.info.remote()
        except Exception as e:
            raise BadRequest(f"app {app_name!r} is not a running generation ({type(e).__name__})", status=404) from None
        if info.get("sha256") != sha256:
            raise BadRequest(f"app {app_name!r} serves sha256 {str(info.get('sha256'))[:12]}..., "
                             f"not {sha256[:12]}...", status=409)
        self._check_shape(name, info.get("input_shape"))
        return self._add(name, {"app": app_name, "sha256": sha256, "uri": None, "factory": None, "handle": handle},
                         shadow)

    async def attach_local(self, ref: ModelRef, shadow: bool = True) -> dict[str, Any]:
        """Load a generation inside the router (in_router_models) and attach it."""
        await self._tick_state()
        if ref.name in self.gens:
            raise BadRequest(f"generation {ref.name!r} is already attached", status=409)
        # verifies the sha256 (and the factory, when the ref names one)
        local = await asyncio.to_thread(LocalGeneration, ref)
        self._check_shape(ref.name, local.model.input_shape)
        return self._add(ref.name, {"app": None, "sha256": ref.sha256, "uri": ref.uri, "factory": ref.factory,
                                    "handle": local}, shadow)

    def _check_shape(self, name: str, shape) -> None:
        """A generation must take production's input shape (its architecture may differ)."""
        got = None if shape is None else [int(d) for d in shape]
        if got != list(self.input_shape):
            raise BadRequest(f"generation {name!r} takes inputs of shape {got}, production (the router) "
                             f"{list(self.input_shape)}; a candidate must take production's input shape",
                             status=409)

    def _add(self, name: str, entry: dict, shadow: bool) -> dict[str, Any]:
        plan = self.plan
        gens = {**self.gens, name: entry}
        self.plan = TrafficPlan.build(plan.production, plan.weights,
                                      list(plan.shadows) + ([name] if shadow else []), gens)
        self.gens = gens
        self._publish_state()
        self._publish_plan()
        return self.plan.as_dict()

    async def detach(self, name: str) -> dict[str, Any]:
        """Stop routing to a generation (it must serve no traffic and not be production)."""
        await self._tick_state()
        plan = self.plan
        if name not in self.gens:
            raise BadRequest(f"generation {name!r} is not attached", status=404)
        if name == plan.production or plan.weights.get(name, 0.0) > 0:
            raise BadRequest(f"generation {name!r} still serves traffic; set its weight to 0 first", status=409)
        known = [g for g in self.gens if g != name]
        new = TrafficPlan.build(plan.production, {g: w for g, w in plan.weights.items() if g != name},
                                [g for g in plan.shadows if g != name], known)
        self.plan = new
        self.gens = {g: e for g, e in self.gens.items() if g != name}
        self._publish_state()
        self.m["graceful_traffic_weight"].set(0.0, tags={"generation": name})
        self.m["graceful_shadow_enabled"].set(0.0, tags={"generation": name})
        return new.as_dict()

    async def _admin(self, request: Request, route: str, action) -> Response:
        rid = _request_id()
        try:
            self._check_token(request, self.admin_token, "admin")
            result = await action()
        except BadRequest as e:
            return self._error(e, rid, route)
        return _json({"request_id": rid, **result})

    @app.post("/v1/admin/traffic")
    async def http_traffic(self, request: Request) -> Response:
        async def act():
            obj = await self._json_body(request)
            weights, shadows, production = obj.get("weights"), obj.get("shadows"), obj.get("production")
            if not isinstance(weights, dict):
                raise BadRequest("weights: must be a mapping of generation -> share")
            if shadows is not None and not (isinstance(shadows, list) and all(isinstance(g, str) for g in shadows)):
                raise BadRequest("shadows: must be a list of generation names")
            if production is not None and not isinstance(production, str):
                raise BadRequest("production: must be a generation name")
            await self._tick_state()  # change the newest plan, not this replica's older copy
            return self.set_traffic(weights, shadows, production)
        return await self._admin(request, "admin_traffic", act)

    @app.post("/v1/admin/generations")
    async def http_attach(self, request: Request) -> Response:
        async def act():
            obj = await self._json_body(request)
            for key in ("name", "app", "sha256"):
                if not isinstance(obj.get(key), str):
                    raise BadRequest(f"{key}: required string")
            return await self.attach(obj["name"], obj["app"], obj["sha256"], bool(obj.get("shadow", True)))
        return await self._admin(request, "admin_generations", act)

    @app.delete("/v1/admin/generations/{name}")
    async def http_detach(self, name: str, request: Request) -> Response:
        async def act():
            return await self.detach(name)
        return await self._admin(request, "admin_generations", act)
