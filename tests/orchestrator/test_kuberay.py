"""orchestrator.kuberay: the serveConfigV2 edits (hand cases), and the RayService client,
attach and detach against a fake Kubernetes API server and a fake router (both plain
http.server on 127.0.0.1, ephemeral ports). Nothing here starts Ray or waits: the attach's
clock and sleep are fakes."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import yaml

from orchestrator.config import load_config
from orchestrator.kuberay import (CONFLICT_RETRIES, GENERATION_BUILDER, KubeRayError, RayServiceClient,
                                  attach_via_rayservice, detach_via_rayservice, generation_app_entry,
                                  with_generation_app, without_generation_app)
from orchestrator.registry import IntegrityError, Registry

SA_TOKEN = "sa-token-5f2c9e7d1b"
ADMIN_TOKEN = "admin-token-8a1f3c6e"
NAMESPACE = "graceful-ns"
# Fakes answer at most this many requests, so a client looping on them fails instead of hanging.
MAX_REQUESTS = 60

SERVE_CONFIG = """\
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: graceful-gen-g0
    route_prefix: null
    import_path: orchestrator.apps:generation_app
    args: {config: /config/run.yaml, generation: g0}
  - name: graceful
    route_prefix: /
    import_path: orchestrator.apps:router_app
    args: {config: /config/run.yaml, candidates: []}
