"""Whether the Hugging Face hub can be reached, asked once and cheaply.

A name that is not a local directory is a hub ID to transformers and datasets, which retry an unreachable hub for
most of a minute before saying they could not connect. So a hub name is checked here first: when the hub is
offline (HF_HUB_OFFLINE, or no connection within HUB_TIMEOUT seconds) the libraries are switched to their cache,
and a name the cache does not hold is one line naming both possibilities: no such directory, and no hub.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

from derta.io import InputError

HUB_TIMEOUT = 3.0  # seconds to open a connection to the hub (or the proxy) before calling it offline
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@functools.lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """Why the hub cannot be reached (an offline variable, or no connection), or None when it can."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name} is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT).close()
    except OSError:
        return f"no connection to {host} within {HUB_TIMEOUT:g} s"
    return None


def go_offline() -> None:
    """Later hub calls of this process read the local cache only: no retries, no waiting."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # it copies the setting when imported
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def _cached(name: str, files: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)
    except Exception:  # a name that is no valid repo ID is not in the cache either
        return False


def check_hub_name(name: str, what: str = "model") -> None:
    """A name that is no local path: fine when the hub is reachable or (offline) when the cache holds it."""
    reason = offline_reason()
    if reason is None:
        return
    go_offline()
    files = ("config.json", "adapter_config.json") if what == "model" else ("tokenizer_config.json", "config.json")
    if what != "dataset" and _cached(name, files):
        return
    raise InputError(f"no directory '{name}' here, and the hub is offline ({reason})")
