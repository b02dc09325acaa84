"""deploy/ and config/ files: they load, promtool and amtool accept them, the alert rules
fire on synthetic series, the RayService's Serve config is valid and matches the
builders, and every metric the dashboard and the alert rules use is one the code exports."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import yaml

from orchestrator.rollout import metric_names as controller_metrics
from orchestrator.config import RolloutSpec, load_config
from serving import metric_names as router_metrics
from serving.refs import app_name_for
from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
KNOWN_METRICS = set(router_metrics.EXPORTED) | set(controller_metrics.EXPORTED) | {"up"}

# --- PromQL: which metric names an expression reads ------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARS = re.compile(r"\$\{[^}]*\}|\$\w+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """Metric names read by a PromQL expression (Grafana variables allowed).

    Strips string literals, `{label matchers}`, `[ranges]` and grouping label lists; what is
    left that is neither a function (followed by `(`) nor a keyword is a metric name.
    """
    s = _STRINGS.sub('""', expr)
    s = _GRAFANA_VARS.sub("", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        word = m.group(0)
        if word.lower() in _KEYWORDS or re.match(r"\s*\(", s[m.end():]):
            continue
        names.add(word)
    return names


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every query in a Grafana dashboard: panel targets (rows' nested
    panels too), annotation queries and query variables."""
    out = []

    def panels(ps):
        for p in ps:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r}", t["expr"]))
            panels(p.get("panels", []))

    panels(dash.get("panels", []))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a.get('name')!r}", a["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            out.append((f"variable {v['name']!r}", m.group(1) if m else q))
    return out


def alert_exprs(rules: dict) -> list[tuple[str, str]]:
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"] for r in g["rules"]]


def unknown_metrics(exprs: list[tuple[str, str]], known: set[str] = KNOWN_METRICS) -> list[str]:
    """'where: name' for every metric name that no code exports."""
    return [f"{where}: {name}" for where, expr in exprs for name in sorted(metric_names(expr) - known)]


