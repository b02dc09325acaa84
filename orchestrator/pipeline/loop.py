"""`graceful run CONFIG`: the reconciler that takes each listed generation to a final stage.

Every pass reads each generation's stage from the registry (`stages.stage_of`), records
the transitions it has not recorded yet (audit action `pipeline_stage`, once each, and the
webhook), and performs the next stage of the first generation that is not final: train it
(against the registry's production at that moment), evaluate it against the production it
would replace, or roll it out with the controller (start, or resume the active rollout).
One generation at a time, in the config's order, so a generation is always trained and
gated against the production it will replace. Every effect is in the registry before the
next pass reads it: a SIGKILL at any moment followed by a restart continues from the
recorded stage (training resumes from its last Ray Train checkpoint, a rollout from its
persisted position under the controller's lease).

A stage that fails for a reason of the generation itself (training raised, its gate could
not be run, the rollout was refused) is recorded as `failed` for that generation's config
and the pipeline moves on; an error outside it (the router unreachable) is retried on the
next pass, and `pipeline.max_consecutive_errors` of them in a row stop the loop with the
reason. `graceful pipeline pause` stops taking new generations (no training or gate starts)
without touching a running rollout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from orchestrator.config import RunConfig
from orchestrator.pipeline.notify import Webhook
from orchestrator.pipeline.stages import Facts, Stage, stage_of
from orchestrator.pipeline.triggers import effective_config, next_trigger
from orchestrator.registry import Registry

log_ = logging.getLogger(__name__)
ACTOR = "pipeline"
SUBJECT = "pipeline"  # audit subject of pause / resume / loop events


class GenerationFailed(RuntimeError):
    """A stage failed for a reason of the generation itself: recorded, the pipeline goes on."""


class RouterUnavailable(RuntimeError):
    """No router answers and this process must not start one (`serving.attach: rayservice`):
    waited for, never counted as a failing pass (a RayService upgrade is not an error)."""


def generation_hash(cfg: RunConfig, name: str) -> str:
    """The generation's config, hashed: a failure is recorded against it, so a corrected
    config is tried again."""
    blob = json.dumps(cfg.generation(name).model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _verdict(reg: Registry, name: str, production: Optional[str]) -> Optional[str]:
    """Verdict of `name`'s latest evaluation against `production` with both models' current bytes."""
    rec, prod = reg.generation(name), reg.generation(production) if production else None
    if rec is None or prod is None:
        return None
    for e in reversed(reg.evaluations(name)):
        m = e["metrics"]
        if (e["baseline"] == production and m.get("candidate_sha256") == rec.sha256
                and m.get("baseline_sha256") == prod.sha256):
            return m.get("verdict", "pass" if e["passed"] else "fail")
    return None


def _failure(reg: Registry, name: str, ghash: str) -> Optional[str]:
    for e in reversed(reg.events(name, actions=("pipeline_failed",))):
        if e.data.get("generation_hash") == ghash:
            return e.reason
    return None


def facts(cfg: RunConfig, reg: Registry, name: str, production: Optional[str], active) -> Facts:
    """`name`'s facts, given the registry's production and active rollout (read once a pass)."""
    rec = reg.generation(name)
    gen = cfg.generation(name)
    return Facts(status=rec.status if rec is not None else None,
                 verdict=_verdict(reg, name, production) if rec is not None else None,
                 rolling_out=active is not None and active.candidate == name,
                 failed=_failure(reg, name, generation_hash(cfg, name)),
                 gate_enforced=gen.offline_gate == "enforce", allow_inconclusive=cfg.gates.allow_inconclusive)


def stages(cfg: RunConfig, reg: Registry) -> dict[str, Stage]:
    prod, active = reg.production(), reg.active_rollout()
    return {g.name: stage_of(facts(cfg, reg, g.name, prod.name if prod else None, active)) for g in cfg.generations}


def recorded_stage(reg: Registry, name: str) -> Optional[str]:
    last = reg.events(name, limit=1, actions=("pipeline_stage",))
    return last[0].to_state if last else None


def is_paused(reg: Registry) -> bool:
    last = reg.events(SUBJECT, limit=1, actions=("pipeline_pause", "pipeline_resume"))
    return bool(last) and last[0].action == "pipeline_pause"


def set_paused(reg: Registry, paused: bool, actor: str, reason: str) -> bool:
    """Pause or resume taking new generations (audited); returns whether it changed (two
    operators pausing at once: one of them changes it)."""
    if is_paused(reg) == paused:
        return False
    return reg.audit_change(actor, "pipeline_pause" if paused else "pipeline_resume", SUBJECT,
                            among=("pipeline_pause", "pipeline_resume"), reason=reason) is not None


def pipeline_status(cfg: RunConfig, reg: Registry) -> dict:
    """`graceful status`'s `pipeline`: each generation's stage (the listed ones and those
    the triggers made), paused or not, the active rollout's candidate, what makes the
    next generation."""
    cfg = effective_config(cfg, reg)
    st = stages(cfg, reg)
    active = reg.active_rollout()
    return {"paused": is_paused(reg), "current_rollout": active.candidate if active else None,
            "next": next((n for n, s in st.items() if not s.final), None), "next_trigger": next_trigger(cfg),
            "generations": [{"name": n, "stage": s.value, "status": rec.status if rec else None}
                            for n, s in st.items() for rec in (reg.generation(n),)]}


def drive_rollout(cfg: RunConfig, reg: Registry, client: Any, candidate: str, stop: threading.Event,
                  max_seconds: float, reason: str, actor: str = ACTOR,
                  attach: Optional[Callable[[str], None]] = None,
                  on_tick: Optional[Callable[[Any], None]] = None) -> Optional[str]:
    """Start (or resume, when it is active) the rollout of `candidate` on the router
    `client` and run the controller until the rollout is final, `stop` is set or
    `max_seconds` pass. Returns the final state (promoted, rolled_back) or None. Raises
    RolloutRefused when it cannot start, RuntimeError when the controller stops."""
    from orchestrator.apps import attach_on_cluster
    from orchestrator.rollout.controller import Controller
    from orchestrator.rollout.sources import source_for
    from orchestrator.rollout.start import start_rollout

    attach = attach or attach_on_cluster(cfg, reg)
    source = source_for(cfg, client)
    r = reg.active_rollout()
    if r is None or r.candidate != candidate:
        r = start_rollout(cfg, reg, client, source, candidate, actor=actor, reason=reason, attach=attach)
    ctl = Controller(cfg, reg, client, source, rollout_id=r.id, attach=attach)
    try:
        last = ctl.run(stop, on_tick=on_tick, max_seconds=max_seconds)
    finally:
        ctl.release_lease()
    if ctl.stopped is not None:
        raise RuntimeError(f"rollout of {candidate}: the controller stopped: {ctl.stopped}")
    state = last.state if last is not None else None
    return state if state in ("promoted", "rolled_back") else None


class PipelineRunner:
    """One `graceful run` process: reconciles until idle (or forever), see the module doc."""

    def __init__(self, cfg: RunConfig, reg: Registry, log: Callable[[str], None] = print,
                 stop: Optional[threading.Event] = None):
        self.base, self.reg, self.log = cfg, reg, log
        self.cfg = cfg  # the base config plus the generations the triggers made (every pass)
        self.stop = stop or threading.Event()
        p = cfg.pipeline
        self.webhook = Webhook(p.webhook_url, p.webhook_token_env, p.webhook_timeout_s)
        self.client = None
        self.url: Optional[str] = None
        self.started_serving = False
        self.errors = 0

    # --- recording -----------------------------------------------------------------------

    def record_transitions(self, current: dict[str, Stage]) -> None:
        """Audit (and post) each generation's stage once, when it differs from the last
        recorded: idempotent across restarts."""
        for name, st in current.items():
            if recorded_stage(self.reg, name) == st.value:  # the usual case, without a write
                continue
            ev = self.reg.audit_change(ACTOR, "pipeline_stage", name, st.value)
            if ev is None:  # another process recorded it a moment ago
                continue
            self.log(f"[{name}] stage {ev.from_state or '-'} -> {st.value}")
            self.webhook.post({"generation": name, "from": ev.from_state, "to": st.value, "at": time.time(),
                               "run_dir": str(self.cfg.run_dir)})

    def fail(self, name: str, stage: Stage, e: BaseException) -> None:
        reason = f"{stage.value} failed: {type(e).__name__}: {e}"
        self.reg.audit(ACTOR, "pipeline_failed", name, reason[:2000],
                       data={"generation_hash": generation_hash(self.cfg, name), "stage": stage.value})
        self.log(f"[{name}] {reason}")

    # --- hooks: what a use of the loop adds (the demo's summary and progress) --------------

    def evaluated(self, name: str, ev: Any) -> None:
        """After `name`'s offline evaluation was recorded."""

    def rollout_progress(self, name: str) -> Optional[Callable[[Any], None]]:
        """Called with each controller tick of `name`'s rollout (None: nothing to print)."""
        return None

    def rolled_out(self, name: str, state: str) -> None:
        """After `name`'s rollout reached `state` (promoted or rolled_back), before the
        generation that no longer serves leaves the router."""

    # --- serving ---------------------------------------------------------------------------

    def use_router(self, url: str, client: Any, owned: bool) -> None:
        """Serve through the router at `url` (`owned`: this process deployed it, so it
        removes generations that no longer serve)."""
        self.url, self.client, self.started_serving = url, client, owned

    def ensure_serving(self) -> None:
        """A router at serving.host:port: the one that answers, else one started here."""
        if self.client is not None:
            return
        import requests

        from serving.client import RouterClient

        token = self.cfg.serving.resolved_admin_token()
        url = self.cfg.serving.base_url()
        try:
            requests.get(url + "/healthz", timeout=2).raise_for_status()
            self.log(f"serving: using the router that answers at {url}")
        except requests.RequestException:
            if self.cfg.serving.attach == "rayservice":
                # The RayService serves; a router started here, on the orchestrator's own
                # cluster, would be one nobody reaches.
                raise RouterUnavailable(f"no router answers at {url} (serving.attach: rayservice: the RayService "
                                        f"serves, this process never starts a router); waiting for it") from None
            from orchestrator.apps import build_catalogue, serving_plan, start_router

            plan = serving_plan(self.cfg, self.reg)
            url = start_router(self.cfg, self.reg, plan, catalogue=build_catalogue(self.cfg, self.reg, self.log),
                               admin_token=token)
            self.started_serving = True
            self.log(f"serving: started the router at {url} (production {plan.production.name})")
        self.url, self.client = url, RouterClient(url, token)

    # --- stages ----------------------------------------------------------------------------

    def act(self, name: str, stage: Stage) -> None:
        from orchestrator.chain import train_generation, trained_with_this_config
        from orchestrator.evaluation.evaluate import EvaluationError, evaluate, render
        from orchestrator.registry import IntegrityError, RegistryError, register_trained
        from orchestrator.rollout.start import RolloutRefused

        if stage is Stage.TRAIN:
            try:
                if trained_with_this_config(self.cfg, name, self.reg) is not None:
                    register_trained(self.cfg, name, actor=ACTOR, registry=self.reg)
                    self.log(f"[{name}] trained already with this config: registered")
                else:
                    t0 = time.perf_counter()
                    train_generation(self.cfg, name, log=self.log)
                    self.log(f"[{name}] trained in {time.perf_counter() - t0:.1f}s")
            except KeyboardInterrupt:
                raise
            except Exception as e:  # the generation's own training: recorded, the pipeline goes on
                raise GenerationFailed(f"{type(e).__name__}: {e}") from e
        elif stage is Stage.EVALUATE:
            try:
                ev = evaluate(self.cfg, name, registry=self.reg)
            except (EvaluationError, IntegrityError, RegistryError) as e:
                raise GenerationFailed(f"{type(e).__name__}: {e}") from e
            for line in render(ev).splitlines():
                self.log(line)
            self.evaluated(name, ev)
        elif stage is Stage.ROLLOUT:
            self.ensure_serving()
            if self._lease_held_elsewhere(name):
                return
            try:
                state = drive_rollout(self.cfg, self.reg, self.client, name, self.stop,
                                      self.cfg.pipeline.rollout_max_seconds, f"graceful run: {name}",
                                      attach=self._attach(), on_tick=self.rollout_progress(name))
            except RolloutRefused as e:
                raise GenerationFailed(f"rollout refused: {e}") from e
            if state is not None:
                self.log(f"[{name}] {state}")
                self.rolled_out(name, state)
                self._free(name, state)

    def _lease_held_elsewhere(self, name: str) -> bool:
        """Another controller drives this rollout (an operator's `graceful rollout`, or a
        killed `graceful run` whose lease has not expired yet): wait for its lease to end
        instead of failing; one controller per rollout."""
        r = self.reg.active_rollout()
        lease = self.reg.lease(r.id) if r is not None and r.candidate == name else None
        left = lease.expires_at - time.time() if lease is not None else 0.0
        if left <= 0:
            return False
        self.log(f"[{name}] rollout {r.id} is driven by {lease.holder} (lease for {left:.0f} s more); waiting")
        self.stop.wait(min(left + 0.5, self.cfg.pipeline.poll_seconds + left))
        return True

    def _attach(self) -> Callable[[str], None]:
        from orchestrator.apps import attach_on_cluster

        return attach_on_cluster(self.cfg, self.reg)

    def _free(self, name: str, state: str) -> None:
        """After a final rollout, the generation that no longer serves leaves the router
        (when this process deployed the serving plane, or adds applications to the
        RayService: another plane's generations are its own)."""
        rayservice = self.cfg.serving.attach == "rayservice"
        if not (self.started_serving or rayservice):
            return
        rec = self.reg.latest_rollout(name)
        gone = rec.baseline if state == "promoted" else name
        if rayservice and state == "promoted":
            # The router replicas KubeRay built before this promotion wait for the old
            # production's application when they restart: it stays in serveConfigV2 until
            # the RayService manifest lists the new production and is applied again.
            self.log(f"[{name}] {gone}'s application stays in the RayService (a router replica built before "
                     f"this promotion needs it); update rayservice.yaml to retire it")
            return
        try:
            if rayservice:
                from orchestrator.kuberay import detach_via_rayservice

                detach_via_rayservice(self.cfg, gone)
            else:
                from serving import deploy

                deploy.remove_generation(gone)
        except Exception as e:  # it keeps serving nothing; the next plan leaves it out anyway
            log_.warning("pipeline: could not remove %s from the router (%s)", gone, e)

    # --- the loop --------------------------------------------------------------------------

    def run(self, until_idle: bool = False, max_seconds: Optional[float] = None) -> int:
        """Reconcile until every listed generation is final (`until_idle`), `stop` is set,
        or `max_seconds` pass. Returns 0, or 1 when the loop stopped on repeated errors."""
        deadline = time.monotonic() + max_seconds if max_seconds else None
        said_paused = said_waiting = False
        while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                self.cfg = effective_config(self.base, self.reg, record=True)
                current = stages(self.cfg, self.reg)
                self.record_transitions(current)
                if self.reg.production() is not None:
                    self.ensure_serving()  # clients can send traffic as soon as there is production
                todo = next((n for n, s in current.items() if not s.final), None)
                if todo is None:
                    if until_idle:
                        self.log("pipeline idle: every listed generation is final")
                        return 0
                    self.stop.wait(self.cfg.pipeline.poll_seconds)
                    continue
                stage = current[todo]
                if stage is not Stage.ROLLOUT and is_paused(self.reg):
                    if not said_paused:
                        self.log(f"pipeline paused (graceful pipeline resume CONFIG); {todo} waits at {stage.value}")
                        said_paused = True
                    self.stop.wait(self.cfg.pipeline.poll_seconds)
                    continue
                said_paused = False
                self.log(f"[{todo}] {stage.value}")
                try:
                    self.act(todo, stage)
                except GenerationFailed as e:
                    self.fail(todo, stage, e.__cause__ or e)
                self.errors = 0
                said_waiting = False
            except KeyboardInterrupt:
                raise
            except RouterUnavailable as e:
                if not said_waiting:
                    self.log(f"pipeline: {e}")
                    said_waiting = True
                self.stop.wait(self.cfg.pipeline.poll_seconds)
            except Exception as e:  # outside any one generation: retried, then the loop stops
                self.errors += 1
                self.reg.audit(ACTOR, "pipeline_error", SUBJECT, f"{type(e).__name__}: {e}"[:2000])
                self.log(f"pipeline error {self.errors}/{self.cfg.pipeline.max_consecutive_errors}: "
                         f"{type(e).__name__}: {e}")
                if self.errors >= self.cfg.pipeline.max_consecutive_errors:
                    self.log("pipeline stopped: the same kind of pass kept failing; fix the cause and run again")
                    return 1
                self.stop.wait(self.cfg.pipeline.poll_seconds)
        return 0


def run_pipeline(cfg: RunConfig, until_idle: bool = False, log: Callable[[str], None] = print,
                 stop: Optional[threading.Event] = None, max_seconds: Optional[float] = None) -> int:
    """`graceful run`: Ray started (or joined at RAY_ADDRESS), the registry opened, the
    loop run; Serve and Ray shut down at the end when this process started them."""
    import ray

    from orchestrator.config import init_ray
    from orchestrator.registry import open_registry

    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(cfg, address=os.environ.get("RAY_ADDRESS"))
    reg = open_registry(cfg)
    runner = PipelineRunner(cfg, reg, log, stop)
    try:
        return runner.run(until_idle=until_idle, max_seconds=max_seconds)
    finally:
        reg.close()
        if started_ray:
            ray.shutdown()
