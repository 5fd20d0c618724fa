"""Benchmark one meta-training step: the vectorized core against a fair per-task loop.

Measures meta-training throughput (tasks/s) of

* **vectorized**: ``learner.zero_grad(); meta_gradients(learner, batch)``, all T tasks of a
  padded ``TaskBatch`` adapting at once (``metarec.meta``);
* **loop**: the textbook per-task loop (the ``reference_meta_loss`` oracle of
  ``tests/test_meta.py``): per task one ``torch.func.functional_call`` per inner step on its
  *unpadded* support set, ``torch.autograd.grad(create_graph=order == 2)``, the query loss,
  the mean over tasks, then ``.backward()`` so θ gets its gradients;
* **higher** (only if the ``higher`` package is importable; second order only, because its
  ``track_higher_grads=False`` detaches the fast weights, so θ would get no first-order
  gradient through them: a different FOMAML): the same loop written with
  ``higher.innerloop_ctx``, the way much MAML code does it.

Why it is built this way:

* **One process, same model, same data, same algorithm.** Every candidate runs on the same
  ``MetaLearner`` (same θ), the same 32 tasks and the same thread count, so the ratio is
  not skewed by different inits, data or machines. The loop gets its per-task tensors
  already cut out of the padding before timing, so it pays for no masking or padding at
  all: the comparison is against the strongest simple loop, not a strawman.
* **Checked before timed.** Every candidate first runs once on float64 copies of the learner
  and data; their meta-gradients must agree (``assert_close``, rtol 1e-7) or the script
  stops. (Not in float32: a ReLU input within rounding of 0 can fall on either side in two
  correct implementations and move a meta-gradient by 1e-3.) A speedup of a candidate
  that computes something else means nothing.
* **Realistic task shapes.** MeLU-sized model (D = 32, MLP 64-64, user features and item
  ids on, the MLP and head adapt) on a synthetic ML-100k-like feature table (1,700 items,
  19 genres, 943 users), support sizes uniform in 3..90 and queries of 10: about half of a
  randomly drawn padded batch is padding, which the vectorized core computes and the loop
  does not. ``padding_share`` says how much; ``padding_share_bucketed`` says how much
  ``metarec.batch.bucketed_batches`` (what training uses) leaves; ``--bucketed`` also times
  the vectorized core over those bucketed batches (8 batches of a 256-task pool) against
  the loop over the same 256 tasks (``speedup_bucketed``).
* **Interleaved, median timing.** Candidates alternate within each repetition, so a burst of
  load from other processes hits both rather than one; each reports the median of its
  repetitions (the vectorized one runs several calls per repetition so both spend similar
  wall time). The number of repetitions is capped by a time budget (``--budget-s``).
  ``loadavg`` is recorded: on a shared 2-core machine the result depends on it.
* **Threads as torch sets them.** Both candidates run with torch's default thread count
  (``--threads N`` pins it). When other processes keep the CPUs busy, torch's 2 OpenMP
  threads can collapse (one thread waits at every op for the other to be scheduled: 30-70x
  slower steps were seen); ``--threads 1`` gives load-robust figures.
* **Costs beside the time.** ``gflops_vectorized`` counts the matmul FLOPs of one step with
  ``torch.utils.flop_counter.FlopCounterMode`` (elementwise ops are not counted) over its
  median time. Peak memory is the largest amount of tensor memory one step allocates on
  top of what was live when it started: ``torch.cuda.max_memory_allocated`` on CUDA, and on
  CPU the running sum of the CPU allocator's alloc/free events recorded by
  ``torch.profiler(profile_memory=True)`` (the process RSS high-water mark, ``ru_maxrss``,
  is too coarse for one step and is only reported once for the whole run).

Human-readable lines go to stderr; the LAST line of stdout is one JSON object (see
``benchmarks/README.md`` for its keys).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from metarec.batch import TaskBatch, bucketed_batches
from metarec.config import MetaConfig
from metarec.data.features import USER_FEATURES
from metarec.meta import MetaLearner, meta_gradients, task_loss
from metarec.model import Features, Recommender

try:  # optional third candidate
    import higher  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    higher = None

N_ITEMS, N_GENRES, N_USERS = 1700, 19, 943  # ML-100k-like side tables
VOCAB = {
    "genre": N_GENRES,
    "year_bucket": 112,
    "age_bucket": 8,
    "gender": 3,
    "occupation": 22,
    "zip_prefix": 11,
}
SUPPORT_RANGE = (3, 90)  # uniform support sizes, inclusive
QUERY_SIZE = 10
META_BATCH = 32
POOL_BATCHES = 8  # tasks in the pool = 8 meta-batches (one bucketing window)
INNER_LR = 0.5  # MetaConfig's default
RTOL, ATOL = 1e-7, 1e-9  # float64 agreement check
FULL_CONFIGS = [("maml", 1), ("maml", 5), ("fomaml", 1), ("fomaml", 5)]
SMOKE_CONFIGS = [("maml", 5), ("fomaml", 1)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Data: a synthetic ML-100k-sized feature table and tasks of varying support size.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One user's task, unpadded (what a per-task loop would hold)."""

    user: Tensor  # () long
    support_items: Tensor  # (S,) long
    support_ratings: Tensor  # (S,) float
    query_items: Tensor  # (Q,) long
    query_ratings: Tensor  # (Q,) float


