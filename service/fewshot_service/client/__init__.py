"""The fewshot Python client (``pip install 'fewshot[client]'``): see :class:`FewShotClient`.

Only grpcio, protobuf, httpx and numpy are needed; nothing here imports the server's modules.
"""

from . import errors
from .fewshot_client import API_KEY_ENV, DEFAULT_MAX_MESSAGE_BYTES, FewShotClient, ImageInput
from .types import ClassifyResult, ClassInfo, ClassSummary, DeletedNamespace, DroppedModel
from .types import ModelCompleteness, ModelInfo, NamespaceInfo, Prediction

__all__ = [
    "API_KEY_ENV", "DEFAULT_MAX_MESSAGE_BYTES", "ClassInfo", "ClassSummary", "ClassifyResult",
    "DeletedNamespace", "DroppedModel", "FewShotClient", "ImageInput", "ModelCompleteness",
    "ModelInfo", "NamespaceInfo", "Prediction", "errors",
]  # fmt: skip
