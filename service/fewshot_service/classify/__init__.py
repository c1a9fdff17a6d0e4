"""Classification math on embeddings: prototypes and their scan, open-set calibration, shot quality.

Imports nothing from the registry, the core or the transports (tests/test_package_boundaries.py).
"""
