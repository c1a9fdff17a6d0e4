"""What the trainer and the server share, and nothing else: the model file's metadata contract
(:mod:`modelmeta`), image decoding and preprocessing (:mod:`images`), listing image folders and
reading files the way the server reads uploads (:mod:`image_files`), ONNX Runtime embedding
(:mod:`embedder`), L2 normalisation (:mod:`vectors`), the typed errors they raise (:mod:`errors`),
the torch-free few-shot protocol (:mod:`fewshot_eval`, ``fewshot eval``) and the ``fewshot``
command's dispatcher (:mod:`cli`).

Dependencies point inwards: ``fewshot_service`` and ``fewshot_trainer`` import this package, never
each other, and nothing here imports either of them, torch or Redis
(``tests/test_package_boundaries.py``). The error classes themselves come from ``fewshot_api``, the
dependency-free API package that the client distribution shares with the server.
"""

__version__ = "0.1.0"
