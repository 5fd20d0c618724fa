"""Data: loaders, synthetic generator, task builder, prepared-dataset reader/writer.

Functional core: imports numpy/pandas/pyarrow only (never Ray or MLflow).
"""

from metarec.data.prepared import PreparedDataset, open_prepared

__all__ = ["PreparedDataset", "open_prepared"]
