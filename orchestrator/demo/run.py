"""`graceful demo`: the whole lifecycle of a chain on one machine, as a new user first meets it.

Stages (each prints progress):
  1. train every generation of the chain on Ray Train (resuming what is trained already);
  2. serve the first generation as production on Ray Serve, with the retrieval gallery its
     embeddings fill (never re-indexed), under simulated live traffic whose labels arrive
     later by request id;
  3. `graceful run`'s loop (`orchestrator.pipeline.loop.PipelineRunner`) over the later
     generations: each in turn is gated against the production it would replace (with
     its report); a candidate that passes (or whose gate is `advisory`) joins as a shadow
     and the rollout controller moves it through the canary steps to promoted, or rolls
     it back; every stage is recorded in the registry like any pipeline's;
  4. a summary table and `run_dir/summary.json`.

Side effects stay here and in the modules it drives; the demo adds no logic of its own
beyond its traffic and its summary (`DemoRunner`'s hooks), so what it shows is what
`graceful run` does.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from orchestrator.config import RunConfig, init_ray
from orchestrator.pipeline.loop import SUBJECT, PipelineRunner, stages
from orchestrator.pipeline.stages import Stage
from orchestrator.rundir import generation_dir, registry_path, summary_path

OUTCOMES = ("promoted", "rolled_back", "rejected")


class DemoInterrupted(Exception):
    """The operator stopped the demo (Ctrl-C or SIGTERM)."""


@dataclass
class GenerationSummary:
    name: str
    error: Optional[float]  # None when it failed before its gate
    nfr: Optional[float]  # offline NFR against the production model it was compared with
    outcome: str  # promoted | rolled_back | rejected | failed | inconclusive (an enforced gate that could not decide)
    against: Optional[str] = None
    top1_vs_gallery: Optional[float] = None  # M(this generation, gallery generation)
    live_nfr: Optional[float] = None
    live_labelled: Optional[int] = None
    gate_passed: Optional[bool] = None
    gate_verdict: Optional[str] = None  # pass | fail | inconclusive
    reasons: list[str] = field(default_factory=list)
    report: Optional[str] = None


def _interrupt(*_) -> None:
    raise KeyboardInterrupt("stopped by SIGTERM")


def trap_sigterm() -> None:
    """Make SIGTERM stop like Ctrl-C, so the demo's cleanup runs (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise DemoInterrupted()


def _stage(log: Callable[[str], None], text: str) -> None:
    log(f"\n== {text}")


def train_chain(cfg: RunConfig, registry, log: Callable[[str], None], stop: threading.Event) -> None:
    """Train every untrained generation in order against the registry's production (a
    generation trained already with this config and these constraints is kept and
    registered: reruns resume)."""
    from orchestrator.chain import train_generation, trained_with_this_config
    from orchestrator.registry import register_trained

    for gen in cfg.generations:
        _check(stop)
        m = trained_with_this_config(cfg, gen.name, registry)
        if m is not None:
            register_trained(cfg, gen.name, actor="demo", registry=registry)
            log(f"[{gen.name}] trained already (test accuracy {m.get('test_accuracy', float('nan')):.4f}); kept")
            continue
        t0 = time.perf_counter()
        res = train_generation(cfg, gen.name, log=log)
        log(f"[{gen.name}] trained in {time.perf_counter() - t0:.1f}s: test accuracy "
            f"{res.metrics.get('test_accuracy', float('nan')):.4f}")


def live_retrieval_top1(client, x: np.ndarray, y: np.ndarray, rows_per_request: int = 32) -> tuple[float, str]:
    """Top-1 of `/v1/search` over (x, y): queries embedded by the generation that serves
    them, searched in the gallery built once by the gallery generation."""
    hits, served = 0, set()
    for i in range(0, len(x), rows_per_request):
        r = client.search(x[i:i + rows_per_request].tolist(), k=1)
        served.add(r["generation"])
        hits += int(sum(int(labels[0]) == int(t) for labels, t in zip(r["labels"], y[i:i + rows_per_request])))
    return hits / max(1, len(x)), ",".join(sorted(served))