def test_metric_names_parser_on_hand_written_expressions():
    assert metric_names('sum by (generation) (rate(ray_graceful_requests_total{role="shadow"}[5m]))') == {
        "ray_graceful_requests_total"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(ray_graceful_latency_ms_bucket'
                        '{generation=~"$generation"}[$__rate_interval])))') == {"ray_graceful_latency_ms_bucket"}
    assert metric_names('label_replace(a_total / on (x) group_left b > 0.02 and c offset 15m, "candidate", "$1", '
                        '"generation", "(.+)")') == {"a_total", "b", "c"}
    assert metric_names('up{job="graceful-controller"} == 0 or absent(up{job="graceful-controller"})') == {"up"}
    assert metric_names("time() - graceful_controller_last_tick_timestamp_seconds > 1e3") == {
        "graceful_controller_last_tick_timestamp_seconds"}
    assert metric_names("sum(rate(x[1m])) by (generation) / sum without (replica) (y)") == {"x", "y"}


def test_dashboard_and_alert_rules_use_only_exported_metric_names():
    dash = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    exprs = dashboard_exprs(dash) + alert_exprs(rules)
    assert len(exprs) > 25  # every panel query, the annotation, the variable, every rule
    assert unknown_metrics(exprs) == []
    used = set().union(*(metric_names(e) for _, e in exprs))
    # The dashboard and the alerts together cover the metrics an operator needs.
    for name in ("ray_graceful_traffic_weight", "ray_graceful_negative_flips_total",
                 "ray_graceful_labelled_samples_total", "ray_graceful_disagreements_total",
                 "ray_graceful_latency_ms_bucket", "ray_graceful_requests_total", "ray_graceful_errors_total",
                 "ray_graceful_shadow_timeouts_total", "graceful_rollout_state", "graceful_rollout_step",
                 "graceful_rollout_candidate_weight", "graceful_rollout_decisions_total",
                 "graceful_rollout_rollbacks_total", "graceful_controller_last_tick_timestamp_seconds", "up"):
        assert name in used, name


def test_a_misspelt_metric_in_a_panel_is_caught():
    """The check fails on a copy of the real dashboard with one name misspelt (no `_total`,
    the Ray prefix dropped, or one letter off), naming the panel and the name."""
    dash = json.loads(DASHBOARD.read_text())
    for wrong in ("ray_graceful_negative_flips", "graceful_negative_flips_total", "ray_graceful_negativ_flips_total"):
        bad = copy.deepcopy(dash)
        for p in bad["panels"]:
            for t in p.get("targets", []):
                t["expr"] = t["expr"].replace("ray_graceful_negative_flips_total", wrong)
        problems = unknown_metrics(dashboard_exprs(bad))
        assert problems and all(wrong in p for p in problems), problems
        assert any("Live NFR" in p for p in problems)
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    rules["groups"][1]["rules"][0]["expr"] = rules["groups"][1]["rules"][0]["expr"].replace(
        "graceful_rollout_rollbacks_total", "graceful_rollout_rollback_total")
    assert unknown_metrics(alert_exprs(rules)) == ["GracefulRollback: graceful_rollout_rollback_total"]


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    ds = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["query"] == "prometheus"
    ref = "${%s}" % ds[0]["name"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    queries = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(queries) >= 15
    for p in queries:
        assert p["datasource"]["uid"] == ref, p["title"]
        assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    # Latency panels are quantiles over the histogram buckets, by generation.
    lat = [t["expr"] for p in queries for t in p["targets"] if "latency_ms_bucket" in t["expr"]]
    assert lat and all("histogram_quantile" in e and "generation" in e and "le" in e for e in lat)


# --- Prometheus, Alertmanager ------------------------------------------------------------

def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_scrape_config_and_rules():
    promtool = require_tool("promtool")
    r = _run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(promtool, "check", "rules", str(PROM / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(alert_exprs(yaml.safe_load((PROM / "alerts.yml").read_text())))
    assert f"SUCCESS: {n} rules found" in r.stdout


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every panel and annotation query parses: promtool checks them as recording rules
    (Grafana's variables replaced by values it would substitute)."""
    promtool = require_tool("promtool")
    dash = json.loads(DASHBOARD.read_text())
    exprs = [e for where, e in dashboard_exprs(dash) if not where.startswith("variable")]
    subst = [e.replace("$__rate_interval", "1m").replace("$generation", ".*") for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": e}
                                                        for i, e in enumerate(subst)]}]}
    (tmp_path / "dash_rules.yml").write_text(yaml.safe_dump(rules))
    r = _run(promtool, "check", "rules", str(tmp_path / "dash_rules.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and a broken query would not pass.
    rules["groups"][0]["rules"][0]["expr"] = subst[0] + " by"
    (tmp_path / "dash_rules.yml").write_text(yaml.safe_dump(rules))
    assert _run(promtool, "check", "rules", str(tmp_path / "dash_rules.yml")).returncode != 0


def test_alert_rules_fire_on_synthetic_series():
    """deploy/prometheus/alerts_test.yml: the NFR alert fires for a 5 % candidate and not
    for 0.5 % or under 500 labels; controller-down fires only during a rollout; stale
    tick, shadow errors and rollbacks (new and existing counter series)."""
    promtool = require_tool("promtool")
    r = _run(promtool, "test", "rules", str(PROM / "alerts_test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_fails_when_a_rule_is_broken(tmp_path):
    """The unit tests can fail: with the NFR threshold at 6 % the 5 % candidate stays quiet."""
    promtool = require_tool("promtool")
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text().replace("> 0.02", "> 0.06"))
    r = _run(promtool, "test", "rules", str(tmp_path / "alerts_test.yml"))
    assert r.returncode != 0 and "GracefulHighLiveNFR" in r.stdout + r.stderr


def test_prometheus_config_wiring():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"ray", "graceful-controller"}
    # The controller's endpoint (metrics and webhook) on its default port, everywhere.
    port = RolloutSpec.model_fields["metrics_port"].default
    assert jobs["graceful-controller"]["static_configs"][0]["targets"] == [f"graceful-controller:{port}"]
    hook = yaml.safe_load(ALERTMANAGER.read_text())["receivers"][0]["webhook_configs"][0]["url"]
    assert hook == f"http://graceful-controller:{port}/v1/admin/alert"
    job, service = _docs("controller.yaml")
    assert service["metadata"]["name"] == "graceful-controller" and service["spec"]["ports"][0]["port"] == port
    assert job["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == port
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    srv = jobs["ray"]["dns_sd_configs"][0]["names"][0]
    svc = next(yaml.safe_load_all((DEPLOY / "kuberay" / "metrics-service.yaml").read_text()))
    assert srv.startswith(f"_metrics._tcp.{svc['metadata']['name']}.")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["name"] == "metrics"
    # Every Ray pod exports its metrics on the port that Service selects.
    for f in RAY_MANIFESTS:
        for params in _ray_start_params(f):
            assert params["metrics-export-port"] == str(svc["spec"]["ports"][0]["port"]), f


def test_alertmanager_sends_rollback_alerts_to_the_controller_webhook_with_a_token():
    cfg = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in cfg["receivers"]}
    route = next(r for r in cfg["route"]["routes"] if r["receiver"] == "graceful-controller")
    assert route["matchers"] == ['action="rollback"']
    hook = receivers["graceful-controller"]["webhook_configs"][0]
    assert hook["url"].endswith("/v1/admin/alert") and hook["send_resolved"] is False
    assert hook["http_config"]["authorization"]["credentials_file"]
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    rollback = [r["alert"] for g in rules["groups"] for r in g["rules"] if r.get("labels", {}).get("action") == "rollback"]
    assert rollback == ["GracefulHighLiveNFR"]


def test_amtool_accepts_the_alertmanager_config_and_routes():
    amtool = require_tool("amtool")
    r = _run(amtool, "check-config", str(ALERTMANAGER))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
             "alertname=GracefulHighLiveNFR", "action=rollback", "candidate=g2")
    assert r.returncode == 0 and set(r.stdout.split()[0].split(",")) == {"graceful-controller", "operators"}, r.stdout
    r = _run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", "alertname=GracefulRollback")
    assert r.returncode == 0 and r.stdout.split() == ["operators"], r.stdout


# --- YAML files, KubeRay ----------------------------------------------------------------

RUN_CONFIGS = sorted((ROOT / "config").glob("*.yaml")) + sorted((ROOT / "examples").glob("*/config.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_run_config_loads(path, monkeypatch):
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # an example's runtime_env joins it
    cfg = load_config(path)
    assert cfg.generations


DEPLOY_YAML = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", DEPLOY_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_deploy_yaml_loads(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    if path.parent.name == "kuberay":
        for d in docs:
            assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], path


# Every manifest that makes a Ray cluster; the RayJobs among them.
RAY_MANIFESTS = ("rayjob-train.yaml", "rayservice.yaml", "orchestrator.yaml")
RAY_JOBS = ("rayjob-train.yaml", "orchestrator.yaml")


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()))


def _cluster(name: str) -> dict:
    doc = _docs(name)[0]
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def _ray_start_params(name: str) -> list[dict]:
    c = _cluster(name)
    return [c["headGroupSpec"]["rayStartParams"]] + [w["rayStartParams"] for w in c["workerGroupSpecs"]]


def _pod_specs(name: str) -> list[dict]:
    c = _cluster(name)
    return [c["headGroupSpec"]["template"]["spec"]] + [w["template"]["spec"] for w in c["workerGroupSpecs"]]


def test_rayjob_rayservice_and_controller_share_the_config_and_run_volume():
    """One ConfigMap (key run.yaml) and one run volume for training, serving, the
    orchestrator and the controller; one image."""
    specs = [s for name in RAY_MANIFESTS for s in _pod_specs(name)] + [
        _docs("controller.yaml")[0]["spec"]["template"]["spec"]]
    images = set()
    for spec in specs:
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["config"]["configMap"]["name"] == "graceful-config"
        assert vols["runs"]["persistentVolumeClaim"]["claimName"] == "graceful-runs"
        c = spec["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts == {"config": "/config", "runs": "/runs"}
        images.add(c["image"])
    assert len(images) == 1
    assert _docs("rayjob-train.yaml")[0]["spec"]["entrypoint"].split()[:3] == ["graceful", "train", "/config/run.yaml"]
    assert _docs("controller.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["args"][:2] == [
        "rollout", "/config/run.yaml"]
    pvc = [d for d in _docs("rayjob-train.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert pvc[0]["metadata"]["name"] == "graceful-runs" and pvc[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayservice_serve_config_is_valid_and_matches_the_builders():
    """serveConfigV2 parses as Ray Serve's multi-application schema; each generation app
    is named as the router looks it up (graceful-gen-<name>), every generation the router
    serves has one, and the import paths resolve to the builders."""
    from ray.serve.schema import ServeDeploySchema

    svc = _docs("rayservice.yaml")[0]
    assert svc["kind"] == "RayService"
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    assert serve_cfg.http_options.host == "0.0.0.0" and serve_cfg.http_options.port == 8000
    apps = {a.name: a for a in serve_cfg.applications}
    routers = [a for a in apps.values() if a.import_path.endswith(":router_app")]
    assert len(routers) == 1 and routers[0].route_prefix == "/" and routers[0].name == "graceful"
    gens = {a.args["generation"]: a for a in apps.values() if a.import_path.endswith(":generation_app")}
    for gen, app in gens.items():
        assert app.name == app_name_for(gen) and app.route_prefix is None
    # production is the registry's, never pinned in the manifest; every candidate has its app
    assert "production" not in routers[0].args
    served = routers[0].args.get("candidates", [])
    assert set(served) < set(gens)
    demo = load_config(ROOT / "config" / "demo.yaml")
    assert set(served) <= {g.name for g in demo.generations}
    for app in apps.values():
        assert app.args["config"] == "/config/run.yaml"
        module, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    # Serve's HTTP port and Ray's metrics port are open on every Ray pod.
    for spec in _pod_specs("rayservice.yaml"):
        ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert ports["serve"] == 8000 and ports["metrics"] == 8080


def test_dockerfile_installs_the_package_and_copies_what_it_needs():
    text = (DEPLOY / "Dockerfile").read_text()
    for d in ("orchestrator", "workers", "serving", "config"):
        assert f"COPY --chown=ray:users {d} ./{d}" in text
    # Editable, so that `graceful demo` finds config/demo.yaml beside the package (cli_demo).
    assert "pip install --no-cache-dir -e ." in text and 'ENTRYPOINT ["graceful"]' in text
    from orchestrator.cli.demo import DEFAULT_CONFIGS

    assert DEFAULT_CONFIGS[0] == ROOT / "config" / "demo.yaml" and DEFAULT_CONFIGS[0].is_file()
    assert re.search(r"EXPOSE .*\b9108\b", text) and re.search(r"EXPOSE .*\b8000\b", text)
    base = re.search(r"ARG BASE=rayproject/ray:([\d.]+)-", text).group(1)
    import ray

    assert {base, ray.__version__} | {_cluster(name)["rayVersion"] for name in RAY_MANIFESTS} == {base}


# --- safe cluster defaults: authentication and what the network may reach ------------------

@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_every_ray_cluster_turns_on_token_authentication(name):
    assert _cluster(name).get("authOptions") == {"mode": "token"}, name
    for spec in _pod_specs(name):  # and no container turns it off again
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE") in (None, "token"), (name, c["name"])


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_no_ray_pod_declares_the_ray_client_port(name):
    ports = [p for spec in _pod_specs(name) for c in spec["containers"] for p in c.get("ports", [])]
    assert 10001 not in {p["containerPort"] for p in ports}, name
    assert "client" not in {p.get("name") for p in ports}, name
    assert not any("ray-client-server-port" in params for params in _ray_start_params(name)), name


@pytest.mark.parametrize("name", RAY_JOBS)
def test_the_rayjob_is_submitted_by_the_operator_not_a_submitter_pod(name):
    """HTTPMode: only the operator calls the dashboard, which the NetworkPolicy admits."""
    assert _docs(name)[0]["spec"]["submissionMode"] == "HTTPMode"


# --- the orchestrator as a RayJob: `graceful run`, editing the RayService ----------------------

def _orchestrator() -> dict[str, dict]:
    docs = _docs("orchestrator.yaml")
    assert [d["kind"] for d in docs] == ["RayJob", "ServiceAccount", "Role", "RoleBinding"]
    return {d["kind"]: d for d in docs}


def test_the_orchestrator_rayjob_runs_graceful_run_on_the_shared_config():
    from orchestrator.cli.main import build_parser
    from orchestrator.config import RegistrySpec
    from serving.specs import ServingSpec

    job = _orchestrator()["RayJob"]
    assert job["metadata"]["name"] == "graceful-orchestrator"
    words = job["spec"]["entrypoint"].split()
    assert words[0] == "graceful"
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.config) == ("run", "/config/run.yaml")
    assert not args.until_idle and args.max_seconds is None  # long-running: it ends only when stopped
    # A failed run is retried on a fresh cluster (it resumes from the registry); no deadline
    # ends a healthy one; an ended job gives its nodes back.
    assert job["spec"]["backoffLimit"] >= 1 and "activeDeadlineSeconds" not in job["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    head = _pod_specs("orchestrator.yaml")[0]["containers"][0]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["env"]}
    assert secrets == {ServingSpec.model_fields["admin_token_env"].default: {"name": "graceful-admin-token",
                                                                              "key": "token"},
                       RegistrySpec.model_fields["password_env"].default: {"name": "graceful-registry",
                                                                           "key": "password"}}
    # KubeRay's head Service takes its ports from these: the operator submits to "dashboard".
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["dashboard"] == 8265
    assert [w["groupName"] for w in _cluster("orchestrator.yaml")["workerGroupSpecs"]] == ["train"]


def test_the_config_keys_the_orchestrator_needs_are_valid_and_point_at_the_rayservice():
    """The `serving:` and `registry:` block of orchestrator.yaml's header comment: valid
    config, attaching to the RayService that rayservice.yaml defines, through the router
    Service KubeRay makes for it, with the config path its applications build from."""
    from orchestrator.config import RegistrySpec
    from serving.specs import ServingSpec

    text = (DEPLOY / "kuberay" / "orchestrator.yaml").read_text()
    block = text.split("In that config set:\n", 1)[1].split("\n# The registry", 1)[0]
    keys = yaml.safe_load("\n".join(line[4:] for line in block.splitlines() if line.startswith("#   ")))
    serving, registry = ServingSpec.model_validate(keys["serving"]), RegistrySpec.model_validate(keys["registry"])
    svc = _docs("rayservice.yaml")[0]
    assert serving.attach == "rayservice" and serving.rayservice.name == svc["metadata"]["name"]
    assert (serving.host, serving.port) == (f"{svc['metadata']['name']}-serve-svc", 8000)
    assert registry.url.startswith("postgresql://")
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert {a["args"]["config"] for a in apps} == {serving.rayservice.config_path}


def test_the_orchestrator_role_grants_only_get_and_patch_on_the_one_rayservice():
    """All that `orchestrator.kuberay` does with the Kubernetes API: read the RayService and
    merge-patch its serveConfigV2 (tests/orchestrator/test_kuberay.py checks it uses no other verb)."""
    docs = _orchestrator()
    role, binding, account = docs["Role"], docs["RoleBinding"], docs["ServiceAccount"]
    name = _docs("rayservice.yaml")[0]["metadata"]["name"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayservices"], "resourceNames": [name],
                              "verbs": ["get", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    kinds = {d["kind"] for p in (DEPLOY / "kuberay").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


def test_the_orchestrator_pods_run_as_its_service_account_and_only_the_head_gets_a_token():
    account = _orchestrator()["ServiceAccount"]["metadata"]["name"]
    head, *workers = _pod_specs("orchestrator.yaml")
    assert head["serviceAccountName"] == account and head.get("automountServiceAccountToken", True) is True
    for spec in workers:  # training workers call neither the Kubernetes API nor the router
        assert spec["serviceAccountName"] == account and spec["automountServiceAccountToken"] is False
        assert "env" not in spec["containers"][0]
    # the other manifests apply without orchestrator.yaml: none needs its account
    others = _pod_specs("rayjob-train.yaml") + _pod_specs("rayservice.yaml") + [
        _docs("controller.yaml")[0]["spec"]["template"]["spec"]]
    assert all(spec.get("serviceAccountName") != account for spec in others)


def test_every_generation_app_of_the_rayservice_is_what_with_generation_app_adds():
    """Each graceful-gen-* application of rayservice.yaml, taken out and added back with
    `orchestrator.kuberay.with_generation_app`, comes back the same, before the router;
    on the whole config it changes nothing."""
    from orchestrator.kuberay import ROUTER_BUILDER, with_generation_app
    from serving.specs import RayServiceSpec

    serve_config = _docs("rayservice.yaml")[0]["spec"]["serveConfigV2"]
    doc = yaml.safe_load(serve_config)
    router = next(a["name"] for a in doc["applications"] if a["import_path"] == ROUTER_BUILDER)
    gens = [a for a in doc["applications"] if a["name"].startswith("graceful-gen-")]
    assert len(gens) >= 2
    for app in gens:
        name = app["name"].removeprefix("graceful-gen-")
        assert with_generation_app(serve_config, name, RayServiceSpec().config_path) is serve_config
        without = {**doc, "applications": [a for a in doc["applications"] if a is not app]}
        added = yaml.safe_load(with_generation_app(yaml.safe_dump(without), name, RayServiceSpec().config_path))
        assert [a for a in added["applications"] if a["name"] == app["name"]] == [app]
        names = [a["name"] for a in added["applications"]]
        assert names.index(app["name"]) == names.index(router) - 1
        assert sorted(names) == sorted(a["name"] for a in doc["applications"])
        assert {k: v for k, v in added.items() if k != "applications"} == {
            k: v for k, v in doc.items() if k != "applications"}


def test_services_expose_only_the_router_and_metrics_ports():
    """... and the registry's 5432, on its own Service (its NetworkPolicy below)."""
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d and d["kind"] == "Service":
                ports = {p["port"] for p in d["spec"]["ports"]}
                allowed = {5432} if d["metadata"]["name"] == "graceful-registry" else {8000, 8080, 9108}
                assert ports <= allowed, (path.name, ports)


def _ingress(policy: dict) -> list[tuple[Optional[str], set[int]]]:
    """(who, ports) per ingress rule: who is 'ray-pods', 'ns:<name>' or None (anyone);
    ports empty means every port."""
    out = []
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from")
        if not peers:
            out.append((None, ports))
            continue
        for peer in peers:
            assert set(peer) == {"podSelector"} or set(peer) == {"namespaceSelector"}, peer
            if "podSelector" in peer:
                assert peer["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}, peer
                out.append(("ray-pods", ports))
            else:
                out.append((f"ns:{peer['namespaceSelector']['matchLabels']['kubernetes.io/metadata.name']}", ports))
    return out


def test_network_policy_admits_the_router_to_all_and_the_rest_to_named_peers_only():
    policies = {d["metadata"]["name"]: d for d in _docs("networkpolicy.yaml")}
    ray = policies["graceful-ray-pods"]
    # KubeRay labels every Ray pod (head and workers, RayService and RayJob) with this;
    # the metrics Service selects the same pods
    assert ray["spec"]["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    assert _docs("metrics-service.yaml")[0]["spec"]["selector"] == {"ray.io/is-ray-node": "yes"}
    assert ray["spec"]["policyTypes"] == ["Ingress"]
    rules = _ingress(ray)
    anyone = [ports for who, ports in rules if who is None]
    assert anyone == [{8000}], "only the router's port is open to every client"
    assert ("ray-pods", set()) in rules  # Ray's own traffic, every port
    assert ("ns:monitoring", {8080}) in rules and ("ns:ray-system", {8265}) in rules
    assert len(rules) == 4
    ctl = policies["graceful-controller"]
    assert ctl["spec"]["podSelector"] == {"matchLabels": {"app": "graceful-controller"}}
    assert _ingress(ctl) == [("ns:monitoring", {9108})]
    assert _docs("controller.yaml")[0]["spec"]["template"]["metadata"]["labels"] == {"app": "graceful-controller"}


def test_a_rule_open_to_every_port_and_peer_is_caught():
    """The check above fails on a policy with an `ingress: [{}]` rule (admits everything)."""
    rules = _ingress({"spec": {"ingress": [{}]}})
    assert rules == [(None, set())] and [p for w, p in rules if w is None] != [{8000}]


# --- the shared registry (PostgreSQL) ----------------------------------------------------------

REGISTRY_URL = "postgresql://graceful@graceful-registry:5432/graceful"


def _registry_env(container: dict) -> Optional[dict]:
    return next((e for e in container.get("env", []) if e["name"] == "GRACEFUL_REGISTRY_PASSWORD"), None)


def test_every_pod_that_opens_the_registry_gets_its_password_from_the_secret():
    """The RayService's pods (router replicas, builders), the RayJob drivers (heads) and the
    controller read registry.password_env's default from the Secret registry.yaml's server
    uses; the password is never a literal."""
    from orchestrator.config import RegistrySpec

    ref = {"name": "graceful-registry", "key": "password"}
    # optional where SQLite is an option (a pod starts without the Secret); required for the
    # orchestrator, which the manifests run on PostgreSQL only
    optional = {"name": RegistrySpec().password_env, "valueFrom": {"secretKeyRef": {**ref, "optional": True}}}
    required = {"name": RegistrySpec().password_env, "valueFrom": {"secretKeyRef": ref}}
    opening = (_pod_specs("rayservice.yaml") + [_pod_specs("rayjob-train.yaml")[0]]
               + [_docs("controller.yaml")[0]["spec"]["template"]["spec"]])
    for spec in opening:
        assert _registry_env(spec["containers"][0]) == optional, spec["containers"][0]["name"]
    assert _registry_env(_pod_specs("orchestrator.yaml")[0]["containers"][0]) == required
    server = next(d for d in _docs("registry.yaml") if d["kind"] == "StatefulSet")
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"] == required["valueFrom"]
    assert env["POSTGRES_USER"]["value"] == "graceful" and env["POSTGRES_DB"]["value"] == "graceful"


def test_the_documented_registry_url_names_the_registry_service_and_loads():
    """The URL the manifests document is the Service of registry.yaml, and the config
    accepts it (no password in it)."""
    from urllib.parse import urlsplit

    from orchestrator.config import RegistrySpec

    service = next(d for d in _docs("registry.yaml") if d["kind"] == "Service")
    u = urlsplit(REGISTRY_URL)
    assert (u.hostname, u.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert RegistrySpec(url=REGISTRY_URL).url == REGISTRY_URL
    for name in ("registry.yaml", "orchestrator.yaml"):
        assert REGISTRY_URL in (DEPLOY / "kuberay" / name).read_text(), name


def test_the_registry_port_is_open_to_the_graceful_pods_only():
    policy = next(d for d in _docs("networkpolicy.yaml") if d["metadata"]["name"] == "graceful-registry")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "graceful-registry"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5432]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}},
                            {"podSelector": {"matchLabels": {"app": "graceful-controller"}}}]
