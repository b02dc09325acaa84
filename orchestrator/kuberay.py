"""Attach a candidate generation to a KubeRay RayService (`serving.attach: rayservice`).

The orchestrator (`graceful run`) may run as its own RayJob (deploy/kuberay/orchestrator.yaml):
it trains on that job's Ray cluster, while the router and the generation applications run
on the RayService's cluster. Two things rule out deploying a candidate there with Ray
Serve's API, the way `serving.deploy.add_generation` does on a laptop:

- KubeRay owns that cluster's Serve config declaratively: it applies the RayService's
  `spec.serveConfigV2` and would delete an application deployed beside it imperatively at
  its next reconcile;
- reaching the other cluster would need its Ray client port (10001), which no manifest
  exposes (docs/kubernetes.md, Security defaults).

So a candidate becomes one more application in `serveConfigV2`, written through the
Kubernetes API with the pod's service-account token (`with_generation_app`,
`RayServiceClient`). KubeRay applies it to the running cluster; the other applications keep
their import paths and args, so Serve leaves them, the router included, running. Then the
router's admin API attaches it (`POST /v1/admin/generations`), retried until Serve runs it.
`detach_via_rayservice` undoes both. The service account needs `get` and `patch` on that
one RayService (the Role in deploy/kuberay/orchestrator.yaml); nothing else.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import requests
import yaml

from serving.client import RouterClient, RouterError
from serving.refs import app_name_for

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.registry import Registry
    from serving.specs import RayServiceSpec

log = logging.getLogger("graceful.kuberay")

GENERATION_BUILDER = "orchestrator.apps:generation_app"
ROUTER_BUILDER = "orchestrator.apps:router_app"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Other writers of the RayService (an operator's kubectl, another orchestrator) only make
# a compare-and-set fail now and then; more failures in a row mean something is wrong.
CONFLICT_RETRIES = 5
ATTACH_POLL_S = 5.0

# GenerationSpec.name's rule (workers.specs), which serving.refs.ModelRef enforces too.
_GENERATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KubeRayError(RuntimeError):
    """The RayService could not be read or written, or the router did not attach or
    detach a generation (the message says which and why)."""


class ConflictError(KubeRayError):
    """The RayService changed since it was read (HTTP 409): read it again and retry."""


# --- serveConfigV2, pure ---------------------------------------------------------------------

def generation_app_entry(name: str, config_path: str) -> dict[str, Any]:
    """The `serveConfigV2` application of generation `name`, as deploy/kuberay/rayservice.yaml
    lists them: no HTTP route (only the router reaches it, by its name)."""
    _check_name(name)
    return {"name": app_name_for(name), "route_prefix": None, "import_path": GENERATION_BUILDER,
            "args": {"config": config_path, "generation": name}}


def with_generation_app(serve_config_v2: str, name: str, config_path: str) -> str:
    """`serve_config_v2` with generation `name`'s application added just before the router
    application, everything else unchanged. Returned unchanged (the same string) when that
    application is there already. ValueError when the config has no router application, or
    an application of that name that is not `name`'s generation application."""
    want = generation_app_entry(name, config_path)
    doc, apps = _load(serve_config_v2)
    router = _router_index(apps)
    present = _generation_app_index(apps, name)
    if present is not None:
        # An operator may have tuned it (deployments:, runtime_env:): present is enough.
        return serve_config_v2
    apps.insert(router, want)
    return _dump(doc)


def without_generation_app(serve_config_v2: str, name: str) -> str:
    """`serve_config_v2` without generation `name`'s application, everything else unchanged;
    the same string when it has none. ValueError when the config has no router application,
    or the router's args name `name`: a restarted router waits for every generation its args
    list, so removing the application would leave it unable to start."""
    _check_name(name)
    doc, apps = _load(serve_config_v2)
    args = apps[_router_index(apps)].get("args") or {}
    for key in ("candidates", "production"):
        listed = args.get(key)
        if listed == name or (isinstance(listed, list) and name in listed):
            raise ValueError(f"serveConfigV2: the router application's args.{key} lists {name!r}; take it out "
                             f"there first (which redeploys the router), then remove {app_name_for(name)}")
    present = _generation_app_index(apps, name)
    if present is None:
        return serve_config_v2
    del apps[present]
    return _dump(doc)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _GENERATION_NAME.fullmatch(name):
        raise ValueError(f"generation name {name!r}: letters, digits, _ . - (at most 64, starting with a "
                         f"letter or digit)")


