"""The controller's small HTTP endpoint: `/metrics`, `GET /v1/rollout`, `/healthz`, and
Alertmanager's webhook `POST /v1/admin/alert` (bearer token: the admin token).

The webhook body is parsed by the pure `alert_rollbacks`; what it asks for becomes
rollback commands in the registry's queue, applied by the controller at its next tick
like any operator command.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.registry import CommandKind, Registry

log = logging.getLogger("graceful.controller")


def alert_rollbacks(payload: Any, candidate: Optional[str]) -> tuple[list[str], int]:
    """(rollback reasons, alerts ignored) of an Alertmanager webhook body.

    A firing alert whose label `candidate` or `generation` names `candidate` asks for a
    rollback, with reason "alert NAME: SUMMARY"; resolved alerts and other generations are
    ignored. ValueError for a body that is not Alertmanager's shape. Example: two firing
    alerts for g1 and one resolved -> (["alert A", "alert B: flips"], 1)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise ValueError("body must be an Alertmanager webhook object with an 'alerts' list")
    reasons, ignored = [], 0
    for a in payload["alerts"]:
        if not isinstance(a, dict) or not isinstance(a.get("labels", {}), dict):
            raise ValueError("each alert must be an object with a 'labels' object")
        labels = a.get("labels") or {}
        status = a.get("status", payload.get("status"))
        named = labels.get("candidate") or labels.get("generation")
        if candidate is None or status != "firing" or named != candidate:
            ignored += 1
            continue
        name = str(labels.get("alertname", "unnamed alert"))
        summary = (a.get("annotations") or {}).get("summary")
        reasons.append(f"alert {name}" + (f": {summary}" if summary else ""))
    return reasons, ignored


def handle_alerts(registry: Registry, payload: Any) -> dict:
    """Queue one rollback (actor "alert") of the active rollout's candidate for the
    webhook's firing alerts, unless one is queued already."""
    r = registry.active_rollout()
    reasons, ignored = alert_rollbacks(payload, r.candidate if r else None)
    out: dict[str, Any] = {"rollbacks": [], "ignored": ignored, "candidate": r.candidate if r else None}
    for why in reasons:
        if any(c.command == CommandKind.ROLLBACK for c in registry.pending_commands(r.id)):
            out["ignored"] += 1
            continue
        out["rollbacks"].append(registry.enqueue_command(r.id, CommandKind.ROLLBACK, "alert", why).id)
    return out


def serve_http(controller: Any, host: str, port: int, token: Optional[str]) -> Optional["ControllerHTTP"]:
    """Start the endpoint in a daemon thread; None when `port` is 0 (off)."""
    if not port:
        return None
    server = ControllerHTTP((host, port), controller, token)
    threading.Thread(target=server.serve_forever, name="controller-http", daemon=True).start()
    return server


class ControllerHTTP(ThreadingHTTPServer):
    daemon_threads = True
    MAX_BODY = 1_000_000

    def __init__(self, addr: tuple[str, int], controller: Any, token: Optional[str]):
        self.controller = controller
        self.token = token
        super().__init__(addr, _Handler)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ControllerHTTP
    # A client that sends less body than its Content-Length would otherwise pin a thread
    # in rfile.read forever.
    timeout = 10

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: requests go to the debug log
        log.debug("http %s", fmt % args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, default=str).encode())

    def do_GET(self) -> None:
        c = self.server.controller
        if self.path == "/metrics":
            self._send(200, c.metrics.text(), CONTENT_TYPE_LATEST)
        elif self.path == "/v1/rollout":
            r = c.current()
            self._json(200, {"rollout": r.as_dict() if r else None,
                             "last_tick": c.last.as_dict() if c.last else None,
                             "source": c.source.name, "consecutive_source_errors": c.source_errors})
        elif self.path == "/healthz":
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/v1/admin/alert":
            self._json(404, {"error": f"no route {self.path}"})
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self._json(401, {"error": "missing bearer token"})
            return
        token = self.server.token
        if not token or not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            self._json(403, {"error": "wrong admin token" if token else "admin is off: no token configured"})
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0 or n > self.server.MAX_BODY:
            self._json(413 if n > 0 else 400, {"error": "bad Content-Length"})
            return
        try:
            payload = json.loads(self.rfile.read(n) or b"null")
            out = handle_alerts(self.server.controller.registry, payload)
        except (ValueError, UnicodeDecodeError) as e:
            self._json(400, {"error": f"bad alert body: {e}"})
            return
        except Exception as e:
            log.exception("alert webhook failed")
            self._json(500, {"error": f"{type(e).__name__}: {e}"})
            return
        self._json(200, out)
