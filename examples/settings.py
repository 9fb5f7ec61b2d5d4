"""Settings the example services share: reading a JSON consumer config from the environment."""

from __future__ import annotations

import json
import os
from typing import Any

import exactlyonce


def consumer_config_from_env(name: str) -> dict[str, Any]:
    """The JSON object in environment variable ``name``, for ``App(consumer_config=...)``; ``{}`` if unset.

    The demo and the tests use it to shorten the group's session timeout, so a
    killed worker's partitions move within seconds instead of exactlyonce's
    default 10 s.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise exactlyonce.ConfigurationError(f"{name} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise exactlyonce.ConfigurationError(f"{name} must be a JSON object")
    return config