def _load(serve_config_v2: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        doc = yaml.safe_load(serve_config_v2)
    except yaml.YAMLError as e:
        raise ValueError(f"serveConfigV2 is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"serveConfigV2 must be a mapping with `applications`, got {type(doc).__name__}")
    apps = doc.get("applications")
    if not isinstance(apps, list) or not all(isinstance(a, dict) for a in apps):
        raise ValueError("serveConfigV2: `applications` must be a list of mappings")
    return doc, apps


def _dump(doc: dict[str, Any]) -> str:
    # Key order kept so that the stored config reads like the manifest it came from.
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def _router_index(apps: list[dict[str, Any]]) -> int:
    routers = [i for i, a in enumerate(apps) if a.get("import_path") == ROUTER_BUILDER]
    if len(routers) != 1:
        found = "no" if not routers else f"{len(routers)}"
        raise ValueError(f"serveConfigV2 has {found} router application (import_path {ROUTER_BUILDER}), "
                         f"needs exactly one: generation applications are attached to it")
    return routers[0]


def _generation_app_index(apps: list[dict[str, Any]], name: str) -> Optional[int]:
    app = app_name_for(name)
    for i, a in enumerate(apps):
        if a.get("name") != app:
            continue
        args = a.get("args") or {}
        if a.get("import_path") != GENERATION_BUILDER or args.get("generation") != name:
            raise ValueError(f"serveConfigV2: application {app!r} is not generation {name!r}'s "
                             f"(import_path {a.get('import_path')!r}, args.generation {args.get('generation')!r}); "
                             f"the router finds generation {name!r} by that name only")
        return i
    return None


# --- the Kubernetes API ---------------------------------------------------------------------

class RayServiceClient:
    """Reads and compare-and-sets one RayService's `spec.serveConfigV2` through the
    Kubernetes API, as the pod's service account.

    `account_dir` holds the mounted `token`, `namespace` and `ca.crt`
    (/var/run/secrets/kubernetes.io/serviceaccount in a pod)."""

    def __init__(self, api_url: str, namespace: str, name: str, account_dir: Path = SERVICE_ACCOUNT_DIR,
                 timeout_s: float = 10.0, session: Optional[requests.Session] = None):
        self.api_url = api_url.rstrip("/")
        self.namespace = namespace
        self.name = name
        self.account_dir = Path(account_dir)
        self.timeout_s = timeout_s
        self._session = session or requests.Session()

    @classmethod
    def from_spec(cls, spec: "RayServiceSpec", account_dir: Path = SERVICE_ACCOUNT_DIR) -> "RayServiceClient":
        """`serving.rayservice`; no namespace there: the pod's own (its service account's)."""
        namespace = spec.namespace
        if namespace is None:
            path = Path(account_dir) / "namespace"
            try:
                namespace = path.read_text().strip()
            except OSError as e:
                raise KubeRayError(f"serving.rayservice.namespace is not set and {path} cannot be read "
                                   f"({type(e).__name__}); set the namespace, or run in a pod") from None
        return cls(spec.api_url, namespace, spec.name, account_dir)

    def close(self) -> None:
        self._session.close()

    @property
    def url(self) -> str:
        return f"{self.api_url}/apis/ray.io/v1/namespaces/{self.namespace}/rayservices/{self.name}"

    @property
    def where(self) -> str:
        return f"RayService {self.namespace}/{self.name}"

    def read(self) -> tuple[str, str]:
        """(serveConfigV2, metadata.resourceVersion) as the API server has them now."""
        obj = self._request("GET", "get")
        try:
            config, version = obj["spec"]["serveConfigV2"], obj["metadata"]["resourceVersion"]
        except (KeyError, TypeError):
            raise KubeRayError(f"{self.where} has no spec.serveConfigV2 (or no resourceVersion)") from None
        if not isinstance(config, str) or not isinstance(version, str):
            raise KubeRayError(f"{self.where}: spec.serveConfigV2 and metadata.resourceVersion must be strings")
        return config, version

    def replace(self, serve_config_v2: str, resource_version: str) -> str:
        """Write `serve_config_v2` if the RayService is still at `resource_version`
        (ConflictError otherwise); returns its new resourceVersion."""
        # A merge patch that carries resourceVersion is a compare-and-set: the API server
        # answers 409 when the object moved on. It touches serveConfigV2 only, so fields
        # other writers own (rayClusterConfig, status) are never sent back stale.
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"serveConfigV2": serve_config_v2}}
        obj = self._request("PATCH", "patch", body)
        return str((obj.get("metadata") or {}).get("resourceVersion", ""))

    def update(self, change: Callable[[str], str], retries: int = CONFLICT_RETRIES) -> bool:
        """Read serveConfigV2, write `change(it)` back with compare-and-set, reading again
        after a conflict (up to `retries` tries). False when `change` left it as it was
        (nothing written)."""
        for attempt in range(1, retries + 1):
            current, version = self.read()
            new = change(current)
            if new == current:
                return False
            try:
                self.replace(new, version)
                return True
            except ConflictError:
                log.info("%s changed while it was edited (409 Conflict); reading it again (try %d of %d)",
                         self.where, attempt, retries)
        raise KubeRayError(f"{self.where} changed under every one of {retries} edits (409 Conflict each time); "
                           f"is another process rewriting it in a loop?")

    def _token(self) -> str:
        # Read at every request: the kubelet rotates projected service-account tokens.
        path = self.account_dir / "token"
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise KubeRayError(f"no service-account token at {path} ({type(e).__name__}): run in a pod whose "
                               f"service account may edit the RayService (deploy/kuberay/orchestrator.yaml)") from None
        if not token:
            raise KubeRayError(f"the service-account token file {path} is empty")
        return token

    def _verify(self) -> Any:
        if not self.api_url.startswith("https://"):
            return True
        ca = self.account_dir / "ca.crt"
        # In a pod the API server's certificate is signed by the cluster's CA, mounted here;
        # an API URL outside the cluster falls back to the system's CAs.
        return str(ca) if ca.is_file() else True

    def _request(self, method: str, verb: str, body: Optional[dict] = None) -> dict:
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json"
        try:
            r = self._session.request(method, self.url, json=body, headers=headers, timeout=self.timeout_s,
                                      verify=self._verify())
        except requests.RequestException as e:
            raise KubeRayError(f"cannot reach the Kubernetes API at {self.api_url} ({type(e).__name__})") from None
        if r.status_code < 400:
            try:
                return r.json()
            except ValueError:
                raise KubeRayError(f"{self.where}: the Kubernetes API answered {r.status_code} without JSON") from None
        why = _status_message(r)
        if r.status_code == 409:
            raise ConflictError(f"{self.where} changed since it was read: {why}")
        if r.status_code == 401:
            raise KubeRayError(f"the Kubernetes API at {self.api_url} refused the service-account token (401): {why}")
        if r.status_code == 403:
            raise KubeRayError(f"the service account may not {verb} {self.where} (403 Forbidden): {why}. Bind the "
                               f"Role of deploy/kuberay/orchestrator.yaml (get, patch on rayservices.ray.io "
                               f"{self.name!r}) to the pod's service account")
        if r.status_code == 404:
            raise KubeRayError(f"no {self.where} (404): check serving.rayservice.name and .namespace")
        raise KubeRayError(f"{method} {self.where}: the Kubernetes API answered {r.status_code}: {why}")


