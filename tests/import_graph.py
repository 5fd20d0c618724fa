"""The package's import graph, drawn from the code (``docs/architecture.md`` embeds it).

``python -m tests.import_graph`` prints it; ``tests/test_architecture.py`` fails when the
copy in the document differs, so the picture is kept current by every change. Only
module-level imports count: the lazy imports inside functions are how the CLI and the
shells stay fast to import, not layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "metarec"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edges() -> dict[str, list[str]]:
    """module -> the metarec modules it imports at module level (short names, sorted)."""
    modules = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, list[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name and t != "metarec"}
        graph[name] = sorted(deps)
    return graph


def render() -> str:
    short = lambda m: m.removeprefix("metarec.")  # noqa: E731
    lines = [
        f"{short(m):<22} -> {', '.join(short(d) for d in deps) or '(nothing)'}"
        for m, deps in edges().items()
        if m != "metarec"
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
