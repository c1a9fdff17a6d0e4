"""fewshot serving: ONNX Runtime embedder, Redis few-shot registry, gRPC and REST transports.

Nothing in this package imports torch, timm or ``fewshot_trainer``: a serving install has no torch.
"""

__version__ = "0.1.0"
