"""What an evaluation writes and prints: results.json (atomically) and its tables.

One place for the tables a person reads: ``format_table`` for the terminal and
``pipe_table`` for every Markdown table (report.md, a sweep's trials.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from metarec.stats import LOWER_IS_BETTER, verdict

__all__ = [
    "format_table",
    "has_spread",
    "method_rows",
    "pipe_table",
    "write_json_atomic",
    "write_results",
    "write_text_atomic",
]


def pipe_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown pipe table's lines: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def method_rows(rows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A scenario's method rows, without its ``_paired``/``_protocol`` entries."""
    return {m: r for m, r in rows.items() if not m.startswith("_")}


def write_results(results: dict, out_dir: str | Path) -> Path:
    """Write ``OUT/results.json`` atomically."""
    return write_json_atomic(Path(out_dir) / "results.json", results)


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON via a temp file + rename: readers never see half a file."""
    return write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text via a temp file + rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are for everyone to read
    os.replace(tmp, path)
    return path


def has_spread(protocol: dict[str, Any]) -> bool:
    """Whether a std was measured (over 2+ splits or init seeds): with one run there is
    none, and tables print the mean alone rather than a misleading ``± 0.0000``."""
    runs = protocol.get("split_seeds", [])
    return len(runs) > 1 or len(protocol.get("init_seeds", [])) > 1


def format_table(
    results: dict, *, metrics: tuple[str, ...] = ("mae", "rmse", "ndcg@3", "p@5", "recall@10")
) -> str:
    """A plain-text table per scenario (mean ± std, best mean per column marked *), then
    each meta method's paired difference with every other method: ``diff [95% CI]`` and
    win/loss only where the CI excludes 0, else tie."""
    lines = []
    for scenario, rows in results.items():
        methods = method_rows(rows)
        proto = rows.get("_protocol", {})
        lines.append(
            f"\n{scenario}  (splits {proto.get('split_seeds')}, test users "
            f"{sum(proto.get('test_users', []))}, std over {proto.get('std_over')})"
        )
        lines.append(f"{'method':<16}" + "".join(f"{m:>17}" for m in metrics))
        best = {
            m: (min if m in LOWER_IS_BETTER else max)(
                (r[m] for r in methods.values() if not math.isnan(r[m])), default=math.nan
            )
            for m in metrics
        }
        spread = has_spread(proto)
        for name, r in methods.items():
            cells = [
                f"{r[m]:.4f}"
                + (f"±{r['std'][m]:.4f}" if spread else "")
                + ("*" if r[m] == best[m] else " ")
                for m in metrics
            ]
            lines.append(f"{name:<16}" + "".join(f"{c:>17}" for c in cells))
        for a, against in rows.get("_paired", {}).items():
            lines.append(
                f"\n{a} minus each method: diff [95% CI], win/loss only if the CI excludes 0"
            )
            lines.append(f"{'vs':<16}" + "".join(f"{m:>27}" for m in metrics))
            for b, diffs in against.items():
                cells = [
                    f"{d['diff']:+.4f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}] "
                    f"{verdict(m, d['diff'], d['ci95'])[0].upper()}"
                    for m, d in ((m, diffs[m]) for m in metrics)
                ]
                lines.append(f"{b:<16}" + "".join(f"{c:>27}" for c in cells))
        if "adapt" in proto:
            lines.append(f"adaptation chosen on valid users: {proto['adapt']}")
    return "\n".join(lines)
