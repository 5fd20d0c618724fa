"""The `metarec` command as a user runs it: real subprocesses, exit codes, no tracebacks."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration  # every test runs `metarec` in a subprocess


def run(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "metarec.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["prepare", "--help"],
        ["info", "--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
        ["report", "--help"],
        ["promote", "--help"],
    ],
)
def test_help_everywhere(args):
    res = run(*args)
    assert res.returncode == 0 and "usage: metarec" in res.stdout


def test_prepare_synthetic_prints_summary_and_info_reads_it(tmp_path):
    out = tmp_path / "demo"
    res = run(
        "prepare",
        "--config",
        "configs/demo.yaml",
        "--users",
        "300",
        "--items",
        "200",
        "--out",
        str(out),
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    assert "user_cold" in res.stdout and f"wrote {out}" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["generator"]["n_users"] == 300
    info = run("info", "--data", str(out))
    assert info.returncode == 0 and manifest["dataset_hash"] in info.stdout


def test_prepare_ml100k_with_flags(ml100k_dir, tmp_path):
    res = run(
        "prepare",
        "--source",
        "ml-100k",
        "--input",
        str(ml100k_dir),
        "--out",
        str(tmp_path / "d"),
        "--scenarios",
        "user_cold,temporal",
        "--query-size",
        "5",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert list(manifest["scenarios"]) == ["user_cold", "temporal"]
    assert manifest["protocol"]["query_size"] == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["prepare", "--source", "ml-100k", "--input", "/nonexistent", "--out", "x"],
            "error: --input /nonexistent: no u.data found there",
        ),
        (["prepare", "--source", "ratings", "--out", "x"], "error: --input: required"),
        (
            ["prepare", "--out", "x", "--set", "data.query_size=0"],
            "error: data.query_size: got 0; expected an int >= 1",
        ),
        (
            ["prepare", "--out", "x", "--scenarios", "user_cold,cold"],
            "error: data.scenarios[1]: got 'cold'",
        ),
        (["info", "--data", "/nonexistent"], "error: /nonexistent: no manifest.json"),
        (["train", "--data", "x", "--workers", "0"], "error: train.workers: got 0"),
        (["train", "--data", "/nonexistent"], "error: /nonexistent: no manifest.json"),
        (
            ["evaluate", "--data", "/nonexistent", "--out", "x", "--model", "/no/such.pt"],
            "error: /nonexistent: no manifest.json",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(args, message, tmp_path):
    res = run(*args, cwd=tmp_path) if args[0] == "info" else run(*args)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in res.stderr


def test_bad_data_file_is_named_with_its_line(tmp_path):
    bad = tmp_path / "r.csv"
    bad.write_text("user,item,rating\n1,2,3\n1,3,4,5\n")
    res = run(
        "prepare",
        "--source",
        "ratings",
        "--input",
        str(bad),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {bad} line 3: got 4 fields; expected 3" in res.stderr
    assert not (tmp_path / "out").exists()


def test_jobs_entrypoint_runs_without_install(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "jobs/prepare.py",
            "--config",
            "configs/demo.yaml",
            "--users",
            "100",
            "--items",
            "100",
            "--out",
            str(tmp_path / "j"),
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "j" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--set", "meta.inner_lr=0.1"], "--set: got 'meta.inner_lr=0.1' with --resume"),
        (["--algorithm", "maml"], "--algorithm: got 'maml' with --resume"),
        (["--config", "configs/demo.yaml"], "--config: got 'configs/demo.yaml' with --resume"),
        (["--seed", "3"], "--seed: got 3 with --resume"),
        (["--scenario", "warm"], "--scenario: got 'warm' with --resume"),
    ],
)
def test_train_resume_refuses_flags_that_change_the_experiment(flags, named, capsys):
    from metarec.cli import main

    assert main(["train", "--data", "/nonexistent", "--resume", "r", *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {named}; expected none: a resumed run keeps its own config")


def test_train_resume_passes_only_the_flags_given(monkeypatch, capsys):
    import metarec.train
    from metarec.cli import main
    from metarec.errors import ConfigError

    calls = []

    def fake_resume(run, data, **kwargs):
        calls.append((run, data, kwargs))
        raise ConfigError("stop here")

    monkeypatch.setattr(metarec.train, "resume", fake_resume)
    assert main(["train", "--data", "d", "--resume", "r", "--no-gpu", "--workers", "3"]) == 2
    assert main(["train", "--data", "d", "--resume", "r", "--epochs", "9"]) == 2
    given = [{k: v for k, v in kw.items() if v is not None} for _, _, kw in calls]
    assert given[0] == {"workers": 3, "use_gpu": False, "work_dir": "work"}
    assert given[1] == {"epochs": 9, "work_dir": "work"}  # nothing else: the run's own


def test_every_train_flag_is_honoured_or_refused_on_resume():
    import argparse

    from metarec.cli import build_parser
    from metarec.options import TRAIN_RESUME_HONOURS, TRAIN_RESUME_REFUSES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {o for a in sub.choices["train"]._actions for o in a.option_strings}
    honoured = {"--" + f.strip("-") for h in TRAIN_RESUME_HONOURS for f in h.split("/")}
    neutral = {"-h", "--help", "--data", "--resume", "--work-dir", "--tracking-uri"}
    assert options == honoured | set(TRAIN_RESUME_REFUSES) | neutral


def test_tune_resume_refuses_flags_that_change_the_sweep(capsys):
    from metarec.cli import main

    assert main(["tune", "--data", "x", "--resume", "s", "--num-samples", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --num-samples: got 9 with --resume; expected none")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("work/ray/run/checkpoint.pt", "--model work/ray/run/checkpoint.pt: no such file"),
        ("models:/metarec-nope@champion", "--model models:/metarec-nope@champion: "),
    ],
)
def test_serve_with_a_bad_model_is_one_line_and_exit_2_before_serve_starts(
    tmp_path, model, message
):
    import time

    t0 = time.perf_counter()
    res = run("serve", "--model", model, "--work-dir", str(tmp_path), "--port", "1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith(f"error: {message}") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr and "metarec serving at" not in res.stdout
    assert time.perf_counter() - t0 < 30  # no Ray start, no replica retries


@pytest.mark.parametrize(
    ("flags", "named", "source"),
    [
        (["--port", "0"], "serve.port: got 0; expected an int >= 1", "(--port)"),
        (["--steps", "500"], "serve.steps: got 500; expected an int <= 100", "(--steps)"),
        (["--max-k", "0"], "serve.limits.max_k: got 0", "(--max-k)"),
        (["--set", "serve.port=0"], "serve.port: got 0", "(--set serve.port)"),
    ],
)
def test_serve_values_out_of_range_are_one_line_errors_naming_key_and_flag(
    flags, named, source, capsys
):
    from metarec.cli import main

    assert main(["serve", "--model", "m.pt", *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {named}") and line.endswith(source)


def test_every_command_resolves_its_section_through_the_one_config(tmp_path):
    """A YAML's evaluate/report/serve sections reach those commands, and flags beat them."""
    from metarec.cli import _load as load
    from metarec.cli import build_parser

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "evaluate: {seeds: [3, 4], bootstrap: 5000}\n"
        "report: {shots: [1, 2]}\n"
        "serve: {port: 9123, limits: {max_k: 7}}\n"
    )
    parse = build_parser().parse_args
    cfg = load(parse(["serve", "--config", str(yaml_file), "--max-k", "9"]))
    assert (cfg.serve.port, cfg.serve.limits.max_k) == (9123, 9)
    cfg = load(parse(["evaluate", "--data", "d", "--out", "o", "--config", str(yaml_file)]))
    assert (cfg.evaluate.seeds, cfg.evaluate.bootstrap, cfg.report.shots) == ((3, 4), 5000, (1, 2))
    cfg = load(parse(["report", "--data", "d", "--out", "o", "--seeds", "5", "--shots", "0"]))
    assert (cfg.report.seeds, cfg.report.shots, cfg.evaluate.seeds) == ((5,), (0,), (0,))


def test_max_support_is_refused_for_ratings(synthetic_prepared, tmp_path, capsys):
    """``evaluate.max_support`` cuts implicit supports; on ratings it would be silently
    meaningless, so it is an error naming the key and what to use instead."""
    from metarec.cli import main

    args = ["evaluate", "--data", str(synthetic_prepared.root), "--out", str(tmp_path / "o")]
    assert main([*args, "--set", "evaluate.max_support=3"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.max_support: got 3 for ratings" in err and "--shots" in err
