"""The inference core: the embedder behind a dynamic batcher, isolated image decoding, the backfill
of new models, the metrics. Imports :mod:`..classify` and :mod:`..registry`, never the transports.

Empty on purpose: ``python -m fewshot_service.core.decode_worker`` runs this file first, and the
worker must not load ONNX Runtime (tests/test_decode_isolation.py).
"""
