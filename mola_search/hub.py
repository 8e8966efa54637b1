"""Is the Hugging Face Hub reachable?  Asked once, quickly, before any Hub call.

Without this, an offline machine waits for the Hub client's retries (about a
minute) before a mistyped model or task name turns into an error.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_reason() -> str | None:
    """Why the Hub must not or cannot be contacted, or None when it can."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    return _unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@lru_cache(maxsize=4)
def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc.__class__.__name__})"
