"""PrometheusSource against a real Prometheus server scraping Ray's metrics endpoint.

A Prometheus (Debian's /usr/bin/prometheus; installed with apt when missing and possible)
runs on a free 127.0.0.1 port with a temporary config scraping the Ray node's
`MetricsExportPort` every second. Live traffic goes through real Ray Serve; the source's
answers are checked against the raw series Prometheus holds and against the router's own
counters, then the controller runs a rollout deciding from Prometheus alone (and holds,
inconclusive, when Prometheus goes away).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import pytest
import requests

from orchestrator.config import parse_config
from orchestrator.rollout.controller import Controller
from orchestrator.rollout.start import begin_rollout
from orchestrator.registry import Registry
from orchestrator.rollout.sources import PrometheusSource, SourceError, counts_from_status
from serving.client import RouterClient
from serving.specs import ServingSpec
from tests.helpers import free_port, require_tool
from tests.integration.conftest import local_ray
from tests.integration.test_rollout import ARCH, DATA, TOKEN, _Traffic, _write_run


def _prometheus_binary() -> str:
    """Debian's prometheus (apt-get install tried when missing); else require_tool's rule:
    fail under CI=true, skip elsewhere."""
    if shutil.which("prometheus") is None and not shutil.os.path.exists("/usr/bin/prometheus") \
            and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], capture_output=True, timeout=300)
    return require_tool("prometheus", also_in=("/usr/bin",))


@pytest.fixture(scope="module")
def ray_fast_metrics():
    """Ray exporting its metrics every second (default 10 s), so Prometheus sees traffic soon."""
    yield from local_ray(metrics_report_interval_ms=1000)


@pytest.fixture(scope="module")
def stack(ray_fast_metrics, tmp_path_factory):
    binary = _prometheus_binary()
    from serving import deploy

    tmp = tmp_path_factory.mktemp("prom")
    prom_port = free_port()
    rollout = {"shadow_bake_seconds": 1, "nfr_limit": 0.1, "tick_seconds": 1.0, "max_source_errors": 1000,
               "error_rate_limit": 0.05, "latency_p99_ms": 5000, "metric_source": "prometheus",
               "prometheus_url": f"http://127.0.0.1:{prom_port}", "prometheus_latency_window": "30s",
               "metrics_port": 0,
               "steps": [{"weight": w, "bake_seconds": 1, "min_requests": 20, "min_labels": 40} for w in (0.3, 0.7)]}
    path, refs, ds = _write_run(tmp, rollout, shuffled=False)
    spec = ServingSpec(port=free_port(), shadow_timeout_s=2.0, max_rows=64,
                       prediction_log_path=str(tmp / "predictions.sqlite"))
    url = deploy.start_serving(spec, refs["g0"], [refs["g1"]], admin_token=TOKEN)

    node = next(n for n in ray_fast_metrics.nodes() if n["Alive"])
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{node['MetricsExportPort']}']}}]\n")
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{prom_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(prom + "/-/ready", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
        time.sleep(0.5)
    cfg = parse_config({"run_dir": str(tmp / "run"), "data": DATA,
                        "generations": [{"name": n, "arch": ARCH} for n in refs],
                        "serving": {"admin_token": TOKEN}, "rollout": rollout})
    yield {"url": url, "prom": prom, "proc": proc, "cfg": cfg, "ds": ds, "refs": refs, "tmp": tmp}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log.close()
    deploy.stop_serving()


def _raw_sum(prom, metric):
    """Sum of every series of `metric` for g1, added up here from the raw vector."""
    r = requests.get(prom + "/api/v1/query", params={"query": f'{metric}{{generation="g1"}}'}, timeout=5).json()
    return sum(float(s["value"][1]) for s in r["data"]["result"])


def test_prometheus_source_returns_what_prometheus_and_the_router_hold(stack):
    client = RouterClient(stack["url"], TOKEN)
    source = PrometheusSource(stack["prom"], timeout_s=5)
    with _Traffic(stack["url"], stack["ds"], max_seconds=8):
        time.sleep(8)
    time.sleep(1.0)  # late labels delivered
    router = counts_from_status(client.status(), "g1")
    assert router.labelled > 0 and router.compared > 0
    fields = ("requests", "compared", "disagreements", "labelled", "negative_flips")
    deadline = time.monotonic() + 45
    got = None
    while time.monotonic() < deadline:
        try:
            got = source.read("g1")
            if all(getattr(got, f) == getattr(router, f) for f in fields):
                break
        except SourceError:
            pass
        time.sleep(1)
    assert got is not None and {f: getattr(got, f) for f in fields} == {f: getattr(router, f) for f in fields}
    # ... and it is what Prometheus holds, series by series
    assert got.labelled == round(_raw_sum(stack["prom"], "ray_graceful_labelled_samples_total"))
    assert got.negative_flips == round(_raw_sum(stack["prom"], "ray_graceful_negative_flips_total"))
    assert got.requests == round(_raw_sum(stack["prom"], "ray_graceful_requests_total"))
    assert got.latency_p99_ms is None or got.latency_p99_ms > 0


def test_controller_decides_from_prometheus_and_holds_when_it_is_gone(stack):
    cfg, client = stack["cfg"], RouterClient(stack["url"], TOKEN)
    source = PrometheusSource(stack["prom"], timeout_s=5)
    reg = Registry(cfg.run_dir / "registry.sqlite")
    for name in ("g0", "g1"):
        ref = stack["refs"][name]
        reg.add_generation(name, None, "mlp", cfg.config_hash(), ref.uri, ref.sha256)
    r = begin_rollout(reg, source, "g1", "g0", "test", "prometheus-driven rollout")
    assert r.data["raw_at_step_start"] is not None  # the base snapshot came from Prometheus
    ctl = Controller(cfg, reg, client, source, rollout_id=r.id)
    results = []
    with _Traffic(stack["url"], stack["ds"], max_seconds=90):
        stop = threading.Event()
        ctl.run(stop, on_tick=results.append, max_seconds=80)
    assert results[-1].state == "promoted", [(x.state, x.step, x.decision, x.reason) for x in results[-5:]]
    promotes = [x for x in results if x.decision == "promote"]
    assert len(promotes) == 3  # shadow -> 0.3 -> 0.7 -> promoted
    # Each promotion decided on labels Prometheus had counted by then: the evidence the
    # controller used never exceeds what Prometheus reports now.
    assert all(0 < x.stats["labelled"] <= source.read("g1").labelled for x in promotes)
    assert client.status()["production"] == "g1"

    # Prometheus gone: the source errors, decisions are inconclusive, nothing rolls back.
    stack["proc"].send_signal(signal.SIGTERM)
    stack["proc"].wait(timeout=30)
    back = begin_rollout(reg, source, "g0", "g1", "test", "source-down check")
    assert back.data["raw_at_step_start"] is None
    ctl2 = Controller(cfg, reg, client, source, rollout_id=back.id)
    ticks = [ctl2.tick() for _ in range(3)]
    assert [t.decision for t in ticks] == ["inconclusive"] * 3 and all(t.state == "shadow" for t in ticks)
    assert ctl2.metrics.registry.get_sample_value("graceful_controller_metric_source_errors_total",
                                                  {"source": "prometheus"}) == 3
    assert "unavailable" in ticks[-1].reason
    reg.close()
