"""HTTP client of the router, for the rollout controller, the CLI and tests.

Reads status and moves traffic over HTTP only, so the controller may run in any process.
Errors from the router (4xx/5xx) raise `RouterError` carrying its JSON message. Inputs
given as a numpy array of shape (N, *input_shape) are sent as an npy body
(`Content-Type: application/x-npy`); nested lists as JSON.
"""

from __future__ import annotations

import io
import os
from typing import Any, Optional, Sequence

import numpy as np
import requests

from serving.core import NPY_CONTENT_TYPE, USER_HEADER


# serving.feedback_token_env's default: the variable a client reads its feedback token from.
FEEDBACK_TOKEN_ENV = "GRACEFUL_FEEDBACK_TOKEN"


class RouterError(RuntimeError):
    """The router answered with an error status; `status` and `body` tell which."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        msg = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"router answered {status}: {msg}")


class RouterClient:
    """`RouterClient("http://127.0.0.1:8000", token, feedback_token=...)`; admin calls
    need the admin token, feedback calls the feedback token (by default the
    `GRACEFUL_FEEDBACK_TOKEN` environment variable)."""

    def __init__(self, base_url: str, admin_token: Optional[str] = None, timeout_s: float = 10.0,
                 feedback_token: Optional[str] = None):
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.feedback_token = feedback_token or os.environ.get(FEEDBACK_TOKEN_ENV) or None
        self.timeout_s = timeout_s
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def _call(self, method: str, path: str, body: Optional[dict] = None, admin: bool = False,
              npy: Optional[np.ndarray] = None, headers: Optional[dict] = None, params: Optional[dict] = None,
              token: Optional[str] = None) -> dict:
        headers = dict(headers or {})
        token = self.admin_token if admin else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if npy is not None:
            buf = io.BytesIO()
            np.save(buf, npy, allow_pickle=False)
            data, body = buf.getvalue(), None
            headers["Content-Type"] = NPY_CONTENT_TYPE
        r = self._session.request(method, self.base_url + path, json=body, data=data, headers=headers,
                                  params=params, timeout=self.timeout_s)
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

    def _data(self, path: str, inputs, user_id: Optional[str] = None, k: Optional[int] = None,
              generation: Optional[str] = None) -> dict:
        """A data route: an ndarray goes as an npy body (user id in the `X-Graceful-User`
        header, `k` and `generation` in the query string), anything else as
        `{"inputs": ...}` JSON."""
        extra = {key: v for key, v in (("k", k), ("generation", generation)) if v is not None}
        if isinstance(inputs, np.ndarray):
            return self._call("POST", path, npy=inputs,
                              headers={USER_HEADER: str(user_id)} if user_id is not None else None,
                              params=extra or None)
        body: dict[str, Any] = {"inputs": inputs, **extra}
        if user_id is not None:
            body["user_id"] = user_id
        return self._call("POST", path, body)

    def predict(self, inputs, user_id: Optional[str] = None) -> dict:
        """`inputs`: nested lists of shape (N, *input_shape), or such an ndarray (sent as npy)."""
        return self._data("/v1/predict", inputs, user_id)

    def feedback(self, request_id: str, labels: list[int]) -> dict:
        """Labels of one answered request (its `request_id` from the predict answer)."""
        return self._call("POST", "/v1/feedback", {"request_id": request_id, "labels": labels},
                          token=self.feedback_token)

    def feedback_batch(self, items: Sequence[tuple[str, list[int]]]) -> dict:
        """Labels of many requests: `[(request_id, labels), ...]` -> outcomes and counts."""
        return self._call("POST", "/v1/feedback/batch",
                          {"items": [{"request_id": r, "labels": list(map(int, y))} for r, y in items]},
                          token=self.feedback_token)

    def labels_wanted(self, after: str = "", limit: int = 1000) -> dict:
        """Requests on which a candidate disagreed with production, not labelled yet:
        {"items": [{"request_id", "t", "rows"}], "next": cursor for the next page}."""
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._call("GET", "/v1/labels/wanted", params=params, token=self.feedback_token)

    def embed(self, inputs, user_id: Optional[str] = None, generation: Optional[str] = None) -> dict:
        """Embeddings by the generation the plan picks, or by `generation` when named."""
        return self._data("/v1/embed", inputs, user_id, generation=generation)

    def search(self, inputs, k: Optional[int] = None, user_id: Optional[str] = None,
               generation: Optional[str] = None) -> dict:
        """The catalogue's k nearest items (ids, scores, labels) to each input, queried by
        the generation the plan picks, or by `generation` (an edge model) when named."""
        return self._data("/v1/search", inputs, user_id, k, generation)