"""


def _apps(serve_config: str) -> list[dict]:
    return yaml.safe_load(serve_config)["applications"]


def _names(serve_config: str) -> list[str]:
    return [a["name"] for a in _apps(serve_config)]


# --- with_generation_app / without_generation_app ------------------------------------------

def test_with_generation_app_adds_the_app_just_before_the_router():
    out = with_generation_app(SERVE_CONFIG, "g1", "/config/run.yaml")
    assert _names(out) == ["graceful-gen-g0", "graceful-gen-g1", "graceful"]
    assert _apps(out)[1] == {"name": "graceful-gen-g1", "route_prefix": None, "import_path": GENERATION_BUILDER,
                             "args": {"config": "/config/run.yaml", "generation": "g1"}}
    assert _apps(out)[1] == generation_app_entry("g1", "/config/run.yaml")


def test_with_generation_app_leaves_every_other_application_and_key_unchanged():
    before = yaml.safe_load(SERVE_CONFIG)
    after = yaml.safe_load(with_generation_app(SERVE_CONFIG, "g1", "/etc/graceful/run.yaml"))
    assert after["http_options"] == before["http_options"]
    assert set(after) == set(before)
    assert [a for a in after["applications"] if a["name"] != "graceful-gen-g1"] == before["applications"]
    assert _apps(yaml.safe_dump(after))[1]["args"]["config"] == "/etc/graceful/run.yaml"


def test_with_generation_app_returns_the_same_string_when_the_app_is_there():
    once = with_generation_app(SERVE_CONFIG, "g1", "/config/run.yaml")
    assert with_generation_app(once, "g1", "/config/run.yaml") is once
    assert with_generation_app(SERVE_CONFIG, "g0", "/config/run.yaml") is SERVE_CONFIG


def test_with_generation_app_keeps_an_app_an_operator_tuned():
    doc = yaml.safe_load(SERVE_CONFIG)
    doc["applications"][0]["deployments"] = [{"name": "model", "num_replicas": 3}]
    tuned = yaml.safe_dump(doc)
    assert with_generation_app(tuned, "g0", "/config/run.yaml") is tuned


def test_without_generation_app_removes_only_that_app():
    both = with_generation_app(SERVE_CONFIG, "g1", "/config/run.yaml")
    out = without_generation_app(both, "g1")
    assert yaml.safe_load(out) == yaml.safe_load(SERVE_CONFIG)
    assert without_generation_app(out, "g1") is out  # nothing to remove: unchanged


def test_without_generation_app_refuses_a_generation_the_router_args_list():
    doc = yaml.safe_load(with_generation_app(SERVE_CONFIG, "g1", "/config/run.yaml"))
    doc["applications"][-1]["args"]["candidates"] = ["g1"]
    with pytest.raises(ValueError, match=r"args\.candidates lists 'g1'.*redeploys the router"):
        without_generation_app(yaml.safe_dump(doc), "g1")
    doc["applications"][-1]["args"] = {"config": "/config/run.yaml", "production": "g0"}
    with pytest.raises(ValueError, match=r"args\.production lists 'g0'"):
        without_generation_app(yaml.safe_dump(doc), "g0")


def test_a_serve_config_without_a_router_application_is_refused():
    doc = yaml.safe_load(SERVE_CONFIG)
    doc["applications"] = doc["applications"][:1]
    with pytest.raises(ValueError, match=r"has no router application \(import_path orchestrator\.apps:router_app\)"):
        with_generation_app(yaml.safe_dump(doc), "g1", "/config/run.yaml")
    with pytest.raises(ValueError, match="has no router application"):
        without_generation_app(yaml.safe_dump(doc), "g0")
    doc = yaml.safe_load(SERVE_CONFIG)
    doc["applications"].append({**doc["applications"][1], "name": "graceful-2", "route_prefix": "/b"})
    with pytest.raises(ValueError, match="has 2 router application"):
        with_generation_app(yaml.safe_dump(doc), "g1", "/config/run.yaml")


@pytest.mark.parametrize("name", ["", "-g1", "g 1", "../g1", "g1/x", "g" * 65, "g1\n", None])
def test_an_invalid_generation_name_is_refused(name):
    with pytest.raises(ValueError, match="generation name"):
        with_generation_app(SERVE_CONFIG, name, "/config/run.yaml")
    with pytest.raises(ValueError, match="generation name"):
        without_generation_app(SERVE_CONFIG, name)


def test_an_application_of_that_name_built_otherwise_is_refused():
    doc = yaml.safe_load(SERVE_CONFIG)
    doc["applications"].insert(0, {"name": "graceful-gen-g1", "import_path": "mypkg.app:build", "args": {}})
    with pytest.raises(ValueError, match=r"'graceful-gen-g1' is not generation 'g1''s .*mypkg\.app:build"):
        with_generation_app(yaml.safe_dump(doc), "g1", "/config/run.yaml")
    with pytest.raises(ValueError, match="is not generation 'g1''s"):
        without_generation_app(yaml.safe_dump(doc), "g1")


@pytest.mark.parametrize("text, why", [("applications: [", "not valid YAML"),
                                       ("- a\n- b\n", "must be a mapping"),
                                       ("applications: {a: 1}\n", "must be a list of mappings"),
                                       ("http_options: {}\n", "must be a list of mappings")])
def test_a_serve_config_that_is_not_one_is_refused(text, why):
    with pytest.raises(ValueError, match=why):
        with_generation_app(text, "g1", "/config/run.yaml")


# --- a fake Kubernetes API server and a fake router ----------------------------------------

def _serve(handler_cls: type, owner: Any) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    server.owner = owner  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # quiet test output
        pass

    def _body(self) -> Optional[dict]:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n)) if n else None

    def _answer(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        body = self._body()
        with owner.lock:
            owner.requests.append({"method": self.command, "path": self.path, "body": body,
                                   "authorization": self.headers.get("Authorization"),
                                   "content_type": self.headers.get("Content-Type")})
            if len(owner.requests) > MAX_REQUESTS:
                return self._answer(500, {"message": "fake server: too many requests", "error": "too many"})
            status, obj = owner.handle(self.command, self.path, self.headers, body)
        self._answer(status, obj)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle


def _status(code: int, reason: str, message: str) -> tuple[int, dict]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                  "reason": reason, "code": code}


class FakeKubernetes:
    """One RayService behind GET and merge PATCH, with resourceVersion compare-and-set."""

    def __init__(self, serve_config: str = SERVE_CONFIG, name: str = "graceful", namespace: str = NAMESPACE):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.token = SA_TOKEN
        self.path = f"/apis/ray.io/v1/namespaces/{namespace}/rayservices/{name}"
        self.version = 1
        self.obj = {"apiVersion": "ray.io/v1", "kind": "RayService",
                    "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
                    "spec": {"serveConfigV2": serve_config, "rayClusterConfig": {"rayVersion": "2.60.0"}}}
        self.writes_before_patch = 0     # another writer changes it just before that many PATCHes
        self.forbidden: set[str] = set()  # verbs answered 403
        self.server, self.thread = _serve(_Handler, self)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def serve_config(self) -> str:
        return self.obj["spec"]["serveConfigV2"]

    def patches(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "PATCH"]

    def _bump(self) -> None:
        self.version += 1
        self.obj["metadata"]["resourceVersion"] = str(self.version)

    def _other_writer(self) -> None:
        doc = yaml.safe_load(self.serve_config)
        doc["applications"].insert(0, generation_app_entry("g9", "/config/run.yaml"))
        self.obj["spec"]["serveConfigV2"] = yaml.safe_dump(doc, sort_keys=False)
        self._bump()

    def handle(self, method: str, path: str, headers: Any, body: Optional[dict]) -> tuple[int, dict]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        verb = {"GET": "get", "PATCH": "patch", "PUT": "update"}.get(method, method.lower())
        if verb in self.forbidden:
            return _status(403, "Forbidden", f'rayservices.ray.io "graceful" is forbidden: User '
                                             f'"system:serviceaccount:{NAMESPACE}:default" cannot {verb} resource '
                                             f'"rayservices" in API group "ray.io" in the namespace "{NAMESPACE}"')
        if path != self.path:
            return _status(404, "NotFound", f'rayservices.ray.io "{path.rsplit("/", 1)[-1]}" not found')
        if method == "GET":
            return 200, json.loads(json.dumps(self.obj))
        if method != "PATCH":
            return _status(405, "MethodNotAllowed", method)
        if headers.get("Content-Type") != "application/merge-patch+json":
            return _status(415, "UnsupportedMediaType", headers.get("Content-Type") or "none")
        if self.writes_before_patch > 0:
            self.writes_before_patch -= 1
            self._other_writer()
        asked = (body.get("metadata") or {}).get("resourceVersion")
        if asked is not None and asked != self.obj["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", 'Operation cannot be fulfilled on rayservices.ray.io "graceful": the '
                                            'object has been modified; please apply your changes to the latest '
                                            'version and try again')
        self.obj["spec"].update(body.get("spec") or {})
        self._bump()
        return 200, json.loads(json.dumps(self.obj))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class FakeRouter:
    """The router's admin routes for generations, answering as serving/router.py does: 404
    while Serve runs no application of that name (here: until it is in the fake RayService's
    serveConfigV2 and `not_running` answers have been given), 409 when already attached or
    serving other bytes, 401/403 for the token."""

    def __init__(self, kube: FakeKubernetes, sha256: dict[str, str]):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.kube = kube
        self.sha256 = sha256
        self.token = ADMIN_TOKEN
        self.not_running: list[int] = []   # statuses answered first: 404 (no app yet), 503 (proxy)
        self.attached: dict[str, str] = {}
        self.with_traffic: set[str] = set()
        self.server, self.thread = _serve(_Handler, self)
        self.port = self.server.server_address[1]

    def attaches(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def handle(self, method: str, path: str, headers: Any, body: Optional[dict]) -> tuple[int, dict]:
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            return 401, {"error": "admin route: missing bearer token (Authorization: Bearer ...)"}
        if auth[7:] != self.token:
            return 403, {"error": "admin route: token refused"}
        if method == "POST" and path == "/v1/admin/generations":
            name, app = body["name"], body["app"]
            if self.not_running:
                status = self.not_running.pop(0)
                if status == 503:
                    return 503, {"error": "Service Unavailable"}
                return 404, {"error": f"app {app!r} is not a running generation (RayServeException)"}
            if app not in _names(self.kube.serve_config):
                return 404, {"error": f"app {app!r} is not a running generation (RayServeException)"}
            if name in self.attached:
                return 409, {"error": f"generation {name!r} is already attached"}
            if body["sha256"] != self.sha256[name]:
                return 409, {"error": f"app {app!r} serves sha256 {self.sha256[name][:12]}..., "
                                      f"not {body['sha256'][:12]}..."}
            self.attached[name] = app
            return 200, {"production": "g0", "weights": {"g0": 1.0, **{g: 0.0 for g in self.attached}}}
        if method == "DELETE" and path.startswith("/v1/admin/generations/"):
            name = path.rsplit("/", 1)[-1]
            if name not in self.attached:
                return 404, {"error": f"generation {name!r} is not attached"}
            if name in self.with_traffic:
                return 409, {"error": f"generation {name!r} still serves traffic; set its weight to 0 first"}
            del self.attached[name]
            return 200, {"production": "g0", "weights": {"g0": 1.0}}
        return 404, {"error": "Not Found"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class FakeClock:
    """monotonic() and sleep() of the attach loop: sleeping moves time, nothing waits."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