def make_features(g: torch.Generator) -> Features:
    n_genres = torch.randint(1, 4, (N_ITEMS,), generator=g)  # 1..3 genres per item
    keys = torch.rand(N_ITEMS, N_GENRES, generator=g)
    ranks = keys.argsort(1).argsort(1)
    genres = (ranks < n_genres[:, None]).float()
    genres /= genres.sum(1, keepdim=True)
    users = torch.stack(
        [torch.randint(0, VOCAB[k], (N_USERS,), generator=g) for k in USER_FEATURES],
        1,
    )
    return Features(
        item_genres=genres,
        item_year=torch.randint(0, VOCAB["year_bucket"], (N_ITEMS,), generator=g),
        item_seen=torch.rand(N_ITEMS, generator=g) < 0.95,
        user_table=users,
        vocab_sizes=dict(VOCAB),
        user_names=USER_FEATURES,
    )


def make_tasks(n: int, g: torch.Generator, loss: str = "mse") -> list[Task]:
    """Ratings 1..5; for an implicit ``loss`` about two thirds of each task's entries become
    sampled negatives (target 0) and the rest positives of strength 1..5."""
    lo, hi = SUPPORT_RANGE
    users = torch.randperm(N_USERS, generator=g)[:n]
    tasks = []
    for k in range(n):
        s = int(torch.randint(lo, hi + 1, (), generator=g))
        items = torch.randperm(N_ITEMS, generator=g)[: s + QUERY_SIZE]
        ratings = torch.randint(1, 6, (s + QUERY_SIZE,), generator=g).float()
        if loss != "mse":
            ratings = ratings * (torch.rand(s + QUERY_SIZE, generator=g) < 1 / 3)
        tasks.append(Task(users[k], items[:s], ratings[:s], items[s:], ratings[s:]))
    return tasks


