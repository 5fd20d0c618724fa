"""Load test of the HTTP API: latency and throughput, micro-batching on vs off, one run.

What is measured: ``POST /v1/recommend`` with 20 ratings (a real ML-100k test user's
support set and side features), k = 10, the model's 5 inner steps, scored over the full
ML-100k catalog (1,682 items), through the whole stack: HTTP -> Serve proxy -> replica ->
``@serve.batch`` -> ``Engine.run`` -> JSON. Two applications are deployed side by side in
one Serve instance and measured in alternation: ``on`` (``max_batch_size`` 32, ``--wait-ms`` wait)
and ``off`` (``max_batch_size`` 1: every request adapts alone). Identical otherwise: same
model, same replica resources, same requests.

Why it is built this way:

* **Closed-loop clients at fixed concurrency** (1, 16, 32, 64): each of C asyncio clients
  sends its next request when the previous answer arrives, over keep-alive connections
  (aiohttp), so "concurrency 64" means 64 requests in flight. Each level runs a warm-up,
  then a bounded number of requests (``--requests``, at least 4 per client) or until
  ``--budget-s``; p50/p99 are over the measured requests, requests/s is completed requests
  over the level's wall time.
* **Bounded and loopback only**: Serve binds 127.0.0.1 on a free port; the cluster is a
  local ``ray.init`` of this process with metarec's local settings (every Ray port on
  127.0.0.1) and is shut down at the end.
* **The model's speed does not depend on its training**: without ``--model`` the benchmark
  builds the ``configs/ml100k.yaml`` network for the prepared ML-100k directory
  (``--data``) untrained (same shapes, same FLOPs) — no 2-minute training before measuring.
  ``--model`` serves any checkpoint or ``models:/`` URI instead.
* **The client shares the machine** (2 cores here): the load generator, the Serve proxy
  and the replica compete for the same CPUs, as they would not in production. The ratios
  between on and off are the robust figures; absolute numbers are for this box.
* **Where the time goes, in the same run.** ``healthz_cC``: the same server's no-work route
  at each concurrency, the ceiling of the HTTP stack (client + Serve proxy + replica) on
  this machine. Per level, from the replica's own counters (``GET /v1/model``): the mean
  micro-batch size and the engine's wall and CPU ms per user (wall > CPU: the engine
  waited for a core or the GIL). ``engine_alone``: the engine with no HTTP around it, ms
  per user adapting alone vs in a batch of ``--batch`` (the most batching can buy).

Human-readable lines go to stderr; the LAST line of stdout is one JSON object (keys in
``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrieval import build_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 16, 32, 64)


def request_bodies(data: Path, n_ratings: int, limit: int = 256) -> list[dict[str, Any]]:
    """Real test users with >= n_ratings support ratings: their first n and their features
    (on implicit data, their first n interactions as events of that strength)."""
    from metarec.data.prepared import open_prepared

    ds = open_prepared(data)
    raw = ds.items().column("raw_id").to_pylist()
    users = ds.users().to_pylist() if ds.manifest["features"]["has_user_features"] else None
    vocab = ds.manifest["vocab"]
    ages = [None, 15, 20, 30, 40, 47, 52, 60]  # one age inside each age bucket
    bodies = []
    for row in ds.tasks("user_cold", "test").to_pylist():
        if len(row["support_items"]) < n_ratings:
            continue
        pairs = list(zip(row["support_items"], row["support_ratings"], strict=True))[:n_ratings]
        if ds.feedback == "implicit":
            body = {"events": [{"item": raw[i], "value": r} for i, r in pairs], "k": 10}
        else:
            body = {"ratings": [{"item": raw[i], "rating": r} for i, r in pairs], "k": 10}
        if users is not None:
            u = users[row["user"]]
            body["user"] = {
                "age": ages[u["age_bucket"]],
                "gender": vocab["gender"][u["gender"]] if u["gender"] else None,
                "occupation": vocab["occupation"][u["occupation"]] if u["occupation"] else None,
                "zip": str(u["zip_prefix"] - 1) if u["zip_prefix"] else None,
            }
        bodies.append(body)
    if not bodies:
        sys.exit(f"no test user of {data} has {n_ratings} support ratings")
    return bodies[:limit]


async def level(
    url: str, bodies: list[dict], concurrency: int, n_requests: int, budget_s: float
) -> dict[str, float]:
    """Closed-loop load at one concurrency; latencies in ms."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(k: int) -> None:
            nonlocal errors
            t = time.perf_counter()
            request = (
                session.get(url) if not bodies else session.post(url, json=bodies[k % len(bodies)])
            )
            async with request as r:
                await r.read()
                errors += r.status != 200
            latencies.append((time.perf_counter() - t) * 1e3)

        async def client(c: int, stop_at: float, quota: int) -> None:
            for k in range(quota):
                if time.perf_counter() > stop_at:
                    return
                await one(c * 1000 + k)

        warm = time.perf_counter() + budget_s
        await asyncio.gather(*(client(c, warm, 2) for c in range(concurrency)))
        latencies.clear()
        per_client = max(4, -(-n_requests // concurrency))
        t0 = time.perf_counter()
        stop = t0 + budget_s
        await asyncio.gather(*(client(c, stop, per_client) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / wall,
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "mean_ms": statistics.fmean(lat),
    }


@contextlib.contextmanager
def in_process_service(model: str) -> Iterator[Any]:
    """The served ``Service`` of ``model`` in this process, no HTTP (its work dir, where a
    feedback log would go, removed after)."""
    from metarec.config import ServeConfig
    from metarec.serving.app import load_service

    with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
        yield load_service(ServeConfig(model=model, work_dir=work), writer="bench")


def engine_alone(model: str, bodies: list[dict], batch: int, threads: int) -> dict[str, float]:
    """The engine with no HTTP around it: ms per user adapting alone vs in a batch."""
    import torch

    torch.set_num_threads(threads)
    with in_process_service(model) as svc:
        return _engine_alone(svc, bodies, batch)


def _engine_alone(svc: Any, bodies: list[dict], batch: int) -> dict[str, float]:
    from metarec.serving.schemas import RecommendRequest

    jobs = [svc.recommend_job(RecommendRequest.model_validate(b)) for b in bodies]
    jobs = (jobs * (1 + batch // len(jobs)))[:batch]

    def ms_per_user(group: int) -> float:
        groups = [jobs[i : i + group] for i in range(0, len(jobs), group)]
        svc.engine.run(groups[0])
        best = math.inf
        for _ in range(5):  # best of 5: the machine's noise only ever adds time
            t = time.perf_counter()
            for g in groups:
                svc.engine.run(g)
            best = min(best, (time.perf_counter() - t) / len(jobs) * 1e3)
        return best

    alone, batched = ms_per_user(1), ms_per_user(batch)
    return {
        "ms_per_user_alone": alone,
        f"ms_per_user_batch{batch}": batched,
        "ratio": alone / batched,
    }


def engine_stats(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url) as r:
        return json.loads(r.read())["engine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "work" / "ml100k", help="prepared ML-100k")
    ap.add_argument("--model", help="checkpoint or models:/ URI (default: untrained --config net)")
    ap.add_argument(
        "--config", type=Path, default=REPO / "configs" / "ml100k.yaml", help="the untrained net"
    )
    ap.add_argument(
        "--modes", nargs="+", default=["on", "off"], choices=["on", "off"], help="batching"
    )
    ap.add_argument("--ratings", type=int, default=20, help="ratings per request")
    ap.add_argument("--requests", type=int, default=512, help="measured requests per level")
    ap.add_argument("--budget-s", type=float, default=20.0, help="time cap per level")
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size when batching is on")
    ap.add_argument("--wait-ms", type=float, default=2.0, help="batch_wait_timeout when on")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="Serve replicas per mode (above 1, mean_batch and engine_* are the counters of "
        "whichever replica answered GET /v1/model, not the deployment's)",
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument(
        "--explain",
        action="store_true",
        help="also measure every level with explain: true, alternating with plain requests",
    )
    args = ap.parse_args()
    if not (args.data / "manifest.json").is_file():
        sys.exit(
            f"--data {args.data}: not a prepared dataset; run `metarec prepare --config "
            "configs/ml100k.yaml --input ../shared/datasets/ml-100k --out work/ml100k`"
        )

    import ray
    from ray import serve

    from metarec.config import ServeConfig
    from metarec.ray_cluster import local_ray_settings
    from metarec.serving.app import MetarecServer

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model = args.model or str(build_checkpoint(args.data, args.config, tmp / "model"))
    bodies = request_bodies(args.data, args.ratings)
    local_ray_settings(os.environ)
    ray.init(logging_level="ERROR", include_dashboard=False, log_to_driver=False)
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeConfig(model=model, work_dir=str(tmp), threads=args.threads)
    modes = {"on": (args.batch, args.wait_ms / 1e3), "off": (1, 0.0)}
    for name, (batch, wait) in modes.items():
        if name not in args.modes:
            continue
        app = MetarecServer.options(
            name=f"metarec-{name}",
            num_replicas=args.replicas,
            ray_actor_options={"num_cpus": 0.5 / args.replicas},
            user_config={"max_batch_size": batch, "batch_wait_timeout_s": wait},
        ).bind(dataclasses.asdict(settings))
        serve.run(app, name=name, route_prefix=f"/{name}")
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{args.modes[0]}/v1/model") as r:
        info = json.loads(r.read())
    results: dict[str, Any] = {}
    base = f"http://127.0.0.1:{port}"
    variants = {"": bodies}
    if args.explain:
        variants["_explain"] = [{**b, "explain": True} for b in bodies]
    try:
        for c in args.concurrency:
            # The HTTP stack's own ceiling: the same server, a route that does no work.
            results[f"healthz_c{c}"] = asyncio.run(
                level(f"{base}/{args.modes[0]}/healthz", [], c, args.requests, args.budget_s)
            )
            for name, variant in itertools.product(sorted(args.modes, reverse=True), variants):
                # off, on (plain, explained): load bursts hit every variant
                before = engine_stats(f"{base}/{name}/v1/model")
                asked = variants[variant]
                r = asyncio.run(
                    level(f"{base}/{name}/v1/recommend", asked, c, args.requests, args.budget_s)
                )
                after = engine_stats(f"{base}/{name}/v1/model")
                jobs = max(1, after["jobs"] - before["jobs"])
                r["mean_batch"] = jobs / max(1, after["batches"] - before["batches"])
                r["engine_ms_per_user"] = 1e3 * (after["seconds"] - before["seconds"]) / jobs
                r["engine_cpu_ms_per_user"] = (
                    1e3 * (after["cpu_seconds"] - before["cpu_seconds"]) / jobs
                )
                results[f"{name}{variant}_c{c}"] = r
                print(
                    f"batching {name:<3}{variant} c={c:<3} {r['rps']:7.1f} req/s  "
                    f"p50 {r['p50_ms']:6.1f} ms"
                    f"  p99 {r['p99_ms']:6.1f} ms  batch {r['mean_batch']:4.1f}  engine "
                    f"{r['engine_ms_per_user']:.2f} ms/user ({r['engine_cpu_ms_per_user']:.2f} "
                    f"CPU)  [healthz {results[f'healthz_c{c}']['rps']:.0f} req/s]",
                    file=sys.stderr,
                )
    finally:
        serve.shutdown()
        ray.shutdown()
    alone = engine_alone(model, bodies, args.batch, args.threads)
    shutil.rmtree(tmp, ignore_errors=True)  # an untrained 1M-item model is gigabytes
    print(f"engine alone: {alone}", file=sys.stderr)
    top = max(args.concurrency)
    summary = {
        "benchmark": "serve_load",
        "endpoint": "/v1/recommend",
        "ratings_per_request": args.ratings,
        "catalog_items": json.loads((args.data / "manifest.json").read_text())["counts"]["items"],
        "inner_steps": info["inner_steps"],
        "algorithm": info["algorithm"],
        "max_batch_size": args.batch,
        "batch_wait_ms": args.wait_ms,
        "torch_threads": args.threads,
        "replicas": args.replicas,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "results": results,
        "engine_alone": alone,
    }
    if len(args.modes) == 2:
        summary[f"throughput_ratio_on_off_c{top}"] = (
            results[f"on_c{top}"]["rps"] / results[f"off_c{top}"]["rps"]
        )
    for c in args.concurrency if args.explain else ():
        for name in args.modes:
            plain, explained = results[f"{name}_c{c}"], results[f"{name}_explain_c{c}"]
            for q in ("p50", "p99"):
                summary[f"explain_{q}_ratio_{name}_c{c}"] = explained[f"{q}_ms"] / plain[f"{q}_ms"]
    if "on_c32" in results:
        summary["p99_ms_on_c32"] = results["on_c32"]["p99_ms"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
