"""Validation, estimation and aggregation rules: numba kernels (:mod:`~ingest.rules.kernels`), each with a
reference twin in ``tests/reference.py``, and their checking wrappers, one per pipeline stage
(:mod:`~ingest.rules.stages`)."""
