"""What ``metarec evaluate`` and ``metarec report`` do, given their options.

Resolves the request (config, dataset, user splits, baselines, a given or transferred model)
before any training, so a bad option fails in a second rather than after an hour; then runs
``evaluate.evaluate`` and writes the results (and, for a registered model, logs them to its
MLflow run). Kept apart from the CLI so that the CLI only parses and dispatches.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarec.config import apply_overrides, load_config
from metarec.errors import ConfigError

__all__ = ["EvaluationRequest", "evaluate_command", "report_command"]


@dataclass
class EvaluationRequest:
    """The options of ``metarec evaluate`` / ``report`` (see their ``--help``); how they
    score (seeds, splits, CIs, baselines, curves) is the config's ``evaluate`` and
    ``report`` sections, resolved from ``config``, ``overrides`` and ``flags``."""

    data: str
    out: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE
    flags: dict[str, Any] = field(default_factory=dict)  # dotted config keys from flags
    flag_names: dict[str, str] = field(default_factory=dict)  # dotted key -> its flag
    scenarios: list[str] | None = None
    splits: str | None = None
    model: str | None = None
    cross_domain: bool = False
    source_data: str | None = None
    work_dir: str = "work"
    tracking_uri: str | None = None


@dataclass
class _Evaluation:
    """What `evaluate`/`report` score, resolved from the arguments before any training."""

    cfg: Any  # MetarecConfig (imported lazily: `metarec --help` stays fast)
    ds: Any  # PreparedDataset
    seeds: tuple[int, ...] = ()
    scenarios: list[str] = field(default_factory=list)
    baselines: tuple[str, ...] = ()
    learner: Any = None  # the given model (same dataset)
    history: list[dict[str, float]] | None = None  # its training history
    extra: dict[str, Any] | None = None  # --cross-domain: the transferred model's scorers
    transfer: dict[str, Any] | None = None  # --cross-domain: what was mapped (transfer.json)
    splits: list[Any] | None = None  # (label, dataset) per user split

    def run(self, on_seed: Any = None) -> dict[str, dict[str, Any]]:
        from metarec.evaluate import evaluate, score_methods

        settings = self.cfg.evaluate
        score = score_methods
        if settings.workers:
            from metarec.ray_cluster import connect_ray
            from metarec.ray_scoring import ray_score_methods

            connect_ray()
            score = ray_score_methods(settings.workers)
        return evaluate(
            self.cfg,
            self.ds,
            scenarios=self.scenarios,
            seeds=list(self.seeds),
            splits=self.splits,
            baselines=self.baselines,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
            learner=self.learner,
            extra=self.extra,
            on_seed=on_seed,
            threshold=settings.relevance_threshold,
            tune_adaptation=settings.tune_adaptation,
            resamples=settings.bootstrap,
            score=score,
        )


def _settings(req: EvaluationRequest) -> Any:
    """The config ``--config``, ``--set`` and the flags resolve to."""
    return load_config(req.config, overrides=req.overrides, flag_names=req.flag_names, **req.flags)


def _scenarios(req: EvaluationRequest, ds: Any, default: str) -> list[str]:
    """``--scenario`` (repeatable; ``all``: every prepared one), ``default`` when not given;
    an unknown one is a clear error before any training."""
    scenarios = req.scenarios or [default]
    scenarios = ds.scenarios if "all" in scenarios else scenarios
    for s in scenarios:
        ds.task_path(s, "test")
    return scenarios


def _evaluation(req: EvaluationRequest, cfg: Any, ds: Any, *, report: bool) -> _Evaluation:
    """Resolve scenarios, baselines and the given (or transferred) model for ``cfg`` (the
    resolved config) on ``ds`` (the opened dataset).

    With ``--model`` the model's own config is what trains and scores; the ``evaluate`` and
    ``report`` sections still come from ``--config``, ``--set`` and the flags."""
    from dataclasses import replace

    if cfg.evaluate.max_support is not None:
        raise ConfigError(
            f"evaluate.max_support: got {cfg.evaluate.max_support} for ratings; expected "
            "null: it cuts implicit supports (for ratings, `metarec report --shots`)"
        )
    if req.cross_domain and not req.model:
        raise ConfigError("--cross-domain: got no --model; expected the model to transfer")
    ev = _load_model(req, ds) if req.model else _Evaluation(cfg, ds)
    ev.cfg = replace(ev.cfg, evaluate=cfg.evaluate, report=cfg.report)
    ev.seeds = (cfg.report if report else cfg.evaluate).seeds
    ev.scenarios = _scenarios(req, ds, "all" if report else ev.cfg.train.scenario)
    ev.baselines = _baselines(cfg.evaluate.baselines)
    ev.splits = _splits(req, cfg.evaluate.split_seeds, ds, ev.scenarios)
    return ev


def _splits(
    req: EvaluationRequest, split_seeds: tuple[int, ...] | None, ds: Any, scenarios: list[str]
) -> list[Any] | None:
    """``--split-seeds`` / ``--splits``: the user splits to evaluate on (None: the prepared)."""
    from metarec.data.splits import external_split, resplit

    if req.splits and split_seeds:
        raise ConfigError("--splits: got it with --split-seeds; expected one or the other")
    if req.splits:
        if scenarios != ["user_cold"]:
            raise ConfigError(
                f"--scenario: got {scenarios} with --splits; expected user_cold only (a split "
                "file defines user_cold's users and queries)"
            )
        return [(Path(req.splits).name, external_split(ds, req.splits))]
    if split_seeds:
        return [(s, resplit(ds, s)) for s in split_seeds]
    return None


def _baselines(arg: str, known: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """``evaluate.baselines`` as names: ``all``, ``none`` or a comma list of ``known``
    (default: the explicit baselines)."""
    if known is None:
        from metarec.evaluate import BASELINES

        known = BASELINES
    if arg in ("all", "none"):
        return known if arg == "all" else ()
    names = tuple(b.strip() for b in arg.split(",") if b.strip())
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(
            f"evaluate.baselines: got {unknown[0]!r}; expected a subset of {list(known)}, "
            "'all' or 'none'"
        )
    return names


def _load_model(req: EvaluationRequest, ds: Any) -> _Evaluation:
    """``--model``: scored as it is on its own dataset, transferred with ``--cross-domain``."""
    from metarec.checkpoint import learner_from_checkpoint, load_checkpoint
    from metarec.config import MetarecConfig
    from metarec.registry import resolve_checkpoint
    from metarec.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(req.tracking_uri, req.work_dir)
    ckpt = load_checkpoint(resolve_checkpoint(req.model, uri))
    cfg = _model_config(req, MetarecConfig.from_dict(ckpt["config"], where=req.model))
    learner = learner_from_checkpoint(ckpt)
    if not req.cross_domain:
        if ckpt["dataset_hash"] != ds.manifest["dataset_hash"]:
            raise ConfigError(
                f"--model {req.model}: got a model trained on prepared dataset "
                f"{ckpt['dataset_hash']}; expected one trained on --data "
                f"({ds.manifest['dataset_hash']}). Pass --cross-domain to transfer it."
            )
        return _Evaluation(cfg, ds, learner=learner, history=ckpt["state"]["history"])
    from metarec.scorers import AdaptedScorer
    from metarec.transfer import transfer_learner

    moved, mapping = transfer_learner(learner, _source_vocab(req, ckpt), ds)
    extra = {"transfer": AdaptedScorer(moved), "transfer_noadapt": AdaptedScorer(moved, steps=0)}
    transfer = {
        "model": req.model,
        "source_dataset_hash": ckpt["dataset_hash"],
        "target": {k: ds.manifest[k] for k in ("dataset_hash", "source")},
        "coverage": mapping.coverage(),
        "missing": mapping.missing,
    }
    return _Evaluation(cfg, ds, extra=extra, transfer=transfer)


def _model_config(req: EvaluationRequest, cfg: Any) -> Any:
    """The model's config, with ``--set``, ``--epochs`` and ``--seed`` on top: they shape
    what is trained here (baselines, fits where the model cannot be scored); ``--algorithm``
    only with ``--cross-domain`` (the given model is scored as what it is)."""
    from metarec.config import parse_overrides

    algorithm = req.flags.get("meta.algorithm")
    if algorithm and not req.cross_domain:
        raise ConfigError(
            f"--algorithm: got {algorithm!r} with --model; expected none (the model's "
            f"own algorithm, {cfg.meta.algorithm}, is what is scored)"
        )
    flags = {k: v for k, v in req.flags.items() if v is not None}
    return apply_overrides(cfg, **(parse_overrides(req.overrides) | flags))


def _source_vocab(req: EvaluationRequest, ckpt: dict[str, Any]) -> dict[str, list[str]]:
    """The feature names of the model's training data: from its checkpoint, else from
    ``--source-data`` (checked to be the dataset it was trained on)."""
    from metarec.data.prepared import open_prepared

    vocab = (ckpt.get("catalog") or {}).get("vocab")
    if vocab is not None:
        return vocab
    if not req.source_data:
        raise ConfigError(
            f"--source-data: got none; expected the prepared dataset {req.model} was trained "
            "on (its checkpoint carries no feature names)"
        )
    src = open_prepared(req.source_data)
    if src.manifest["dataset_hash"] != ckpt["dataset_hash"]:
        raise ConfigError(
            f"--source-data {req.source_data}: got dataset {src.manifest['dataset_hash']}; "
            f"expected {ckpt['dataset_hash']}, the one the model was trained on"
        )
    return src.manifest["vocab"]


def _finish_evaluation(
    req: EvaluationRequest,
    ds: Any,
    results: dict,
    files: list[Path],
    transfer: dict[str, Any] | None = None,
) -> None:
    """transfer.json (--cross-domain); attach everything to ``--model``'s MLflow run."""
    from metarec.results import write_json_atomic

    if transfer is not None:
        files.append(write_json_atomic(Path(req.out) / "transfer.json", transfer))
    print(f"wrote {req.out}: " + ", ".join(f.name for f in files))
    if not req.model or not req.model.startswith(("models:/", "runs:/")):
        return
    from metarec.registry import describe_model
    from metarec.tracking import log_evaluation, resolve_tracking_uri

    uri = resolve_tracking_uri(req.tracking_uri, req.work_dir)
    run_id = describe_model(req.model, uri)["run_id"]
    if run_id is None:
        return
    m = ds.manifest
    prefix = "eval"
    if transfer is not None:
        prefix = f"cross_domain/{m['source']['name']}-{m['dataset_hash'][:8]}"
    log_evaluation(uri, run_id, results, files, prefix=prefix)
    print(f"logged to MLflow run {run_id} under {prefix}/")