def _status_message(r: requests.Response) -> str:
    """The message of a Kubernetes Status object (it names the object and the verb, no
    credentials), else the start of the body."""
    try:
        obj = r.json()
    except ValueError:
        return r.text[:300]
    return str(obj.get("message") or obj)[:300] if isinstance(obj, dict) else str(obj)[:300]


# --- attach and detach -----------------------------------------------------------------------

def attach_via_rayservice(cfg: "RunConfig", reg: "Registry", *, account_dir: Path = SERVICE_ACCOUNT_DIR,
                          poll_s: float = ATTACH_POLL_S, sleep: Callable[[float], None] = time.sleep,
                          clock: Callable[[], float] = time.monotonic) -> Callable[[str], None]:
    """`attach(name)` (see `orchestrator.apps.attach_on_cluster`): check `name`'s checkpoint
    against the registry, add its application to the RayService's serveConfigV2, then attach
    it to the router at `serving.host:serving.port` as a shadow, retrying until Serve runs it
    (at most `serving.rayservice.ready_timeout_s`). Idempotent: an application or an
    attachment already there is kept."""
    if cfg.serving.in_router_models:
        raise ValueError("serving.attach: rayservice adds one Serve application per generation; "
                         "serving.in_router_models (models inside the router) cannot be attached that way")

    def attach(name: str) -> None:
        from orchestrator.registry import ensure_registered

        spec = cfg.serving
        token = _admin_token(cfg)
        rec = ensure_registered(cfg, reg, name, "rollout")
        # The RayService verifies it again as it builds the application, but by then the
        # change is in serveConfigV2: changed bytes must not get that far.
        reg.verify_checkpoint(name)
        kube = RayServiceClient.from_spec(spec.rayservice, account_dir)
        app = app_name_for(name)
        try:
            if kube.update(lambda current: with_generation_app(current, name, spec.rayservice.config_path)):
                log.info("added %s to %s's serveConfigV2", app, kube.where)
            else:
                log.info("%s is in %s's serveConfigV2 already", app, kube.where)
        finally:
            kube.close()
        _attach_when_running(RouterClient(cfg.serving.base_url(), token), name, app, rec.sha256,
                             spec.rayservice.ready_timeout_s, poll_s, sleep, clock)

    return attach


