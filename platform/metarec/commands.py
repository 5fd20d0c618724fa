"""What ``prepare``, ``info``, ``train``, ``tune``, ``promote`` and ``serve`` do, given their
options: call the library, then print for a person what came out of it.

The CLI only parses and dispatches (``metarec.cli``); ``evaluate`` and ``report`` live in
``metarec.evaluation_job``. Imports are lazy so that ``metarec --help`` never loads Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metarec.config import MetarecConfig
from metarec.errors import ConfigError

__all__ = [
    "info_command",
    "prepare_command",
    "print_against_champion",
    "promote_command",
    "serve_command",
    "train_command",
    "tune_command",
]


def prepare_command(cfg: MetarecConfig, out: str, *, progress: bool = True) -> None:
    from metarec.data.prepare import prepare
    from metarec.data.prepared import summarize

    ds = prepare(cfg, out, progress=progress)
    print(summarize(ds.manifest))
    print(f"wrote {ds.root}")


def info_command(data: str) -> None:
    from metarec.data.prepared import open_prepared, summarize

    print(summarize(open_prepared(data).manifest))


def train_command(
    cfg: MetarecConfig | None,
    data: str,
    *,
    resume: str | None = None,
    resume_settings: dict[str, Any] | None = None,
    work_dir: str = "work",
    tracking_uri: str | None = None,
) -> None:
    """Train ``cfg`` (or resume run ``resume`` with only ``resume_settings`` changed), record
    it in ``work_dir/last_run.json`` for scripts, and print where everything went."""
    from metarec.loop import valid_key, valid_label
    from metarec.results import write_json_atomic
    from metarec.tracking import resolve_tracking_uri
    from metarec.train import resume as resume_run
    from metarec.train import train

    if resume:
        settings = resume_settings or {}
        out = resume_run(resume, data, **settings, work_dir=work_dir, tracking_uri=tracking_uri)
    else:
        assert cfg is not None
        out = train(cfg, data, work_dir=work_dir, tracking_uri=tracking_uri)
    uri = resolve_tracking_uri(tracking_uri, work_dir)
    record = {
        "run_name": out.run_name,
        "run_id": out.run_id,
        "model_uri": out.model_uri,
        "checkpoint": str(out.checkpoint),
        "tracking_uri": uri,
    }
    write_json_atomic(Path(work_dir) / "last_run.json", record)  # for scripts (make demo)
    print(f"run:        {out.run_name} ({out.epochs_run} epochs, best {out.best_epoch})")
    print(f"{valid_label(valid_key(out.feedback)) + ':':<11} {out.best_valid_mae:.4f}")
    print(f"MLflow run: {out.run_id}")
    print(f"model:      {out.model_uri}")
    print(f"checkpoint: {out.checkpoint}")
    print_against_champion(uri, out.model_uri, out.run_id, out.feedback)
    print(f"see it:     mlflow ui --backend-store-uri {uri}")


def print_against_champion(uri: str, model: str, run_id: str, feedback: str = "explicit") -> None:
    """One line: this model against the champion, and the promote command; never moves it."""
    from metarec.loop import best_key, valid_key, valid_label
    from metarec.registry import against_champion

    c = against_champion(uri, model, run_id, best_key(feedback))
    label = valid_label(valid_key(feedback))
    promote = f"metarec promote {c['name']} {c['version']}"
    champ = c["champion"]
    if champ is None:
        print(f"champion:   none yet; serve this one with: {promote}")
    elif champ["version"] == c["version"]:
        print(f"champion:   this version ({c['version']})")
    elif not champ["comparable"] or champ["valid_mae"] is None or c["valid_mae"] is None:
        print(
            f"champion:   version {champ['version']}, validated on other users (another "
            f"scenario): not compared; unchanged. To replace it: {promote}"
        )
    else:
        diff = c["valid_mae"] - champ["valid_mae"]
        verdict = "better" if diff < 0 else "not better"
        print(
            f"champion:   version {champ['version']}, {label} {champ['valid_mae']:.4f}; this "
            f"one {c['valid_mae']:.4f} ({diff:+.4f}, {verdict}); champion unchanged. "
            f"To replace it: {promote}"
        )


def tune_command(
    cfg: MetarecConfig,
    data: str,
    *,
    resume: str | None = None,
    work_dir: str = "work",
    tracking_uri: str | None = None,
) -> None:
    """Run (or resume; ``"last"``: the last one in ``work_dir``) a sweep; print its best
    trials and the champion line for its best model."""
    from metarec.tracking import resolve_tracking_uri
    from metarec.tune import tune

    if resume == "last":
        last = Path(work_dir) / "last_sweep.json"
        if not last.is_file():
            raise ConfigError(f"--resume: no sweep recorded in {last}")
        resume = json.loads(last.read_text())["name"]
    out = tune(cfg, data, work_dir=work_dir, tracking_uri=tracking_uri, resume=resume)
    keys = [k for k in out.best if k.startswith(("meta.", "model.", "train."))]
    print(f"sweep:      {out.name} ({len(out.table)} trials)")
    for row in out.table[:5]:
        cfgs = ", ".join(
            f"{k.split('.')[-1]}={row[k]:.4g}"
            if isinstance(row[k], float)
            else f"{k.split('.')[-1]}={row[k]}"
            for k in keys
        )
        print(f"  {row['best_valid_mae']:.4f}  {row['status']:<13} {row['epochs']:>3} ep  {cfgs}")
    print(f"MLflow run: {out.parent_run_id} (parent; trials nested)")
    print(f"model:      {out.model_uri}")
    if out.model_uri is not None:
        uri = resolve_tracking_uri(tracking_uri, work_dir)
        print_against_champion(uri, out.model_uri, out.best["run_id"], out.feedback)


def promote_command(
    name: str, version: str, alias: str, *, work_dir: str, tracking_uri: str | None
) -> None:
    from metarec.registry import promote
    from metarec.tracking import resolve_tracking_uri

    promote(resolve_tracking_uri(tracking_uri, work_dir), name, version, alias)
    print(f"models:/{name}@{alias} -> version {version}")


def serve_command(settings: Any) -> None:
    """Serve the config's ``serve`` section until Ctrl-C; its directories are made absolute
    here, since the replicas may run elsewhere (another working directory, a Ray worker)."""
    import dataclasses
    import os

    feedback_dir = settings.feedback_dir and os.path.abspath(settings.feedback_dir)
    settings = dataclasses.replace(
        settings, work_dir=os.path.abspath(settings.work_dir), feedback_dir=feedback_dir
    )
    from metarec.serving.app import serve_forever

    serve_forever(settings)
