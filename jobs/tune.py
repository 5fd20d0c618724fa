"""`ray job submit --working-dir . -- python jobs/tune.py ...`: `metarec tune`.

A thin entrypoint: the same code path as the CLI. Submitted as a Ray job, its driver runs on
the cluster and `ray.init()` joins that cluster (RAY_ADDRESS is set for job drivers).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # no install needed

from metarec.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