def evaluate_command(req: EvaluationRequest) -> None:
    from metarec.data.prepared import open_prepared
    from metarec.results import format_table, write_results

    ds = open_prepared(req.data)
    if ds.feedback == "implicit":
        return _evaluate_implicit(req, ds)
    ev = _evaluation(req, _settings(req), ds, report=False)
    results = ev.run()
    print(format_table(results))
    _finish_evaluation(req, ev.ds, results, [write_results(results, req.out)], ev.transfer)


def _evaluate_implicit(req: EvaluationRequest, ds: Any) -> None:
    from metarec.implicit_evaluate import format_implicit
    from metarec.results import write_results

    results, _ = _implicit_results(req, ds)
    print(format_implicit(results))
    _finish_evaluation(req, ds, results, [write_results(results, req.out)])


def _report_implicit(req: EvaluationRequest, ds: Any) -> None:
    from metarec.implicit_report import ImplicitCurves, write_implicit_report

    curves = ImplicitCurves(shots=_settings(req).report.shots)
    results, history = _implicit_results(req, ds, on_split=curves)
    m = ds.manifest
    preamble = [
        f"- data: `{req.data}` ({m['source']['name']}, dataset hash `{m['dataset_hash']}`, "
        f"protocol `{json.dumps(m['protocol'])}`)",
        f"- model: `{req.model}`" if req.model else "- model: meta-trained in process per split",
    ]
    summary = curves.summary(history)
    files = write_implicit_report(req.out, results, summary, preamble=preamble)
    _finish_evaluation(req, ds, results, files)
    print(f"report:     {Path(req.out) / 'report.md'}")


