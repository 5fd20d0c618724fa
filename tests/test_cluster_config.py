"""cluster.yaml: valid for Ray's own cluster launcher schema, and true to what metarec needs.

Offline: no cloud calls, no boto3. `prepare_config` only fills in Ray's AWS defaults (a raw
hand-written file fails `validate_config` with a misleading "Missing 'cluster_synced_files'"),
then `validate_config` checks it against ray/autoscaler/ray-schema.json, the same check
`ray up` runs first.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _ray_start_lines(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def _gpu_types(cfg: dict) -> dict[str, dict]:
    return {
        name: t
        for name, t in cfg["available_node_types"].items()
        if t.get("resources", {}).get("GPU", 0) >= 1
    }


def test_cluster_yaml_passes_rays_schema(cfg):
    prepared = _validate(cfg)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_rejects_a_misspelt_key(cfg):
    """The schema check has teeth: a typo is an error, not a silently ignored key."""
    bad = copy.deepcopy(cfg)
    worker = bad["available_node_types"]["gpu_worker"]
    worker["min_wrkers"] = worker.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_wrkers"):
        _validate(bad)


def test_head_is_cpu_and_gpu_workers_scale_from_zero(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    gpu = _gpu_types(cfg)
    assert gpu, "no worker node type declares a GPU"
    for name, node_type in gpu.items():
        assert name != cfg["head_node_type"]
        assert node_type["min_workers"] == 0, f"{name} would keep GPU nodes running while idle"
        assert node_type["max_workers"] >= 1
    assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu.values())


def test_every_node_has_an_image_id(cfg):
    """Ray's fallback AMI is Ubuntu 18.04 (Python 3.7): every node type must name its own."""
    for name, node_type in cfg["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        assert re.fullmatch(r"ami-([0-9a-f]{8}|[0-9a-f]{17}|REPLACE_ME)", image), (name, image)


def test_dashboard_binds_loopback_even_after_rays_defaults(cfg):
    """Ray's default head command binds the dashboard (the job/Serve API) to 0.0.0.0."""
    for config in (cfg, _validate(cfg)):
        (start,) = _ray_start_lines(config["head_start_ray_commands"])
        assert "--head" in start
        assert "--dashboard-host=127.0.0.1" in start
        assert "0.0.0.0" not in start


def test_token_auth_on_every_node(cfg):
    starts = _ray_start_lines(cfg["head_start_ray_commands"]) + _ray_start_lines(
        cfg["worker_start_ray_commands"]
    )
    assert len(starts) == 2
    for start in starts:
        assert "RAY_AUTH_MODE=token ray start" in start
    # The same token on every node: the one on the machine that runs `ray up`.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_environment_reaches_every_ray_process(cfg):
    """MLFLOW_TRACKING_URI (and the rest of ~/metarec.env) is in `ray start`'s environment."""
    (init,) = cfg["initialization_commands"]
    assert "> ~/metarec.env" in init
    assert '"MLFLOW_TRACKING_URI=http://$HEAD_IP:5000"' in init
    assert "'RAY_AUTH_MODE=token'" in init
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for start in _ray_start_lines(starts):
        assert start.startswith(". ~/metarec.env && ")
    (mlflow,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert "--port 5000" in mlflow


def test_setup_installs_metarec_with_the_right_torch_build(cfg):
    assert cfg["file_mounts"]["~/metarec"] == "."
    makefile = (REPO / "Makefile").read_text()
    dev_torch = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)$", makefile, re.M).group(1)
    assert re.search(r"pip install .*-e '\.\[dev\]'", makefile)  # what `make setup` installs

    def make_setup(commands: list[str]) -> dict[str, str]:
        (cmd,) = [c for c in commands if c.startswith("make -C ~/metarec setup ")]
        first = cmd.split(" && ")[0]
        return dict(a.split("=", 1) for a in shlex.split(first)[4:])

    head = make_setup(cfg["head_setup_commands"])
    worker = make_setup(cfg["worker_setup_commands"])
    assert head["TORCH_SPEC"] == f"torch=={dev_torch}+cpu"
    assert head["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(rf"torch=={re.escape(dev_torch)}\+cu\d+", worker["TORCH_SPEC"])
    cuda = worker["TORCH_SPEC"].rsplit("+", 1)[1]
    assert worker["PIP_EXTRA_INDEX_URL"] == f"https://download.pytorch.org/whl/{cuda}"
    assert head["VENV"] == worker["VENV"] == "$HOME/venv"
    # Only the global worker list: a node type's own worker_setup_commands would replace
    # setup_commands (the EFS mount) as well.
    for node_type in cfg["available_node_types"].values():
        assert "worker_setup_commands" not in node_type


def test_every_node_mounts_the_shared_storage(cfg):
    (mount,) = [c for c in cfg["setup_commands"] if "mount -t nfs4" in c]
    assert re.search(r"mount -t nfs4 .* \S+:/ /mnt/shared\)", mount)
    (mlflow,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert "sqlite:////mnt/shared/" in mlflow


@pytest.mark.parametrize("key", COMMAND_LISTS)
def test_commands_are_valid_shell(cfg, key):
    """Folded YAML scalars make it easy to lose a `;` or a quote: `bash -n` each command."""
    for command in cfg[key]:
        res = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert res.returncode == 0, f"{key}: {command}\n{res.stderr}"