@pytest.fixture
def kube():
    k = FakeKubernetes()
    yield k
    k.close()


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "g1.pt"
    path.write_bytes(b"the weights of g1")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def router(kube, checkpoint):
    r = FakeRouter(kube, {"g1": checkpoint[1]})
    yield r
    r.close()


@pytest.fixture
def account(tmp_path) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(SA_TOKEN + "\n")
    (d / "namespace").write_text(NAMESPACE)
    return d


@pytest.fixture
def reg(tmp_path, checkpoint):
    path, sha = checkpoint
    with Registry(tmp_path / "registry.sqlite") as r:
        r.add_generation("g1", None, "cnn1d", "hash-g1", str(path), sha)
        yield r


def _cfg(tmp_path: Path, kube: FakeKubernetes, router: FakeRouter, **serving: Any):
    doc = {"run_dir": str(tmp_path / "run"), "generations": [{"name": "g0"}, {"name": "g1"}],
           "serving": {"attach": "rayservice", "host": "127.0.0.1", "port": router.port,
                       "admin_token": ADMIN_TOKEN,
                       "rayservice": {"api_url": kube.url, "ready_timeout_s": 120}, **serving}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    return load_config(tmp_path / "run.yaml")


def _attach(cfg, reg, account: Path, clock: Optional[FakeClock] = None):
    clock = clock or FakeClock()
    return attach_via_rayservice(cfg, reg, account_dir=account, poll_s=5.0, sleep=clock.sleep, clock=clock)


# --- attach ---------------------------------------------------------------------------------

def test_attach_adds_the_app_then_attaches_it_once_serve_runs_it(tmp_path, kube, router, account, reg, checkpoint):
    router.not_running = [404, 503]  # Serve is still building it, then the proxy restarts
    clock = FakeClock()
    _attach(_cfg(tmp_path, kube, router), reg, account, clock)("g1")

    assert _names(kube.serve_config) == ["graceful-gen-g0", "graceful-gen-g1", "graceful"]
    assert router.attached == {"g1": "graceful-gen-g1"}
    posts = router.attaches()
    assert len(posts) == 3 and len(clock.sleeps) == 2
    assert posts[-1]["body"] == {"name": "g1", "app": "graceful-gen-g1", "sha256": checkpoint[1], "shadow": True}
    assert {p["authorization"] for p in posts} == {f"Bearer {ADMIN_TOKEN}"}
    # the Kubernetes API got the service-account token, a read, then one compare-and-set
    assert [r["method"] for r in kube.requests] == ["GET", "PATCH"]
    assert {r["authorization"] for r in kube.requests} == {f"Bearer {SA_TOKEN}"}
    patch = kube.patches()[0]
    assert patch["content_type"] == "application/merge-patch+json"
    assert patch["body"]["metadata"] == {"resourceVersion": "1"}
    assert set(patch["body"]) == {"metadata", "spec"} and set(patch["body"]["spec"]) == {"serveConfigV2"}


def test_a_conflicting_write_is_read_again_and_retried_keeping_the_other_change(tmp_path, kube, router, account, reg):
    kube.writes_before_patch = 1  # someone else edits the RayService between our read and write
    _attach(_cfg(tmp_path, kube, router), reg, account)("g1")

    assert [r["method"] for r in kube.requests] == ["GET", "PATCH", "GET", "PATCH"]
    assert [p["body"]["metadata"]["resourceVersion"] for p in kube.patches()] == ["1", "2"]
    assert _names(kube.serve_config) == ["graceful-gen-g9", "graceful-gen-g0", "graceful-gen-g1", "graceful"]
    assert router.attached == {"g1": "graceful-gen-g1"}


def test_conflicts_on_every_try_give_up_after_a_few(tmp_path, kube, router, account, reg):
    kube.writes_before_patch = 10 ** 6
    with pytest.raises(KubeRayError, match=f"changed under every one of {CONFLICT_RETRIES} edits"):
        _attach(_cfg(tmp_path, kube, router), reg, account)("g1")
    assert len(kube.patches()) == CONFLICT_RETRIES
    assert router.requests == []


def test_attach_twice_writes_nothing_and_attaches_nothing_more(tmp_path, kube, router, account, reg):
    attach = _attach(_cfg(tmp_path, kube, router), reg, account)
    attach("g1")
    config = kube.serve_config
    attach("g1")  # the controller re-attaching after a router restart, say
    assert kube.serve_config == config
    assert [r["method"] for r in kube.requests] == ["GET", "PATCH", "GET"]
    assert len(router.attaches()) == 2 and router.attached == {"g1": "graceful-gen-g1"}


def test_a_forbidden_patch_fails_fast_naming_the_role(tmp_path, kube, router, account, reg):
    kube.forbidden = {"patch"}
    with pytest.raises(KubeRayError) as e:
        _attach(_cfg(tmp_path, kube, router), reg, account)("g1")
    msg = str(e.value)
    assert "may not patch RayService graceful-ns/graceful (403 Forbidden)" in msg
    assert "deploy/kuberay/orchestrator.yaml" in msg and "cannot patch resource" in msg
    assert len(kube.patches()) == 1 and router.requests == []
    assert SA_TOKEN not in msg


def test_a_router_refusing_the_admin_token_fails_fast(tmp_path, kube, router, account, reg):
    router.token = "another-admin-token"
    clock = FakeClock()
    with pytest.raises(KubeRayError, match=r"refused the admin token \(403\)"):
        _attach(_cfg(tmp_path, kube, router), reg, account, clock)("g1")
    assert len(router.attaches()) == 1 and clock.sleeps == []


def test_a_router_serving_other_bytes_fails_fast(tmp_path, kube, router, account, reg):
    router.sha256["g1"] = "0" * 64
    with pytest.raises(KubeRayError, match=r"refused to attach 'g1' \(graceful-gen-g1\): 409: .* serves sha256 000000"):
        _attach(_cfg(tmp_path, kube, router), reg, account)("g1")
    assert len(router.attaches()) == 1


def test_an_app_that_never_runs_times_out_with_the_last_answer(tmp_path, kube, router, account, reg):
    router.not_running = [404] * 1000
    clock = FakeClock()
    cfg = _cfg(tmp_path, kube, router, rayservice={"api_url": kube.url, "ready_timeout_s": 30})
    with pytest.raises(KubeRayError, match=r"graceful-gen-g1 was not attached within 30 s .*404: app "
                                           r"'graceful-gen-g1' is not a running generation"):
        _attach(cfg, reg, account, clock)("g1")
    assert len(router.attaches()) == 7 and sum(clock.sleeps) == 30  # polled every 5 s, the last one at 30 s


def test_a_changed_checkpoint_is_never_added(tmp_path, kube, router, account, reg, checkpoint):
    checkpoint[0].write_bytes(b"other weights")
    with pytest.raises(IntegrityError, match="was changed or truncated"):
        _attach(_cfg(tmp_path, kube, router), reg, account)("g1")
    assert kube.requests == [] and router.requests == []


def test_no_admin_token_is_refused_before_anything_is_written(tmp_path, kube, router, account, reg, monkeypatch):
    monkeypatch.delenv("GRACEFUL_ADMIN_TOKEN", raising=False)
    cfg = _cfg(tmp_path, kube, router, admin_token=None)
    with pytest.raises(KubeRayError, match="no admin token .* GRACEFUL_ADMIN_TOKEN"):
        _attach(cfg, reg, account)("g1")
    assert kube.requests == [] and router.requests == []


def test_models_inside_the_router_cannot_be_attached_through_the_rayservice(tmp_path, kube, router, account, reg):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="serving: attach: rayservice .* in_router_models"):
        _cfg(tmp_path, kube, router, in_router_models=True)