def _implicit_results(
    req: EvaluationRequest, ds: Any, on_split: Callable[[Any], None] | None = None
) -> tuple[dict[str, Any], list[dict[str, float]] | None]:
    """An implicit dataset: the meta-learner against the implicit baselines
    (``metarec.implicit_evaluate``); what it cannot honour yet is refused, never ignored.
    ``--model`` is scored where it fits (``evaluate.model_fits``), as on ratings. Returns
    the results and the given model's training history (None without ``--model``)."""
    from dataclasses import replace

    from metarec.implicit_evaluate import IMPLICIT_BASELINES, evaluate_implicit

    cfg = _settings(req)
    e = cfg.evaluate
    refused = {  # flag -> (value, what it accepts)
        "--cross-domain": (req.cross_domain, "none"),
        "--seeds": (list(e.seeds) if len(e.seeds) > 1 else None, "one seed"),
    }
    for flag, (value, accepted) in refused.items():
        if value:
            raise ConfigError(
                f"{flag}: got {value!r} for an implicit-feedback dataset; expected {accepted}: "
                "this version trains the meta-learner once per user split on implicit data "
                "(several init seeds and cross-domain transfer are not built for it yet)"
            )
    learner, history = None, None
    if req.model:
        given = _load_model(req, ds)
        cfg, learner = replace(given.cfg, evaluate=cfg.evaluate), given.learner
        history = given.history
    scenarios = _scenarios(req, ds, cfg.train.scenario)
    names = _baselines(e.baselines, IMPLICIT_BASELINES)
    results = evaluate_implicit(
        apply_overrides(cfg, seed=e.seeds[0]),
        ds,
        scenarios=scenarios,
        baselines=names,
        splits=_splits(req, e.split_seeds, ds, scenarios),
        resamples=e.bootstrap,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
        learner=learner,
        on_split=on_split,
    )
    return results, history


def report_command(req: EvaluationRequest) -> None:
    from metarec.data.prepared import open_prepared
    from metarec.report import CurveCollector, report_header, write_report

    cfg = _settings(req)
    ds = open_prepared(req.data)
    if ds.feedback == "implicit":
        return _report_implicit(req, ds)
    ev = _evaluation(req, cfg, ds, report=True)
    settings = ev.cfg.report
    collector = CurveCollector(
        shots=settings.shots, steps=range(settings.curve_steps + 1), history=ev.history
    )
    results = ev.run(on_seed=collector)
    title, preamble, notes = report_header(
        ev.ds.manifest,
        ev.cfg,
        results,
        data=req.data,
        model=req.model,
        seeds=list(ev.seeds),
        transfer=ev.transfer,
    )
    files = write_report(
        req.out, results, collector.summary(), title=title, preamble=preamble, notes=notes
    )
    _finish_evaluation(req, ev.ds, results, files, ev.transfer)
    print(f"report:     {Path(req.out) / 'report.md'}")
