"""The pipeline's webhook: each stage transition POSTed as JSON, never fatal.

Body: {"generation", "from", "to", "reason", "at", "run_dir"}; the token (from the
environment variable `pipeline.webhook_token_env`) travels as `Authorization: Bearer`.
A webhook that is down or slow (`pipeline.webhook_timeout_s`) is counted and logged; the
transition is in the audit log either way.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import requests

log = logging.getLogger(__name__)


class Webhook:
    def __init__(self, url: Optional[str], token_env: str, timeout_s: float):
        self.url = url
        self.token = os.environ.get(token_env) or None
        self.timeout_s = timeout_s
        self.sent = 0
        self.errors = 0

    def post(self, payload: dict) -> bool:
        """True when the webhook answered 2xx (or none is configured)."""
        if not self.url:
            return True
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            r = requests.post(self.url, json=payload, headers=headers, timeout=self.timeout_s)
            ok = 200 <= r.status_code < 300
        except requests.RequestException as e:
            ok, r = False, None
            log.warning("pipeline webhook %s: %s", self.url, e)
        if ok:
            self.sent += 1
        else:
            self.errors += 1
            if r is not None:
                log.warning("pipeline webhook %s answered %s", self.url, r.status_code)
        return ok
