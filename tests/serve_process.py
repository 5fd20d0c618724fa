"""A real `metarec serve` process for tests: its own session and Ray temp dir, on a free
loopback port, stopped by pid (its process group), checked gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml as _yaml

from metarec.batch import from_table
from metarec.checkpoint import standalone_checkpoint
from metarec.config import MetarecConfig, apply_overrides
from metarec.data import PreparedDataset
from metarec.loop import fit
from tests.processes import free_port, processes_mentioning

REPO = Path(__file__).resolve().parents[1]
METAREC = Path(sys.executable).with_name("metarec")


class Server:
    """`metarec serve` in its own session and Ray temp dir; stopped by pid, checked gone."""

    def __init__(
        self, checkpoint: Path, work: Path, *, token: str | None = None, yaml: bool = False
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short socket paths
        env = {**os.environ, "RAY_TMPDIR": self.ray_tmp}
        env.pop("RAY_ADDRESS", None)
        env.pop("METAREC_API_TOKEN", None)
        if token is not None:
            env["METAREC_API_TOKEN"] = token
        if yaml:  # the shipped serve/config.yaml, pointed at this model, port and work dir
            cfg = _yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
            cfg["http_options"]["port"] = self.port
            cfg["applications"][0]["args"].update(model=str(checkpoint), work_dir=str(work))
            (work / "serve.yaml").write_text(_yaml.safe_dump(cfg))
            command = [str(METAREC.with_name("serve")), "run", str(work / "serve.yaml")]
        else:
            command = [
                *(str(METAREC), "serve", "--model", str(checkpoint), "--port", str(self.port)),
                *("--work-dir", str(work), "--max-k", "1000", "--max-ratings", "50"),
            ]
        self.log = open(work / f"serve-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(work)
        except BaseException:
            self.stop(crash=True)
            raise

    def _wait_ready(self, work: Path) -> None:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, (work / f"serve-{self.port}.log").read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            time.sleep(1)
        raise TimeoutError(f"metarec serve did not come up: {self.log.name}")

    def stop(self, *, crash: bool = False) -> None:
        """Ctrl-C-like stop of the server process (it shuts Serve and its Ray down in
        order), or with ``crash`` a SIGKILL of its whole process group."""
        if not crash:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                crash = True
        if crash:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        deadline = time.time() + 30
        while processes_mentioning(self.ray_tmp) and time.time() < deadline:
            time.sleep(1)
        left = processes_mentioning(self.ray_tmp)
        for pid in left:  # make sure nothing of ours outlives the test, then fail loudly
            os.kill(pid, 9)
        assert not left, f"processes of this server's Ray outlived it: {left}"


def trained_checkpoint(cfg: MetarecConfig, ds: PreparedDataset, epochs: int = 10) -> dict:
    """A meta-trained model (``epochs``: about a second each on the tests' synthetic data)
    with its catalog, as `metarec train` saves it."""
    cfg = apply_overrides(cfg, **{"train.epochs": epochs})
    result = fit(cfg, ds)
    train = from_table(ds.tasks("user_cold", "train"))
    return standalone_checkpoint(cfg, result.learner, ds, train)
