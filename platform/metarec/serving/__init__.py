"""Per-user adaptation over HTTP.

``engine`` (adapt a micro-batch of users and score the catalog: PyTorch only),
``sessions`` (bounded per-replica LRU + the durable feedback log) and ``service`` (request
validation and responses) are plain Python, testable without Ray; ``app`` is the thin Ray
Serve + FastAPI shell around them.
"""
