"""Network facts protege checks before it talks to or listens on a host: loopback names, where an API key may
go. (The serving guard, the arena and the OpenAI-compatible teacher share them.)"""

from __future__ import annotations

import ipaddress
import os
import re

__all__ = ["LOOPBACK_NAMES", "is_loopback", "KEY_ENV_PATTERN", "key_env_allowed"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

# A config may name the environment variable that holds an API key; a recipe from elsewhere must not be able
# to name AWS_SECRET_ACCESS_KEY and send it to a host of its choosing. Allowed: `*_API_KEY`, and whatever the
# user lists in PROTEGE_KEY_ENVS (comma-separated) on their own command line.
KEY_ENV_PATTERN = re.compile(r"[A-Z][A-Z0-9_]*_API_KEY")


def is_loopback(host: str) -> bool:
    """True for loopback names and addresses (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_env_allowed(name: str) -> bool:
    extra = {v.strip() for v in os.environ.get("PROTEGE_KEY_ENVS", "").split(",") if v.strip()}
    return bool(KEY_ENV_PATTERN.fullmatch(name)) or name in extra
