"""A second Ray node on this machine, joined to a head on 127.0.0.1: ``ray start --address``
for a one-machine rehearsal of a two-node cluster.

``ray start --address`` refuses to join a head in Ray's one-machine mode (the mode that
keeps every port on 127.0.0.1, ``metarec.ray_cluster.local_ray_settings``), and outside that
mode Ray 2.60 swaps 127.0.0.1 for the machine's routable address and listens on every
interface. This starts the same node processes (raylet, object store, agents) the way
``ray.cluster_utils.Cluster.add_node`` does for Ray's own multi-node tests, on 127.0.0.1, and
blocks like ``ray start --block``: SIGTERM stops the node; SIGKILL of its raylet is a
node failure.

    python -m tests.ray_worker_node --address 127.0.0.1:6379 --num-cpus 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from metarec.ray_cluster import local_ray_settings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the head's GCS address, 127.0.0.1:PORT")
    p.add_argument("--num-cpus", type=float, default=1)
    p.add_argument("--resources", default="{}", help='custom resources, JSON: {"node2": 1}')
    args = p.parse_args(argv)
    local_ray_settings(os.environ)  # before Ray's import: node address 127.0.0.1
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=args.address,
        node_ip_address="127.0.0.1",
        num_cpus=args.num_cpus,
        num_gpus=0,
        resources=json.loads(args.resources),
        include_log_monitor=False,
        node_manager_port=0,
        dashboard_agent_listen_port=None,  # a free one, not the head's (cluster_utils does so)
        min_worker_port=0,
        max_worker_port=0,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(json.dumps({"node_id": node.node_id, "raylet_pid": _raylet_pid(node)}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    sys.exit(0)


def _raylet_pid(node: object) -> int:
    import ray._private.ray_constants as constants

    (info,) = node.all_processes[constants.PROCESS_TYPE_RAYLET]  # type: ignore[attr-defined]
    return info.process.pid


if __name__ == "__main__":
    main()