# --- detach ---------------------------------------------------------------------------------

def test_detach_detaches_then_removes_the_app(tmp_path, kube, router, account, reg):
    cfg = _cfg(tmp_path, kube, router)
    _attach(cfg, reg, account)("g1")
    detach_via_rayservice(cfg, "g1", account_dir=account)
    assert router.attached == {}
    assert yaml.safe_load(kube.serve_config) == yaml.safe_load(SERVE_CONFIG)
    deletes = [r for r in router.requests if r["method"] == "DELETE"]
    assert [d["path"] for d in deletes] == ["/v1/admin/generations/g1"]
    assert deletes[0]["authorization"] == f"Bearer {ADMIN_TOKEN}"
    writes = len(kube.patches())
    detach_via_rayservice(cfg, "g1", account_dir=account)  # again: nothing attached, nothing to remove
    assert len(kube.patches()) == writes
    # get and patch: all that the Role of deploy/kuberay/orchestrator.yaml grants
    assert {r["method"] for r in kube.requests} == {"GET", "PATCH"}


def test_detach_keeps_the_app_while_the_router_routes_to_it(tmp_path, kube, router, account, reg):
    cfg = _cfg(tmp_path, kube, router)
    _attach(cfg, reg, account)("g1")
    router.with_traffic.add("g1")
    config = kube.serve_config
    with pytest.raises(KubeRayError, match=r"did not detach 'g1': 409: .*still serves traffic.*application stays"):
        detach_via_rayservice(cfg, "g1", account_dir=account)
    assert kube.serve_config == config and len(kube.patches()) == 1


