"""`ray job submit --working-dir . -- python jobs/report.py ...`: `metarec report`.

A thin entrypoint: the same code path as the CLI (report.md, plots and results.json under
--out; logged to the model's MLflow run when --model is a models:/ or runs:/ URI).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # no install needed

from metarec.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
