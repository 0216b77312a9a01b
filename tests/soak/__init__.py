"""A bounded chaos run against a real ``echosvc serve`` (see README.md here).

``python -m tests.soak --duration 60 --clients 300`` runs it from the command
line; ``tests/test_soak.py`` runs a short one, and the shutdown-under-load
variant, on every change.
"""

from .chaos import EXPECTED_REASON, Kind, SoakConfig, SoakReport, run_soak

__all__ = ["EXPECTED_REASON", "Kind", "SoakConfig", "SoakReport", "run_soak"]