# --- the client -----------------------------------------------------------------------------

def test_the_token_is_read_again_for_every_request(tmp_path, kube, account):
    client = RayServiceClient(kube.url, NAMESPACE, "graceful", account)
    client.read()
    (account / "token").write_text("rotated-token-77")  # the kubelet rotates projected tokens
    kube.token = "rotated-token-77"
    assert client.read()[1] == "1"
    assert [r["authorization"] for r in kube.requests] == [f"Bearer {SA_TOKEN}", "Bearer rotated-token-77"]


def test_the_namespace_is_the_pods_when_not_configured(tmp_path, kube, router, account):
    cfg = _cfg(tmp_path, kube, router)
    assert cfg.serving.rayservice.namespace is None
    client = RayServiceClient.from_spec(cfg.serving.rayservice, account)
    assert client.url == f"{kube.url}/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/graceful"
    (account / "namespace").unlink()
    with pytest.raises(KubeRayError, match=r"serving\.rayservice\.namespace is not set and .*namespace cannot be read"):
        RayServiceClient.from_spec(cfg.serving.rayservice, account)


def test_a_missing_rayservice_or_token_is_named(tmp_path, kube, account):
    with pytest.raises(KubeRayError, match=r"no RayService graceful-ns/other \(404\)"):
        RayServiceClient(kube.url, NAMESPACE, "other", account).read()
    (account / "token").unlink()
    with pytest.raises(KubeRayError, match="no service-account token at .*token"):
        RayServiceClient(kube.url, NAMESPACE, "graceful", account).read()
    (account / "token").write_text("not-the-token")
    with pytest.raises(KubeRayError, match=r"refused the service-account token \(401\)"):
        RayServiceClient(kube.url, NAMESPACE, "graceful", account).read()


