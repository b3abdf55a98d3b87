"""Quiet by default: what ``hymba-batch`` turns down in Ray before it starts or joins a cluster,
and the version it prints. Only what Ray itself lets a caller switch: the usage-stats prompt
(``RAY_USAGE_STATS_PROMPT_ENABLED=0``, which leaves the user's usage-stats choice as it is), the
token-auth notice and the "Started a local Ray instance" line (their loggers, raised to
WARNING / ERROR). ``--debug`` leaves Ray's logging as it is. Knows nothing of jobs.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version as _dist_version

_LOUD_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,  # "Token authentication is enabled"
    "ray._private.worker": logging.WARNING,  # "Started a local Ray instance." / "Connecting to existing ..."
}


def version() -> str:
    """The installed hymba-batch version (``unknown`` outside an install)."""
    try:
        return _dist_version("hymba-batch")
    except PackageNotFoundError:
        return "unknown"


def quiet_ray() -> None:
    """Turn down Ray's start-up notices for this process (and the Ray it starts)."""
    os.environ.setdefault("RAY_USAGE_STATS_PROMPT_ENABLED", "0")
    for name, level in _LOUD_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
