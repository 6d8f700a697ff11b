"""Alerters: where notifications go."""

from __future__ import annotations

from typing import Any

__all__ = ["Alerter"]


class Alerter:
    """Base class of alerters: implement `post(message, params=None)`."""

    flavor = "base"

    def post(self, message: str, params: dict[str, Any] | None = None) -> bool:
        """Send `message`; returns whether it was delivered."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