def test_https_is_verified_with_the_service_account_ca(account):
    class Session:
        def __init__(self):
            self.calls: list[dict] = []

        def request(self, method, url, **kw):
            self.calls.append({"method": method, "url": url, **kw})
            raise requests.ConnectionError("no cluster here")

    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    session = Session()
    client = RayServiceClient("https://kubernetes.default.svc", NAMESPACE, "graceful", account, session=session)
    with pytest.raises(KubeRayError, match=r"cannot reach the Kubernetes API at https://kubernetes.default.svc "
                                           r"\(ConnectionError\)"):
        client.read()
    assert session.calls[0]["verify"] == str(account / "ca.crt")
    assert session.calls[0]["url"] == "https://kubernetes.default.svc/apis/ray.io/v1/namespaces/graceful-ns/rayservices/graceful"


def test_no_token_reaches_the_logs_or_the_errors(tmp_path, kube, router, account, reg, caplog):
    caplog.set_level(logging.DEBUG)
    router.not_running = [404]
    kube.writes_before_patch = 1
    cfg = _cfg(tmp_path, kube, router)
    _attach(cfg, reg, account)("g1")
    router.with_traffic.add("g1")
    errors = []
    for call in (lambda: detach_via_rayservice(cfg, "g1", account_dir=account),
                 lambda: (kube.forbidden.add("get"), detach_via_rayservice(cfg, "g0", account_dir=account))):
        with pytest.raises(KubeRayError) as e:
            call()
        errors.append(str(e.value))
    text = caplog.text + "\n".join(errors)
    assert "graceful-gen-g1" in caplog.text  # it did log the progress
    assert SA_TOKEN not in text and ADMIN_TOKEN not in text
