"""metarec: meta-learned personalization, users as tasks, on Ray."""

__version__ = "0.1.0"
