"""The pipeline's bookkeeping on a real SQLite registry (no Ray): stages from the
registry, transitions recorded once, failures tied to a generation's config, pause and
resume, and the webhook against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from orchestrator.apps import generation_ref
from orchestrator.config import load_config
from orchestrator.pipeline.loop import (PipelineRunner, is_paused, pipeline_status, recorded_stage, set_paused,
                                        stages)
from orchestrator.pipeline.stages import Stage
from orchestrator.registry import Registry, registry_path
from tests.helpers import free_port, write_untrained_run

DIGITS = {"source": "digits", "test_fraction": 0.3, "val_fraction": 0.1}
ARCH = {"type": "mlp", "width": 8, "depth": 1, "embed_dim": 8}


@pytest.fixture
def run(tmp_path, cache_dir):
    path = write_untrained_run(tmp_path, DIGITS, ARCH, ("g0", "g1"), names=("g0", "g1", "g2"))
    cfg = load_config(path)
    with Registry(registry_path(cfg)) as reg:
        generation_ref(cfg, reg, "g0")  # registered: the first becomes production
        generation_ref(cfg, reg, "g1")
        yield cfg, reg


class _Hook(BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Hook.got.append((self.headers.get("Authorization"), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_stages_come_from_the_registry_and_transitions_are_recorded_once(run, monkeypatch):
    cfg, reg = run
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HOOK_TOKEN", "hook-secret-1")
    cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
        update={"webhook_url": f"http://127.0.0.1:{port}/hook", "webhook_token_env": "HOOK_TOKEN"})})
    try:
        assert stages(cfg, reg) == {"g0": Stage.PROMOTED, "g1": Stage.EVALUATE, "g2": Stage.TRAIN}
        runner = PipelineRunner(cfg, reg, log=lambda m: None)
        for _ in range(2):  # a second pass (or a restarted process) records nothing new
            runner.record_transitions(stages(cfg, reg))
        events = [(e.subject, e.from_state, e.to_state) for e in reg.events() if e.action == "pipeline_stage"]
        assert events == [("g0", None, "promoted"), ("g1", None, "evaluate"), ("g2", None, "train")]
        assert [(a, b["generation"], b["to"]) for a, b in _Hook.got] == [
            ("Bearer hook-secret-1", "g0", "promoted"), ("Bearer hook-secret-1", "g1", "evaluate"),
            ("Bearer hook-secret-1", "g2", "train")]
        assert runner.webhook.sent == 3 and recorded_stage(reg, "g1") == "evaluate"
    finally:
        server.shutdown()


def test_a_webhook_that_is_down_is_counted_never_raised(run):
    cfg, reg = run
    cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
        update={"webhook_url": f"http://127.0.0.1:{free_port()}/", "webhook_timeout_s": 0.5})})
    runner = PipelineRunner(cfg, reg, log=lambda m: None)
    runner.record_transitions(stages(cfg, reg))
    assert runner.webhook.errors == 3 and runner.webhook.sent == 0
    assert len([e for e in reg.events() if e.action == "pipeline_stage"]) == 3  # the audit log has them


def test_a_failure_holds_for_the_generations_config_and_a_changed_config_is_tried_again(run):
    cfg, reg = run
    runner = PipelineRunner(cfg, reg, log=lambda m: None)
    runner.fail("g2", Stage.TRAIN, RuntimeError("out of memory"))
    assert stages(cfg, reg)["g2"] is Stage.FAILED
    ev = [e for e in reg.events("g2") if e.action == "pipeline_failed"][-1]
    assert ev.reason == "train failed: RuntimeError: out of memory" and ev.data["stage"] == "train"
    gens = [g.model_copy(update={"train": g.train.model_copy(update={"steps": 7})}) if g.name == "g2" else g
            for g in cfg.generations]
    assert stages(cfg.model_copy(update={"generations": gens}), reg)["g2"] is Stage.TRAIN


def test_pause_and_resume_are_audited_and_shown(run):
    cfg, reg = run
    assert not is_paused(reg)
    assert set_paused(reg, True, "alice", "freeze") and not set_paused(reg, True, "alice", "again")
    assert is_paused(reg) and pipeline_status(cfg, reg)["paused"] is True
    assert set_paused(reg, False, "bob", "go") and not is_paused(reg)
    acts = [(e.actor, e.action) for e in reg.events("pipeline")]
    assert acts == [("alice", "pipeline_pause"), ("bob", "pipeline_resume")]
    st = pipeline_status(cfg, reg)
    assert st["next"] == "g1" and [g["stage"] for g in st["generations"]] == ["promoted", "evaluate", "train"]


def test_the_evaluated_hook_gets_the_recorded_evaluation_and_the_stage_moves_on(run):
    """What a use of the loop (the demo) builds on: `evaluated` is called with the
    evaluation the registry now holds, after which the generation leaves EVALUATE."""
    cfg, reg = run
    seen = []

    class Hooked(PipelineRunner):
        def evaluated(self, name, ev):
            seen.append((name, ev.baseline, ev.verdict))

    Hooked(cfg, reg, log=lambda m: None).act("g1", Stage.EVALUATE)
    recorded = reg.evaluations("g1")
    assert len(recorded) == 1 and recorded[0]["baseline"] == "g0"
    assert [(n, b) for n, b, _ in seen] == [("g1", "g0")] and seen[0][2] in ("pass", "fail", "inconclusive")
    assert stages(cfg, reg)["g1"] is not Stage.EVALUATE


def test_with_rayservice_attach_a_missing_router_is_waited_for_not_counted_as_errors(run):
    """serving.attach: rayservice: nothing answers at serving.host:port, and the loop never
    starts a router of its own: it says so once and waits, with no failing pass counted (a
    RayService upgrade must not use up the RayJob's retries)."""
    cfg, reg = run
    cfg = cfg.model_copy(update={
        "serving": cfg.serving.model_copy(update={"attach": "rayservice", "port": free_port()}),
        "pipeline": cfg.pipeline.model_copy(update={"poll_seconds": 0.1, "max_consecutive_errors": 1})})
    lines = []
    runner = PipelineRunner(cfg, reg, log=lines.append)
    assert runner.run(max_seconds=1.0) == 0
    waiting = [m for m in lines if "no router answers" in m]
    assert len(waiting) == 1 and "never starts a router" in waiting[0]
    assert runner.errors == 0 and runner.client is None and not runner.started_serving
    assert not [e for e in reg.events("pipeline") if e.action == "pipeline_error"]


def test_with_rayservice_attach_the_old_productions_app_stays_after_a_promotion(run):
    """Router replicas KubeRay built before the promotion wait for the old production's
    application on restart: the loop leaves it in the RayService and says so."""
    cfg, reg = run
    cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"attach": "rayservice"})})
    r = reg.start_rollout("g1", "g0", "ctl", "go")
    reg.transition(r.id, ("shadow", 0), state="promoted", step=0, weight=1.0, actor="ctl", action="promote",
                   reason="ok")
    lines = []
    PipelineRunner(cfg, reg, log=lines.append)._free("g1", "promoted")
    assert lines == ["[g1] g0's application stays in the RayService (a router replica built before this "
                     "promotion needs it); update rayservice.yaml to retire it"]
