"""The router ingress: split, shadow, feedback join, live counters, retrieval, admin.

One replica by design: the feedback join store and the live counters live in its
process (see docs/serving.md, "Limits"). Model generations are separate Serve
applications reached through deployment handles; the router attaches and detaches them
at run time. The traffic plan is an immutable value swapped in one assignment, so a
change never drops or splits a request in flight.
"""


import asyncio
import hmac
import json
import logging
import math
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

from serving.core import (USER_HEADER, BadRequest, FeedbackStore, LiveStats, TrafficPlan, as_shape, fuse, is_npy,
                          join_feedback, parse_feedback, parse_inputs, parse_json_object, parse_npy, parse_user_id)
from serving.metric_names import DEFINED, LATENCY_BUCKETS_MS
from serving.local import LocalGeneration
from serving.refs import Gallery, ModelRef

log = logging.getLogger("graceful.router")

# No `from __future__ import annotations` here: Serve's class-based view reads the
# handlers' annotations at run time and would take a string "Request" for a query param.
app = FastAPI(title="graceful router", docs_url=None, redoc_url=None, openapi_url=None)

_TIMEOUT, _ERROR = "timeout", "error"


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


@serve.ingress(app)
class Router:
    """Ingress of the serving plane. Construct through `serving.deploy.start_serving`."""

    def __init__(self, spec: dict, input_shape: "tuple[int, ...] | list[int] | int", production: str,
                 generations: dict[str, dict],
                 weights: dict[str, float], shadows: list[str], gallery: Optional[Gallery],
                 admin_token: Optional[str], plan_source: Optional[Callable[[list], dict]] = None):
        self.spec = spec
        # Production's `model.input_shape`: every request's rows, and every attached generation.
        self.input_shape = as_shape(input_shape)
        self.input_dim = math.prod(self.input_shape)  # legacy: values per row
        self.admin_token = admin_token
        self.fusion_weight = spec.get("fusion_weight")
        self.shadow_timeout_s = spec["shadow_timeout_s"]
        self.started = time.time()
        self.stats = LiveStats(spec["latency_window"])
        self.store = FeedbackStore(spec["feedback_ttl_s"], spec["feedback_max_entries"])
        self.m = _make_metrics()
        self.gens: dict[str, dict] = {}  # name -> {"app", "sha256", "handle"}
        for name, info in generations.items():
            self.gens[name] = {**info, "handle": serve.get_app_handle(info["app"]) if info["app"] else
                               LocalGeneration(ModelRef(name, info["uri"], info["sha256"], info.get("factory")))}
        # The control plane's plan wins over the deploy-time arguments: a replica that
        # restarts (crash, upgrade) comes back to production and the rollout's position as
        # they are now, not as they were when the application was deployed.
        self.plan_source = "arguments"
        self.plan_error: Optional[str] = None
        if plan_source is not None:
            try:
                p = plan_source(list(self.gens))
                self.plan = TrafficPlan.build(p["production"], p["weights"], p["shadows"], self.gens)
                self.plan_source = "registry"
            except Exception as e:  # unreadable, or it names a generation this router does not hold
                self.plan_error = f"{type(e).__name__}: {e}"
                log.error("router: plan source failed (%s); starting with the deployed plan", self.plan_error)
        if self.plan_source == "arguments":
            self.plan = TrafficPlan.build(production, weights, shadows, self.gens)
        self._publish_plan()
        self._refresher: Optional[asyncio.Task] = None
        self._background: set[asyncio.Task] = set()
        self._pending: dict[str, list] = {}  # generation -> [queued shadow copies, rows]
        self._shadow_backlog = 0  # copies admitted and not finished
        self.gallery = gallery
        self.index = None
        if gallery is not None:
            import faiss

            emb = np.array(gallery.embeddings, dtype=np.float32, copy=True)  # arrays from Ray are read-only
            faiss.normalize_L2(emb)
            self.index = faiss.IndexFlatIP(emb.shape[1])
            self.index.add(emb)

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

    def _check_admin(self, request: Request) -> None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise BadRequest("admin route: missing bearer token (Authorization: Bearer ...)", status=401)
        if not self.admin_token or not hmac.compare_digest(auth[7:].strip().encode(), self.admin_token.encode()):
            raise BadRequest("admin route: token refused", status=403)

    def _publish_plan(self) -> None:
        for g in self.gens:
            self.m["graceful_traffic_weight"].set(self.plan.weights.get(g, 0.0), tags={"generation": g})
            self.m["graceful_shadow_enabled"].set(1.0 if g in self.plan.shadows else 0.0, tags={"generation": g})

    async def _refresh_gauges(self) -> None:
        # Gauges set once in the constructor never reached Ray's exporter (checked on
        # Ray 2.60); re-setting them periodically keeps the weights visible and current.
        while True:
            self._publish_plan()
            await asyncio.sleep(5.0)

    def _ensure_refresher(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_gauges())

    def _observe(self, gen: str, role: str, ms: float) -> None:
        self.stats.latency(gen, role, ms)
        self.m["graceful_latency_ms"].observe(ms, tags={"generation": gen, "role": role})

    def _count_request(self, gen: str, role: str) -> None:
        c = self.stats.of(gen)
        if role == "primary":
            c.requests_primary += 1
        else:
            c.requests_shadow += 1
        self.m["graceful_requests"].inc(tags={"generation": gen, "role": role})

    async def _call_shadow(self, gen: str, x: np.ndarray):
        """One mirrored call, bounded by the shadow timeout: probabilities, or a marker."""
        entry = self.gens.get(gen)
        if entry is None:  # detached meanwhile
            return _ERROR
        t0 = time.perf_counter()
        resp = entry["handle"].predict.remote(x)
        try:
            probs = await asyncio.wait_for(resp, self.shadow_timeout_s)
        except asyncio.TimeoutError:
            resp.cancel()
            return _TIMEOUT
        except Exception:
            return _ERROR
        self._observe(gen, "shadow", (time.perf_counter() - t0) * 1000)
        return probs

    def _count_failure(self, gen: str, outcome: str, n: int) -> None:
        if outcome == _TIMEOUT:
            self.stats.of(gen).shadow_timeouts += n
            self.m["graceful_shadow_timeouts"].inc(n, tags={"generation": gen})
        else:
            self.stats.of(gen).shadow_errors += n
            self.m["graceful_errors"].inc(n, tags={"generation": gen, "role": "shadow"})

    def _admit_shadow(self, gen: str) -> bool:
        """Memory and CPU stay bounded when shadows fall behind: beyond the backlog cap a
        copy is skipped, and counted."""
        if self._shadow_backlog >= self.spec["shadow_max_inflight"]:
            self.stats.of(gen).shadow_dropped += 1
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

    async def _run_shadows(self, gen: str, items: list) -> None:
        """Send coalesced copies, then compare each with production (off the response path)."""
        x = items[0][1] if len(items) == 1 else np.concatenate([item[1] for item in items])
        out = await self._call_shadow(gen, x)
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
                self.store.add(rid, gen, pred)
                self._compare(gen, ref.argmax(1), pred)

    async def _finish_canary(self, rid: str, prod: str, primary: str, served_pred: np.ndarray,
                             early: asyncio.Future) -> None:
        ref = await early
        if isinstance(ref, np.ndarray):
            prod_pred = ref.argmax(1)
            self.store.add(rid, prod, prod_pred)
            self._compare(primary, prod_pred, served_pred)

    def _compare(self, gen: str, prod_pred: np.ndarray, pred: np.ndarray) -> None:
        n_dis = self.stats.record_comparison(gen, prod_pred, pred)
        self.m["graceful_compared_samples"].inc(len(pred), tags={"generation": gen})
        if n_dis:
            self.m["graceful_disagreements"].inc(n_dis, tags={"generation": gen})

    # --- data routes -----------------------------------------------------------------

    @app.post("/v1/predict")
    async def predict(self, request: Request) -> Response:
        rid = _request_id()
        self._ensure_refresher()
        try:
            x, user, _ = await self._inputs(request)
        except BadRequest as e:
            return self._error(e, rid, "predict")
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
            self.stats.of(primary).errors += 1
            self.m["graceful_errors"].inc(tags={"generation": primary, "role": "primary"})
            fallback = await early if early is not None else None
            if not isinstance(fallback, np.ndarray):
                return _json({"error": f"generation {primary} failed: {type(e).__name__}", "request_id": rid}, 503)
            self.stats.of(primary).fallbacks += 1
            answer, served = fallback, prod
        else:
            answer = probs
            if early is not None and self.fusion_weight is not None:
                prod_probs = await early
                if isinstance(prod_probs, np.ndarray):
                    answer = self._candidate_view(prod_probs, probs)
        self.stats.of(served).samples_primary += len(x)
        pred = answer.argmax(1)
        self.store.put(rid, prod, {served: pred})
        if early is not None and served == primary:
            self._spawn(self._finish_canary(rid, prod, primary, pred, early))
        ref = probs if primary == prod else early
        for g in mirrors:
            if g != prod and self._admit_shadow(g):
                self._enqueue_shadow(g, rid, x, ref)
        return _json({"request_id": rid, "generation": served, "predictions": pred.tolist(),
                      "probabilities": np.round(answer, 6).tolist()})

    @app.post("/v1/feedback")
    async def feedback(self, request: Request) -> Response:
        rid = _request_id()
        try:
            target, labels = parse_feedback(await self._json_body(request))
            added = join_feedback(self.stats, self.store.pop(target), labels)
        except BadRequest as e:
            outcome = {404: "unknown", 422: "mismatched"}.get(e.status)
            if outcome:
                self.m["graceful_feedback"].inc(tags={"outcome": outcome})
            return self._error(e, rid, "feedback")
        self.m["graceful_feedback"].inc(tags={"outcome": "joined" if added else "partial"})
        for gen, f in added.items():
            tags = {"generation": gen}
            self.m["graceful_labelled_samples"].inc(f.labelled, tags=tags)
            if f.negative_flips:
                self.m["graceful_negative_flips"].inc(f.negative_flips, tags=tags)
            if f.positive_flips:
                self.m["graceful_positive_flips"].inc(f.positive_flips, tags=tags)
        return _json({"request_id": rid, "joined": target,
                      "candidates": {g: asdict(f) for g, f in added.items()}})

    async def _embed(self, request: Request, rid: str) -> tuple[str, np.ndarray, dict]:
        x, user, obj = await self._inputs(request)
        gen = self.plan.choose(user if user is not None else rid)
        try:
            emb = await self.gens[gen]["handle"].embed.remote(x)
        except Exception as e:
            self.stats.of(gen).errors += 1
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

    def _check_gallery_dim(self, gen: str, emb: np.ndarray) -> None:
        """The gallery was embedded once by its own generation: a generation whose
        embeddings have another size (a custom model with its own embed) cannot query it
        (faiss would fail on the size), a 409 naming both sizes."""
        got = emb.shape[1] if getattr(emb, "ndim", 0) == 2 else None
        if got != self.index.d:
            what = f"{got} dimensions" if got is not None else f"an array of shape {list(np.shape(emb))}"
            raise BadRequest(f"search: {gen} embeds into {what}, the gallery ({self.gallery.generation}) holds "
                             f"{self.index.d}; it cannot search this gallery", status=409)

    @app.post("/v1/search")
    async def search(self, request: Request) -> Response:
        rid = _request_id()
        try:
            if self.index is None:
                raise BadRequest("search: no gallery is configured on this server", status=404)
            gen, emb, obj = await self._embed(request, rid)
            k = obj.get("k", self.spec["search_top_k"])
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
                raise BadRequest("k: must be an integer from 1 to 100")
            self._check_gallery_dim(gen, emb)
        except BadRequest as e:
            return self._error(e, rid, "search")
        q = np.array(emb, dtype=np.float32, copy=True)  # arrays from Ray are read-only
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores, ids = self.index.search(q, min(k, self.index.ntotal))
        return _json({"request_id": rid, "generation": gen, "gallery_generation": self.gallery.generation,
                      "ids": ids.tolist(), "scores": np.round(scores, 6).tolist(),
                      "labels": self.gallery.labels[ids].tolist()})

    @app.get("/healthz")
    async def healthz(self) -> Response:
        self._ensure_refresher()
        return _json({"ok": True, "request_id": _request_id(), "production": self.plan.production})

    def status(self) -> dict[str, Any]:
        """Plan, generations and cumulative counters (the rollout controller's input)."""
        plan = self.plan
        gens = {}
        for name in sorted(set(self.gens) | set(self.stats.counters)):
            attached = name in self.gens
            role = ("production" if name == plan.production else
                    "shadow" if name in plan.shadows else "candidate" if attached else "detached")
            gens[name] = {"role": role, "weight": plan.weights.get(name, 0.0), "attached": attached,
                          "sha256": self.gens[name]["sha256"] if attached else None,
                          **self.stats.generation_snapshot(name)}
        return {"production": plan.production, "candidates": plan.candidates, "shadows": list(plan.shadows),
                "input_shape": list(self.input_shape),
                "weights": dict(plan.weights), "fusion_weight": self.fusion_weight,
                "started_at": self.started, "uptime_s": round(time.time() - self.started, 3),
                "plan_source": self.plan_source, "plan_error": self.plan_error,
                "feedback": {**self.stats.feedback, "stored": len(self.store),
                             "expired": self.store.expired, "evicted": self.store.evicted},
                "shadows_in_flight": self._shadow_backlog, "generations": gens}

    @app.get("/v1/status")
    async def http_status(self) -> Response:
        self._ensure_refresher()
        return _json({"request_id": _request_id(), **self.status()})

    # --- admin -----------------------------------------------------------------------

    def set_traffic(self, weights: dict[str, float], shadows: Optional[list[str]] = None,
                    production: Optional[str] = None) -> dict[str, Any]:
        """Swap the traffic plan atomically; shadows and production unchanged when None."""
        plan = self.plan
        self.plan = TrafficPlan.build(production or plan.production, weights,
                                      plan.shadows if shadows is None else shadows, self.gens)
        self._publish_plan()
        return self.plan.as_dict()

    async def attach(self, name: str, app_name: str, sha256: str, shadow: bool = True) -> dict[str, Any]:
        """Attach a deployed generation app (weight 0, shadow if asked) after checking that
        it serves the checkpoint `sha256`."""
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
        return self._add(name, {"app": app_name, "sha256": sha256, "handle": handle}, shadow)

    def attach_local(self, ref: ModelRef, shadow: bool = True) -> dict[str, Any]:
        """Load a generation inside the router (in_router_models) and attach it."""
        if ref.name in self.gens:
            raise BadRequest(f"generation {ref.name!r} is already attached", status=409)
        local = LocalGeneration(ref)  # verifies the sha256 (and the factory, when the ref names one)
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
        self.gens[name] = entry
        self.plan = TrafficPlan.build(plan.production, plan.weights,
                                      list(plan.shadows) + ([name] if shadow else []), self.gens)
        self._publish_plan()
        return self.plan.as_dict()

    def detach(self, name: str) -> dict[str, Any]:
        """Stop routing to a generation (it must serve no traffic and not be production)."""
        plan = self.plan
        if name not in self.gens:
            raise BadRequest(f"generation {name!r} is not attached", status=404)
        if name == plan.production or plan.weights.get(name, 0.0) > 0:
            raise BadRequest(f"generation {name!r} still serves traffic; set its weight to 0 first", status=409)
        known = [g for g in self.gens if g != name]
        new = TrafficPlan.build(plan.production, {g: w for g, w in plan.weights.items() if g != name},
                                [g for g in plan.shadows if g != name], known)
        self.plan = new
        del self.gens[name]
        self.m["graceful_traffic_weight"].set(0.0, tags={"generation": name})
        self.m["graceful_shadow_enabled"].set(0.0, tags={"generation": name})
        return new.as_dict()

    async def _admin(self, request: Request, route: str, action) -> Response:
        rid = _request_id()
        try:
            self._check_admin(request)
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
            return self.detach(name)
        return await self._admin(request, "admin_generations", act)
