"""docs/architecture.md carries the package's import graph; it must be the code's."""

from __future__ import annotations

from tests.conftest import REPO
from tests.import_graph import render


def test_the_architecture_document_shows_the_current_import_graph():
    doc = (REPO / "docs" / "architecture.md").read_text()
    start = doc.index("<!-- import-graph -->")
    block = doc[start:].split("```", 2)[1].strip("\n")
    assert block == render(), (
        "docs/architecture.md's import graph is stale: paste the output of "
        "`.venv/bin/python -m tests.import_graph` into its block"
    )
