"""HTTP client of the router, for the rollout controller, the CLI and tests.

Reads status and moves traffic over HTTP only, so the controller may run in any process.
Errors from the router (4xx/5xx) raise `RouterError` carrying its JSON message.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import requests


class RouterError(RuntimeError):
    """The router answered with an error status; `status` and `body` tell which."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        msg = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"router answered {status}: {msg}")


class RouterClient:
    """`RouterClient("http://127.0.0.1:8000", token)`; admin calls need the token."""

    def __init__(self, base_url: str, admin_token: Optional[str] = None, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.timeout_s = timeout_s
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def _call(self, method: str, path: str, body: Optional[dict] = None, admin: bool = False) -> dict:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if admin and self.admin_token else {}
        r = self._session.request(method, self.base_url + path, json=body, headers=headers,
                                  timeout=self.timeout_s)
        try:
            payload = r.json()
        except ValueError:
            payload = r.text
        if r.status_code >= 400:
            raise RouterError(r.status_code, payload)
        return payload

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def status(self) -> dict:
        """Production, candidates, shadows, weights and cumulative per-generation counters."""
        return self._call("GET", "/v1/status")

    def set_traffic(self, weights: dict[str, float], shadows: Optional[Sequence[str]] = None,
                    production: Optional[str] = None) -> dict:
        """Atomically set weights (summing to 1), and optionally the shadow set and production."""
        body: dict[str, Any] = {"weights": weights}
        if shadows is not None:
            body["shadows"] = list(shadows)
        if production is not None:
            body["production"] = production
        return self._call("POST", "/v1/admin/traffic", body, admin=True)

    def attach(self, name: str, app: str, sha256: str, shadow: bool = True) -> dict:
        """Attach an already deployed generation application (see serving.deploy.add_generation)."""
        return self._call("POST", "/v1/admin/generations",
                          {"name": name, "app": app, "sha256": sha256, "shadow": shadow}, admin=True)

    def detach(self, name: str) -> dict:
        return self._call("DELETE", f"/v1/admin/generations/{name}", admin=True)

    def predict(self, inputs: list, user_id: Optional[str] = None) -> dict:
        body: dict[str, Any] = {"inputs": inputs}
        if user_id is not None:
            body["user_id"] = user_id
        return self._call("POST", "/v1/predict", body)

    def feedback(self, request_id: str, labels: list[int]) -> dict:
        return self._call("POST", "/v1/feedback", {"request_id": request_id, "labels": labels})

    def embed(self, inputs: list) -> dict:
        return self._call("POST", "/v1/embed", {"inputs": inputs})

    def search(self, inputs: list, k: Optional[int] = None) -> dict:
        body: dict[str, Any] = {"inputs": inputs}
        if k is not None:
            body["k"] = k
        return self._call("POST", "/v1/search", body)