def pad(tasks: list[Task]) -> TaskBatch:
    """Tasks -> one TaskBatch padded to its longest support set (padding: item 0, rating 0)."""
    s_max = max(len(t.support_items) for t in tasks)
    q_max = max(len(t.query_items) for t in tasks)

    def stack(rows: list[Tensor], width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        out = torch.zeros(len(rows), width, dtype=dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
            mask[i, : len(r)] = True
        return out, mask

    s_items, s_mask = stack([t.support_items for t in tasks], s_max, torch.long)
    s_ratings, _ = stack([t.support_ratings for t in tasks], s_max, torch.float32)
    q_items, q_mask = stack([t.query_items for t in tasks], q_max, torch.long)
    q_ratings, _ = stack([t.query_ratings for t in tasks], q_max, torch.float32)
    users = torch.stack([t.user for t in tasks])
    return TaskBatch(users, s_items, s_ratings, s_mask, q_items, q_ratings, q_mask)


def padding_share(batch: TaskBatch) -> float:
    """Padded support entries / all support entries of the batch."""
    mask = batch.support_mask
    return 1.0 - float(mask.sum()) / mask.numel()


def task_to(task: Task, device: torch.device) -> Task:
    return Task(*(getattr(task, f).to(device) for f in Task.__dataclass_fields__))


# --------------------------------------------------------------------------------------------
# Candidates: each fills .grad of every meta-parameter for one meta-batch.
# --------------------------------------------------------------------------------------------


def vectorized_step(learner: MetaLearner, batch: TaskBatch) -> None:
    learner.zero_grad()
    meta_gradients(learner, batch)


def outer_loss(learner: MetaLearner, pred: Tensor, target: Tensor) -> Tensor:
    """One task's outer loss (the learner's ``query_loss``: Huber's on ratings)."""
    return learner.query_loss(pred[None], target[None], torch.ones_like(target[None]).bool())[0]


def loop_step(learner: MetaLearner, tasks: list[Task], second_order: bool) -> None:
    """The per-task reference loop (tests/test_meta.py: reference_meta_loss), then backward."""
    learner.zero_grad()
    cfg, model = learner.cfg, learner.model
    params = learner.params()
    lr = cfg.inner_lr
    losses = []

    def one(pred: Tensor, target: Tensor) -> Tensor:  # the learner's inner loss of one task
        return task_loss(
            pred[None], target[None], torch.ones_like(target[None]).bool(), loss=learner.loss
        )[0]

    for task in tasks:
        fast = {n: params[n] for n in learner.adapted}
        for _ in range(cfg.inner_steps):
            pred = functional_call(model, {**params, **fast}, (task.support_items, task.user))
            loss = one(pred, task.support_ratings)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {n: f - lr * gr for (n, f), gr in zip(fast.items(), grads, strict=True)}
        pred = functional_call(model, {**params, **fast}, (task.query_items, task.user))
        losses.append(outer_loss(learner, pred, task.query_ratings))
    torch.stack(losses).mean().backward()


def higher_step(learner: MetaLearner, tasks: list[Task]) -> None:
    """Second-order MAML with ``higher`` (per task, backward inside the context)."""
    learner.zero_grad()
    model = learner.model
    adapted = [model.get_parameter(n) for n in learner.adapted]
    opt = torch.optim.SGD(adapted, lr=learner.cfg.inner_lr)
    for task in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(learner.cfg.inner_steps):
                pred = fmodel(task.support_items, task.user)
                diffopt.step(((pred - task.support_ratings) ** 2).mean())
            pred = fmodel(task.query_items, task.user)
            (outer_loss(learner, pred, task.query_ratings) / len(tasks)).backward()


def make_candidates(
    learner: MetaLearner, batch: TaskBatch, tasks: list[Task], order: int
) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one call, tasks per call)."""
    candidates = {
        "vectorized": (lambda: vectorized_step(learner, batch), batch.num_tasks),
        "loop": (lambda: loop_step(learner, tasks, order == 2), len(tasks)),
    }
    if higher is not None and order == 2 and learner.loss == "mse":
        candidates["higher"] = (lambda: higher_step(learner, tasks), len(tasks))
    return candidates


def as_double(x: Any) -> Any:
    """A Task or TaskBatch with its float tensors in float64."""
    fields = {f: getattr(x, f) for f in x.__dataclass_fields__}
    return type(x)(**{f: v.double() if v.is_floating_point() else v for f, v in fields.items()})


# --------------------------------------------------------------------------------------------
# Measurement helpers.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop chatter on fd 2 (Python's stderr is kept)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grads_of(learner: MetaLearner) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None}


def check_agree(want: dict[str, Tensor], got: dict[str, Tensor], what: str) -> float:
    """Assert two meta-gradients agree; return the largest |difference| / max|want| over
    the parameters whose gradient is not zero (an exactly-zero one is checked absolutely)."""
    assert got.keys() == want.keys(), f"{what}: gradients for {sorted(got)} vs {sorted(want)}"
    worst = 0.0
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=RTOL, atol=ATOL, msg=f"{what}: {name}")
        scale = float(w.abs().max())
        if scale <= ATOL:  # zero but for rounding (BPR's per-task shift: the head bias)
            continue
        worst = max(worst, float((got[name] - w).abs().max()) / scale)
    return worst


def peak_alloc_mb(fn: Callable[[], None], device: torch.device) -> float | None:
    """Most tensor memory one call allocates on top of what was live when it started, MiB."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile

        with (
            quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception as exc:  # private profiler API: report instead of failing the benchmark
        log(f"  peak memory: profiler memory events unavailable ({exc!r})")
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def matmul_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], None], device: torch.device, calls: int = 1) -> float:
    """Seconds per call, over ``calls`` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def top_ops(fn: Callable[[], None], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` ops with the most self time in one call (torch.profiler), for --profile."""
    from torch.profiler import profile

    with quiet_stderr(), profile(record_shapes=True) as prof:
        fn()
    rows = prof.key_averages(group_by_input_shape=True)
    total = sum(r.self_cpu_time_total for r in rows) or 1.0
    rows = sorted(rows, key=lambda r: r.self_cpu_time_total, reverse=True)[:n]
    return [
        {
            "op": r.key,
            "shapes": str(r.input_shapes)[:80],
            "calls": r.count,
            "self_ms": round(r.self_cpu_time_total / 1e3, 3),
            "share": round(r.self_cpu_time_total / total, 3),
        }
        for r in rows
    ]


