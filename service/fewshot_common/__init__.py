"""What the trainer and the server share, and nothing else: the model file's metadata contract
(:mod:`modelmeta`), image decoding and preprocessing (:mod:`images`), ONNX Runtime embedding
(:mod:`embedder`), the typed errors they raise (:mod:`errors`), the torch-free few-shot protocol
(:mod:`fewshot_eval`, ``fewshot eval``) and the ``fewshot`` command's dispatcher (:mod:`cli`).

Dependencies point inwards: ``fewshot_service`` and ``fewshot_trainer`` import this package, never
each other, and nothing here imports either of them, torch or Redis.
"""

__version__ = "0.1.0"
