"""Joining or starting Ray: the cluster in RAY_ADDRESS, a head `ray start`ed here, or a
one-machine Ray started for this process with every port on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["RAY_CURRENT_CLUSTER", "SINGLE_NODE", "connect_ray", "local_ray_settings"]


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (or one `ray start`ed here), else start a local one.

    Workers' own output (Ray Train's "Reporting training result ...", core-worker
    warnings) stays in Ray's session logs unless ``metarec --verbose``: the user reads
    one metarec line per epoch (``train_progress.epoch_lines``), and the path of those logs.

    A Ray started here listens on 127.0.0.1 only (``local_ray_settings``).
    """
    address = os.environ.get("RAY_ADDRESS", "")
    if address == "local" or (not address and not Path(RAY_CURRENT_CLUSTER).exists()):
        local_ray_settings(os.environ)  # a new Ray is started here
    import ray
    import ray.data

    if not ray.is_initialized():
        verbose = logging.getLogger("metarec").isEnabledFor(logging.DEBUG)
        if not verbose:  # "Token authentication is enabled": the default, not news
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        # With the dashboard (on 127.0.0.1): Ray Train's PlacementGroupCleaner asks the
        # state API whether a controller died; without it, the placement groups of a Tune
        # trial that was stopped early are never freed and later trials starve.
        ray.init(logging_level=logging.WARNING, log_to_driver=verbose)
        if not verbose:
            logs = Path(_session_dir()) / "logs"
            print(f"Ray's worker logs: {logs} (metarec --verbose shows them here)")


# Where `ray start` (default --temp-dir) records its address; ray.init() joins that head.
RAY_CURRENT_CLUSTER = "/tmp/ray/ray_current_cluster"
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_ray_settings(env: MutableMapping[str, str]) -> None:
    """Settings for a Ray that metarec (or a test) starts on this machine, through ``env``.

    - Every port on 127.0.0.1. Ray 2.60 replaces ``--node-ip-address=127.0.0.1`` by the
      machine's routable address and binds GCS and raylet to all interfaces. Its
      single-machine mode (the default on macOS and Windows, this variable set to 0
      elsewhere) uses 127.0.0.1 as the node address, so every server binds there. No other
      machine can join such a head, which is the point.
    - Ray Train's controller takes one report per poll (every 2 s by default), and a
      worker's report blocks until it does: an epoch shorter than that would wait.
    """
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    env.setdefault(SINGLE_NODE, "0")
    if "ray" in sys.modules:  # read at import; child processes read the variable
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = env[SINGLE_NODE] not in ("0", "false", "False")


def _session_dir() -> str:
    """The session directory of the Ray this process joined (where its logs are)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public accessor in 2.60
    return node.get_session_dir_path() if node is not None else "/tmp/ray/session_latest"