def detach_via_rayservice(cfg: "RunConfig", name: str, *, account_dir: Path = SERVICE_ACCOUNT_DIR) -> None:
    """Detach generation `name` from the router (it must serve no traffic), then remove its
    application from the RayService's serveConfigV2. Idempotent: a generation that is not
    attached, or has no application, is skipped. The application stays when the router
    cannot confirm the detach, since a router still holding it would call a deleted app."""
    _check_name(name)
    router = RouterClient(cfg.serving.base_url(), _admin_token(cfg))
    try:
        router.detach(name)
        log.info("detached %s from the router", name)
    except RouterError as e:
        if e.status == 404 and "not attached" in _router_message(e):
            log.info("%s is not attached to the router", name)
        else:
            raise KubeRayError(f"the router at {router.base_url} did not detach {name!r}: {_describe(e)}; "
                               f"its application stays in the RayService") from None
    except requests.RequestException as e:
        raise KubeRayError(f"cannot reach the router at {router.base_url} to detach {name!r} "
                           f"({type(e).__name__}); its application stays in the RayService") from None
    finally:
        router.close()
    kube = RayServiceClient.from_spec(cfg.serving.rayservice, account_dir)
    try:
        if kube.update(lambda current: without_generation_app(current, name)):
            log.info("removed %s from %s's serveConfigV2", app_name_for(name), kube.where)
    finally:
        kube.close()


def _admin_token(cfg: "RunConfig") -> str:
    token = cfg.serving.resolved_admin_token()
    if not token:
        raise KubeRayError(f"no admin token for the router's /v1/admin routes: set serving.admin_token or the "
                           f"environment variable {cfg.serving.admin_token_env} (the RayService's "
                           f"graceful-admin-token Secret)")
    return token


def _router_message(e: RouterError) -> str:
    return str(e.body.get("error") if isinstance(e.body, dict) else e.body)


def _describe(e: RouterError) -> str:
    return f"{e.status}: {_router_message(e)[:300]}"


def _attach_when_running(router: RouterClient, name: str, app: str, sha256: str, timeout_s: float, poll_s: float,
                         sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
    """POST the attach until the router takes it. Not yet: 404 (Serve has no running app of
    that name yet; KubeRay applies serveConfigV2 on its own schedule, then Serve builds the
    app), 5xx or no answer (the router or the proxy restarting). Final: 401, 403 (the
    token), 409 (already attached: done; other bytes or another input shape: refused), any
    other 4xx."""
    deadline = clock() + timeout_s
    try:
        while True:
            try:
                router.attach(name, app, sha256, shadow=True)
                log.info("attached %s (%s) to the router as a shadow", name, app)
                return
            except RouterError as e:
                msg = _router_message(e)
                if e.status in (401, 403):
                    raise KubeRayError(f"the router at {router.base_url} refused the admin token ({e.status}): "
                                       f"serving.admin_token (or its environment variable) must be the "
                                       f"RayService's token") from None
                if e.status == 409 and "already attached" in msg:
                    log.info("%s is attached to the router already", name)
                    return
                if e.status != 404 and e.status < 500:
                    raise KubeRayError(f"the router refused to attach {name!r} ({app}): {_describe(e)}") from None
                why = _describe(e)
            except requests.RequestException as e:
                why = f"no answer ({type(e).__name__})"
            left = deadline - clock()
            if left <= 0:
                raise KubeRayError(f"{app} was not attached within {timeout_s:g} s "
                                   f"(serving.rayservice.ready_timeout_s); the router's last answer: {why}. "
                                   f"Check `kubectl describe rayservice` for the application's status")
            log.info("waiting for the RayService to run %s (%.0f s left): %s", app, left, why)
            sleep(min(poll_s, left))
    finally:
        router.close()
