"""Webhook notification: each incident POSTed as JSON, with a timeout and retries.

    POST <url>   Content-Type: application/json
    X-Trustmoe-Event: incident
    X-Trustmoe-Signature: sha256=<hex HMAC of the body>   (when a secret is configured)
    {"event": "incident", "incident": {...Incident.to_dict()...}}

Connection errors, timeouts, 429 and 5xx answers are retried with exponential back-off
(0.5 s, 1 s, 2 s, ...); other 4xx answers are not (the receiver refused the message). A
notification that fails in the end is reported, never raised into the serving path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from trustmoe.deploy.incidents import Incident
from trustmoe.deploy.policy import WebhookPolicy


@dataclass
class Delivery:
    ok: bool
    attempts: int
    status: int | None  # last HTTP status, None when no answer came
    error: str | None = None


class Notifier(Protocol):
    def notify(self, incident: Incident) -> Delivery: ...


class WebhookNotifier:
    def __init__(self, url: str, *, timeout_s: float = 5.0, retries: int = 3, secret: str | None = None,
                 backoff_s: float = 0.5) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must be http(s), got {url!r}")
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self.secret, self.backoff_s = secret, backoff_s

    @classmethod
    def from_policy(cls, p: WebhookPolicy) -> WebhookNotifier:
        secret = os.environ.get(p.secret_env) if p.secret_env else None
        return cls(p.url, timeout_s=p.timeout_s, retries=p.retries, secret=secret)

    def body(self, incident: Incident) -> bytes:
        return json.dumps({"event": "incident", "incident": incident.to_dict()}, sort_keys=True).encode("utf-8")

    def notify(self, incident: Incident) -> Delivery:
        data = self.body(incident)
        headers = {"Content-Type": "application/json", "X-Trustmoe-Event": "incident",
                   "User-Agent": "trustmoe-monitor"}
        if self.secret:
            sig = hmac.new(self.secret.encode("utf-8"), data, hashlib.sha256).hexdigest()
            headers["X-Trustmoe-Signature"] = f"sha256={sig}"
        status: int | None = None
        error: str | None = None
        for attempt in range(1, self.retries + 2):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return Delivery(True, attempt, resp.status)
            except urllib.error.HTTPError as e:
                status, error = e.code, f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:
                    return Delivery(False, attempt, status, error)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                status, error = None, str(getattr(e, "reason", e))
            if attempt <= self.retries:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        return Delivery(False, self.retries + 1, status, error)