def format_summary(rows: list[GenerationSummary], wall_s: float) -> str:
    """The table printed at the end (rates in %)."""
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    head = ["generation", "error %", "NFR % vs prod", "live NFR %", "M(gk, gallery) %", "outcome"]
    body = [[r.name, pct(r.error), pct(r.nfr) + (f" (vs {r.against})" if r.against else ""), pct(r.live_nfr),
             pct(r.top1_vs_gallery), r.outcome] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    lines.append(f"wall time {wall_s:.1f}s")
    return "\n".join(lines)


def write_summary(cfg: RunConfig, rows: list[GenerationSummary], wall_s: float) -> Path:
    """run_dir/summary.json: one entry per generation and the wall time."""
    path = summary_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"generations": [asdict(r) for r in rows], "wall_seconds": round(wall_s, 2)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def reset_run_dir(cfg: RunConfig) -> None:
    """Start over: remove the run directory (only one that looks like ours)."""
    run = Path(cfg.run_dir)
    if not run.exists():
        return
    ours = generation_dir(cfg, "x").parent.is_dir() or registry_path(cfg).exists() or not any(run.iterdir())
    if not ours:
        raise RuntimeError(f"--fresh: {run} does not look like a graceful run directory; not removing it")
    shutil.rmtree(run)


class LiveTraffic:
    """Simulated users in a background thread: predict requests over HTTP with labels
    posted `label_delay_s` later by request id (orchestrator.demo.traffic), until stopped;
    with `labels_wanted_only`, labels only for the requests the router lists as wanted."""

    def __init__(self, url: str, x: np.ndarray, y: np.ndarray, rate_per_s: float, max_seconds: float,
                 max_requests: int = 100_000, seed: int = 0, feedback_token: Optional[str] = None,
                 labels_wanted_only: bool = False):
        from orchestrator.demo.traffic import TrafficGenerator

        self.gen = TrafficGenerator(url, x, y, rows_per_request=8, concurrency=2, label_delay_s=0.5, seed=seed,
                                    feedback_token=feedback_token, labels_wanted_only=labels_wanted_only)
        self.stop = threading.Event()
        self._args = (max_requests, max_seconds, self.stop, rate_per_s)
        self.thread = threading.Thread(target=self.gen.run, args=self._args, name="demo-traffic", daemon=True)

    def __enter__(self) -> "LiveTraffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def _live_counts(client, candidate: str, by_disagreements: bool = False) -> tuple[Optional[float], int]:
    """(live NFR or None before labels, labelled samples) of `candidate` from /v1/status.
    With labels only on flagged requests (`by_disagreements`) the NFR is the disagreement
    rate times the flip share of the labelled disagreements."""
    from orchestrator.rollout.sources import counts_from_status

    c = counts_from_status(client.status(), candidate)
    if by_disagreements:
        if not (c.labelled_disagreements and c.compared):
            return None, c.labelled
        return c.disagreements / c.compared * c.negative_flips / c.labelled_disagreements, c.labelled
    return (c.negative_flips / c.labelled if c.labelled else None), c.labelled


def _progress(cfg: RunConfig, client, candidate: str, log: Callable[[str], None]) -> Callable[[Any], None]:
    """A controller tick printer: transitions, rollbacks and errors at once, else every 5 s."""
    t0 = time.monotonic()
    last_print = [0.0]

    def on_tick(res) -> None:
        now = time.monotonic()
        if res.transition or res.decision in ("rollback", "error") or now - last_print[0] >= 5:
            last_print[0] = now
            nfr, labelled = _live_counts(client, candidate, cfg.rollout.nfr_test == "disagreements")
            live = f"live NFR {100 * nfr:.2f}% of {labelled} labelled" if nfr is not None else "no labels yet"
            move = f"  [{res.transition}]" if res.transition else ""
            log(f"[{candidate}] {now - t0:5.1f}s {res.state} step {res.step} weight {res.weight or 0:.2f}: "
                f"{res.decision} ({live}){move}")

    return on_tick


class DemoRunner(PipelineRunner):
    """The pipeline's loop (`graceful run`) over the demo's chain, with what the demo adds:
    each gate's report and summary row, the rollout's progress, and the live NFR and
    retrieval quality after each rollout."""

    def __init__(self, cfg: RunConfig, registry, log: Callable[[str], None], stop: threading.Event, url: str,
                 client, query, gallery: Path, rows: list[GenerationSummary], wanted_only: bool):
        super().__init__(cfg, registry, log, stop)
        self.use_router(url, client, owned=True)  # the demo's own serving plane
        self.query, self.gallery, self.rows, self.wanted_only = query, gallery, rows, wanted_only

    def act(self, name: str, stage: Stage) -> None:
        prod = self.reg.production()
        if stage is Stage.EVALUATE:
            _stage(self.log, f"{name}: offline gate against {prod.name if prod else '(none)'}")
        elif stage is Stage.ROLLOUT and self.reg.active_rollout() is None:
            _stage(self.log, f"{name}: rollout (shadow -> canary "
                             f"{' -> '.join(f'{100 * s.weight:g}%' for s in self.cfg.rollout.steps)} -> promoted)")
        super().act(name, stage)

    def evaluated(self, name: str, ev: Any) -> None:
        from orchestrator.evaluation.report import write_report

        report = write_report(self.cfg, ev, self.reg)
        self.log(f"report: {report}")
        enforced = self.cfg.generation(name).offline_gate == "enforce"
        if ev.verdict == "fail":
            self.log(f"[{name}] offline gate failed: " + ("rejected, it never goes live" if enforced else
                                                          "the gate is advisory for it, so it goes live and the "
                                                          "controller decides"))
        elif ev.verdict == "inconclusive":
            goes = not enforced or self.cfg.gates.allow_inconclusive
            self.log(f"[{name}] offline gate inconclusive (the test set is too small to decide): "
                     + ("it goes live and the controller decides" if goes else
                        "it does not go live (gates.allow_inconclusive lets the live rollout decide)"))
        self.rows[:] = [r for r in self.rows if r.name != name]  # re-evaluated: the latest gate counts
        self.rows.append(GenerationSummary(
            name, ev.metrics["error_candidate"], ev.metrics["nfr"], "pending", against=ev.baseline,
            top1_vs_gallery=gallery_top1(self.cfg, self.reg, name, self.query, self.gallery), gate_passed=ev.passed,
            gate_verdict=ev.verdict, reasons=list(ev.reasons), report=str(report)))

    def rollout_progress(self, name: str) -> Callable[[Any], None]:
        return _progress(self.cfg, self.client, name, self.log)

    def _attach(self) -> Callable[[str], None]:
        deploy_beside = super()._attach()  # this process's Ray is the demo's own

        def attach(name: str) -> None:
            deploy_beside(name)
            self.log(f"[{name}] deployed beside {self.reg.production().name} as a shadow: it sees every "
                     f"request, answers none")

        return attach

    def rolled_out(self, name: str, state: str) -> None:
        row = next((r for r in self.rows if r.name == name), None)
        if row is None:  # resumed past its gate in an earlier process: nothing to add to
            return
        row.live_nfr, row.live_labelled = _live_counts(self.client, name, self.wanted_only)
        top1, by = live_retrieval_top1(self.client, self.query.x[:512], self.query.y[:512])
        self.log(f"/v1/search: top-1 {100 * top1:.1f}% with queries embedded by {by} in "
                 f"{self.cfg.gallery}'s gallery (not re-indexed)")


def refuse_shared_registry(cfg: RunConfig) -> None:
    """ValueError when `registry.url` is set: the demo replays the lifecycle from an empty
    registry on every run and archives the previous file; a shared database is the
    pipeline's (`graceful run`), not a demo's."""
    if cfg.registry.url is not None:
        raise ValueError("registry.url: the demo keeps its registry in run_dir (it replays the lifecycle from an "
                         "empty one on every run); remove registry.url, or use `graceful run` on a shared registry")


def archive_registry(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """The demo replays the whole lifecycle on every run: trained checkpoints are reused,
    but the rollout history starts over. The previous registry is kept, renamed."""
    path = registry_path(cfg)
    if path.exists():
        dest = path.with_name(f"registry-{time.strftime('%Y%m%d-%H%M%S')}.sqlite")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(path) + suffix)
            if src.exists():
                src.replace(Path(str(dest) + suffix))
        log(f"previous registry kept as {dest}; this run starts a new rollout history")


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def run_demo(cfg: RunConfig, log: Callable[[str], None] = print, stop: Optional[threading.Event] = None,
             fresh: bool = False, rollout_seconds: float = 120.0, traffic_rps: float = 40.0) -> dict:
    """Run the whole lifecycle of `cfg`'s chain; returns what summary.json holds.

    Starts (and always shuts down) its own local Ray. Raises DemoInterrupted when `stop`
    is set, RuntimeError when a stage cannot go on (the message says which and why).
    """
    import secrets

    import ray

    from orchestrator.apps import build_catalogue, serving_plan, start_router
    from orchestrator.registry import open_registry
    from orchestrator.rundir import read_metrics
    from serving.client import RouterClient
    from workers.data import load_dataset

    refuse_shared_registry(cfg)
    stop = stop or threading.Event()
    t_start = time.perf_counter()
    trap_sigterm()
    if fresh:
        reset_run_dir(cfg)
    else:
        archive_registry(cfg, log)
    if not _port_free(cfg.serving.host, cfg.serving.port):
        raise RuntimeError(f"serving.port {cfg.serving.port} on {cfg.serving.host} is in use; "
                           f"free it or pass --port")
    # One token for the router and the controller: the operator's (serving.admin_token or
    # its environment variable), else one for this run only, never printed or stored.
    # The same for the feedback token of the simulated users' labels.
    token = cfg.serving.resolved_admin_token() or secrets.token_urlsafe(24)
    feedback_token = cfg.serving.resolved_feedback_token() or secrets.token_urlsafe(24)
    cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(
        update={"admin_token": token, "feedback_token": feedback_token})})

    _stage(log, f"data: {cfg.data.source}")
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    log(f"{len(ds.train)} train / {len(ds.val)} validation / {len(ds.test)} test samples, "
        f"{ds.num_classes} classes ({time.perf_counter() - t0:.1f}s)")

    rows: list[GenerationSummary] = []
    registry = None
    try:
        # Always a new local cluster (never one RAY_ADDRESS points at): the finally below
        # shuts down Serve and Ray, which must only ever be our own.
        init_ray(cfg, address="local")
        trap_sigterm()  # again: ray.init makes SIGTERM exit at once, skipping the cleanup below
        # Serve's per-application INFO lines would bury the demo's own progress.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        registry = open_registry(cfg)
        _stage(log, f"train the chain on Ray Train ({', '.join(g.name for g in cfg.generations)})")
        # Each generation is registered as it is trained; the first becomes production
        # (bootstrap, audited) and the later ones are trained against it.
        train_chain(cfg, registry, log, stop)
        plan = serving_plan(cfg, registry)  # production and traffic: the registry's
        production = plan.production.name
        # Embedded once (Ray Data) into the persisted catalogue: served by the router from
        # its directory, scored offline through the same index.
        gallery = build_catalogue(cfg, registry, log)
        m0 = read_metrics(cfg, production)
        rows.append(GenerationSummary(production, 1 - m0["test_accuracy"], None, "promoted",
                                      top1_vs_gallery=gallery_top1(cfg, registry, production, ds.query, gallery)))

        _stage(log, f"serve {production} on Ray Serve at {cfg.serving.base_url()} "
                    f"(retrieval gallery built once by {cfg.gallery})")
        _check(stop)
        url = start_router(cfg, registry, plan, catalogue=gallery, admin_token=token)
        client = RouterClient(url, token)
        q = ds.query.take(min(512, len(ds.query)))
        top1, by = live_retrieval_top1(client, q.x, q.y)
        log(f"/v1/search: top-1 {100 * top1:.1f}% with queries embedded by {by} in {cfg.gallery}'s gallery")
        budget = rollout_seconds * max(1, len(cfg.generations) - 1) + 60
        wanted_only = cfg.rollout.nfr_test == "disagreements"
        with LiveTraffic(url, ds.test.x, ds.test.y, traffic_rps, budget, feedback_token=feedback_token,
                         labels_wanted_only=wanted_only) as traffic:
            log(f"simulated users: {traffic_rps:.0f} requests/s of 8 rows, labels arrive 0.5s later"
                + (" for the requests the router flags (a candidate disagreed): /v1/labels/wanted"
                   if wanted_only else ""))
            # The rest is `graceful run`'s loop over the chain: each generation in turn is
            # gated against the production it would replace and rolled out by the
            # controller, every stage recorded in the registry (audit `pipeline_stage`).
            loop_cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
                update={"rollout_max_seconds": rollout_seconds, "poll_seconds": 0.5})})
            runner = DemoRunner(loop_cfg, registry, log, stop, url, client, ds.query, gallery, rows, wanted_only)
            rc = runner.run(until_idle=True, max_seconds=budget)
            _check(stop)
            if rc != 0:
                last = registry.events(SUBJECT, limit=1, actions=("pipeline_error",))
                raise RuntimeError("the pipeline loop stopped on repeated errors"
                                   + (f": {last[0].reason}" if last else ""))
            final = stages(loop_cfg, registry)
            late = [n for n, st in final.items() if not st.final]
            if late:
                raise RuntimeError(f"{', '.join(late)} did not reach a final stage within {budget:.0f}s "
                                   f"(at {', '.join(final[n].value for n in late)}); raise --rollout-seconds or "
                                   f"lower rollout.steps[].min_labels")
            for name, st in final.items():
                if st is Stage.FAILED and not any(r.name == name for r in rows):
                    # failed before its gate (training, or the gate could not run): a row all the same
                    why = registry.events(name, limit=1, actions=("pipeline_failed",))
                    rows.append(GenerationSummary(name, None, None, "failed",
                                                  reasons=[why[0].reason] if why else []))
            for row in rows:
                st = final.get(row.name)
                if st is None or row.name == rows[0].name:
                    continue
                # an enforced gate that could not decide keeps the generation offline
                row.outcome = ("inconclusive" if st is Stage.REJECTED and row.gate_verdict == "inconclusive"
                               else st.value)
            stats = traffic.gen.stats
        log(f"traffic: {stats.ok}/{stats.sent} requests answered, {stats.labelled} labelled"
            + (" (only those flagged: labels wanted)" if wanted_only else "") + f", p50 {stats.p50_ms():.1f} ms")
    finally:
        if registry is not None:
            registry.close()
        # The cluster is ours alone (address="local"): shutting Ray down ends Serve with it,
        # without serve.shutdown()'s noise about its killed controller's retried tasks.
        ray.shutdown()
    wall = time.perf_counter() - t_start
    path = write_summary(cfg, rows, wall)
    log("\n" + format_summary(rows, wall))
    reports = sorted(str(r.report) for r in rows if r.report)
    log(f"summary: {path}" + (f"; reports: {', '.join(reports)}" if reports else ""))
    return json.loads(path.read_text())


def gallery_top1(cfg: RunConfig, registry, name: str, query, gallery: Path) -> float:
    """Offline M(name, gallery generation): retrieval top-1 of `name`'s embeddings of the
    `query` split in the catalogue at `gallery` (the one /v1/search serves, embedded once)."""
    from orchestrator.apps import generation_ref
    from orchestrator.catalogue import catalogue_top1
    from workers.checkpoint import load_model
    from workers.training import predict

    ref = generation_ref(cfg, registry, name, actor="demo")
    model = load_model(ref.uri, ref.sha256, factory=ref.factory)[0]
    return catalogue_top1(gallery, predict(model, query.x)[0], query.y)