# --------------------------------------------------------------------------------------------
# One configuration.
# --------------------------------------------------------------------------------------------


def run_config(
    algorithm: str,
    steps: int,
    *,
    features: Features,
    batch: TaskBatch,
    tasks: list[Task],
    bucketed: tuple[list[TaskBatch], list[Task]] | None,
    device: torch.device,
    reps: int,
    budget_s: float,
    profile: bool,
    loss: str = "mse",
) -> dict[str, Any]:
    order = 2 if algorithm == "maml" else 1
    torch.manual_seed(0)
    cfg = MetaConfig(
        algorithm=algorithm,
        adapt="mlp",
        inner_solver="gd",
        inner_steps=steps,
        inner_lr=INNER_LR,
        implicit_loss="bce" if loss == "mse" else loss,
    )
    model = Recommender(features, embedding_dim=32, hidden=(64, 64))
    learner = MetaLearner(model, cfg, feedback="explicit" if loss == "mse" else "implicit")
    learner = learner.to(device)
    with torch.no_grad():  # realistic, non-zero item biases (as after initialise._item_bias_init)
        learner.model.item_bias.normal_(0.0, 0.3)

    candidates = make_candidates(learner, batch, tasks, order)
    # Agreement first, on float64 copies: in float32 a ReLU pre-activation within rounding
    # of 0 can flip between two correct implementations and move a meta-gradient by 1e-3
    # (seen at 5 inner steps), which says nothing about whether they compute the same thing.
    f64 = copy.deepcopy(learner).double()
    checks = make_candidates(f64, as_double(batch), [as_double(t) for t in tasks], order)
    grads: dict[str, dict[str, Tensor]] = {}
    for name, (fn, _) in checks.items():
        fn()
        grads[name] = grads_of(f64)
    worst = check_agree(grads["loop"], grads["vectorized"], f"{algorithm}/{steps} vectorized")
    if "higher" in candidates:
        try:
            check_agree(grads["loop"], grads["higher"], f"{algorithm}/{steps} higher")
        except AssertionError as exc:
            log(f"  higher disagrees with the loop, not timed: {str(exc).splitlines()[0]}")
            del candidates["higher"]
    first = {name: timed(fn, device) for name, (fn, _) in candidates.items()}  # warm-up
    if bucketed is not None:  # the whole pool: bucketed batches vs the loop over its tasks
        batches, pool = bucketed

        def over_buckets() -> None:
            for b in batches:
                vectorized_step(learner, b)

        def loop_pool() -> None:
            for lo in range(0, len(pool), META_BATCH):
                loop_step(learner, pool[lo : lo + META_BATCH], order == 2)

        candidates["bucketed"] = (over_buckets, sum(b.num_tasks for b in batches))
        candidates["loop_pool"] = (loop_pool, len(pool))
        first["bucketed"] = timed(over_buckets, device)
        first["loop_pool"] = timed(loop_pool, device)

    # Interleaved repetitions (order reversed every other one). Fast candidates make several
    # calls per repetition so that each spends about as much wall time as the loop.
    calls = {n: max(1, min(20, round(first["loop"] / max(first[n], 1e-9) / 2))) for n in candidates}
    samples: dict[str, list[float]] = {n: [] for n in candidates}  # seconds per task
    t_start = time.perf_counter()
    for rep in range(reps):
        names = list(candidates) if rep % 2 == 0 else list(reversed(candidates))
        for name in names:
            fn, n_tasks = candidates[name]
            samples[name].append(timed(fn, device, calls[name]) / n_tasks)
        if time.perf_counter() - t_start > budget_s:
            break
    med = {n: statistics.median(s) for n, s in samples.items()}
    vec_fn, loop_fn = candidates["vectorized"][0], candidates["loop"][0]
    step_s = {n: med[n] * META_BATCH for n in ("vectorized", "loop")}  # one meta-batch

    flops_vec = matmul_flops(vec_fn)
    flops_loop = matmul_flops(loop_fn)
    out: dict[str, Any] = {
        "algorithm": algorithm,
        "inner_steps": steps,
        "order": order,
        "tasks_per_s_vectorized": round(1 / med["vectorized"], 1),
        "tasks_per_s_loop": round(1 / med["loop"], 1),
        "speedup": round(med["loop"] / med["vectorized"], 2),
        "ms_per_step_vectorized": round(step_s["vectorized"] * 1e3, 2),
        "ms_per_step_loop": round(step_s["loop"] * 1e3, 2),
        "speedup_best": round(min(samples["loop"]) / min(samples["vectorized"]), 2),
        "reps": len(samples["loop"]),
        "vectorized_calls_per_rep": calls["vectorized"],
        "gflop_per_step_vectorized": round(flops_vec / 1e9, 3),
        "gflop_per_step_loop": round(flops_loop / 1e9, 3),
        "gflops_vectorized": round(flops_vec / step_s["vectorized"] / 1e9, 1),
        "gflops_loop": round(flops_loop / step_s["loop"] / 1e9, 1),
        "padding_share": round(padding_share(batch), 3),
        "peak_mem_mb_vectorized": _round(peak_alloc_mb(vec_fn, device)),
        "peak_mem_mb_loop": _round(peak_alloc_mb(loop_fn, device)),
        "max_rel_grad_diff": float(f"{worst:.2e}"),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # at the end of this configuration
    }
    if "higher" in candidates:
        out["tasks_per_s_higher"] = round(1 / med["higher"], 1)
        out["speedup_vs_higher"] = round(med["higher"] / med["vectorized"], 2)
    if "bucketed" in candidates:
        out["tasks_per_s_vectorized_bucketed"] = round(1 / med["bucketed"], 1)
        out["tasks_per_s_loop_pool"] = round(1 / med["loop_pool"], 1)
        out["speedup_bucketed"] = round(med["loop_pool"] / med["bucketed"], 2)
    if profile:
        out["top_ops_vectorized"] = top_ops(vec_fn)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run: 2 configs, 1 rep (< 20 s)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; smoke 1)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=15.0,
        help="stop adding repetitions of a configuration after this many seconds (default 15)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) for every candidate (default: leave torch's default)",
    )
    ap.add_argument(
        "--bucketed",
        action="store_true",
        help="also time the vectorized step over length-bucketed batches of a 256-task pool",
    )
    ap.add_argument(
        "--profile", action="store_true", help="add the top ops of each vectorized step"
    )
    ap.add_argument(
        "--loss",
        default="mse",
        choices=["mse", "bce", "bpr"],
        help="mse: ratings (hand-derived inner gradients); bce/bpr: implicit tasks, two "
        "thirds of their entries sampled negatives (autograd inner loop)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps is not None else (1 if args.smoke else 7)
    configs = SMOKE_CONFIGS if args.smoke else FULL_CONFIGS
    load_before = os.getloadavg()
    nproc = len(os.sched_getaffinity(0))
    log(
        f"meta_step: device={device} threads={torch.get_num_threads()} nproc={nproc} "
        f"loadavg={load_before[0]:.2f} higher={'yes' if higher else 'not installed'}"
    )
    if load_before[0] > nproc:
        log(f"  WARNING: load average {load_before[0]:.1f} > {nproc} CPUs; timings are noisy")

    g = torch.Generator().manual_seed(args.seed)
    features = make_features(g)
    pool = make_tasks(META_BATCH * POOL_BATCHES, g, args.loss)
    tasks = pool[:META_BATCH]
    batch = pad(tasks).to(device)
    lengths = torch.tensor([len(t.support_items) for t in pool])
    buckets = bucketed_batches(lengths, META_BATCH, g, window=POOL_BATCHES)
    bucketed_cpu = [pad([pool[int(i)] for i in idx]) for idx in buckets]
    pad_bucketed = statistics.fmean(padding_share(b) for b in bucketed_cpu)
    bucketed = None
    if args.bucketed:
        bucketed = ([b.to(device) for b in bucketed_cpu], [task_to(t, device) for t in pool])
    tasks = [task_to(t, device) for t in tasks]
    log(
        f"  {META_BATCH} tasks, support sizes {SUPPORT_RANGE[0]}..{SUPPORT_RANGE[1]} "
        f"(padded to {batch.support_items.shape[1]}), query {QUERY_SIZE}; padding share "
        f"{padding_share(batch):.1%} random, {pad_bucketed:.1%} bucketed"
    )

    results = []
    t0 = time.perf_counter()
    for algorithm, steps in configs:
        r = run_config(
            algorithm,
            steps,
            features=features,
            batch=batch,
            tasks=tasks,
            bucketed=bucketed,
            device=device,
            reps=reps,
            budget_s=args.budget_s,
            profile=args.profile,
            loss=args.loss,
        )
        r["padding_share_bucketed"] = round(pad_bucketed, 3)
        results.append(r)
        extra = ""
        if "speedup_bucketed" in r:
            extra = f"  bucketed {r['tasks_per_s_vectorized_bucketed']:8.1f}/s"
            extra += f" ({r['speedup_bucketed']:.1f}x)"
        if "tasks_per_s_higher" in r:
            extra += f"  higher {r['tasks_per_s_higher']:.1f}/s"
        log(
            f"  {algorithm:7s} steps={steps} order={r['order']}: "
            f"vectorized {r['tasks_per_s_vectorized']:8.1f} tasks/s "
            f"({r['ms_per_step_vectorized']:.1f} ms, {r['gflops_vectorized']} GFLOP/s, "
            f"{r['peak_mem_mb_vectorized']} MiB)  loop {r['tasks_per_s_loop']:7.1f} tasks/s "
            f"({r['ms_per_step_loop']:.1f} ms, {r['peak_mem_mb_loop']} MiB)  "
            f"speedup {r['speedup']:.2f}x{extra}  [{r['reps']} reps]"
        )
        for op in r.get("top_ops_vectorized", []):
            log(
                f"      {op['share']:6.1%} {op['self_ms']:8.2f} ms  {op['calls']:4d}x "
                f"{op['op']} {op['shapes']}"
            )
    elapsed = time.perf_counter() - t0
    target = next((r for r in results if r["order"] == 2 and r["inner_steps"] == 5), None)
    if target is not None:
        for key, what in (("speedup", "one random batch"), ("speedup_bucketed", "bucketed pool")):
            if key in target:
                verdict = "meets" if target[key] >= 10 else "misses"
                log(f"  maml/5 {what}: {target[key]:.2f}x {verdict} the >= 10x target")

    summary = {
        "results": results,
        "loss": args.loss,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "meta_batch": META_BATCH,
        "support_sizes": list(SUPPORT_RANGE),
        "query_size": QUERY_SIZE,
        "higher": getattr(higher, "__version__", "installed") if higher else "not installed",
        "smoke": args.smoke,
        "elapsed_s": round(elapsed, 1),
        "loadavg": [round(x, 2) for x in (load_before[0], os.getloadavg()[0])],
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {
            "nproc": nproc,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
    }
    print(json.dumps(summary))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
