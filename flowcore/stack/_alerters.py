"""Alerters: where notifications go. `WebhookAlerter` POSTs Slack-compatible JSON."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["Alerter", "WebhookAlerter"]

_log = logging.getLogger("flowcore")


class Alerter:
    """Base class of alerters: implement `post(message, params=None)`."""

    flavor = "base"

    def post(self, message: str, params: dict[str, Any] | None = None) -> bool:
        """Send `message`; returns whether it was delivered."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class WebhookAlerter(Alerter):
    """POSTs `{"text": message, ...params}` as JSON to `url` (a Slack incoming webhook works).

    Each post has a timeout and its own retries with a short backoff; a post that still fails
    is logged and returns False (an alert never fails a step).
    """

    flavor = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.2,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            from flowcore.exceptions import ConfigError

            raise ConfigError(f"WebhookAlerter url must be http(s)://..., not {url!r}")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"<WebhookAlerter {self.url}>"

    def post(self, message: str, params: dict[str, Any] | None = None) -> bool:
        body = json.dumps({"text": message, **(params or {})}, default=str).encode()
        headers = {"Content-Type": "application/json", **self.headers}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if 200 <= response.status < 300:
                        return True
                    last = RuntimeError(f"HTTP {response.status}")
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last = exc
            if attempt < self.retries:
                # Runs in a worker thread (hooks and alerts never block the event loop).
                time.sleep(self.backoff * 2**attempt)
        _log.error("alert_failed url=%s error=%r", self.url, last,
                   extra={"flowcore_event": "alert_failed",
                          "flowcore": {"url": self.url, "error": repr(last)}})
        return False
