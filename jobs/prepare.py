"""`ray job submit --working-dir . -- python jobs/prepare.py --source synthetic --out work/data`.

A thin entrypoint: the same code path as `metarec prepare` (it runs on the head node/driver;
preparing is single-process pandas/pyarrow work and needs no Ray workers).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # no install needed

from metarec.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
