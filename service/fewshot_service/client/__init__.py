"""Former home of the Python client, kept so ``from fewshot_service.client import ...`` still works:
the client is :mod:`fewshot_client` now (its own small distribution, ``service/client/``), and
these are its very objects. New code imports ``fewshot_client``.
"""

from fewshot_client import (
    API_KEY_ENV,
    DEFAULT_BULK_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    BulkAdded,
    BulkClassResult,
    ClassifyResult,
    ClassInfo,
    ClassSummary,
    DeletedNamespace,
    DroppedModel,
    FewShotClient,
    ImageInput,
    ModelCompleteness,
    ModelInfo,
    NamespaceInfo,
    Prediction,
    errors,
)

__all__ = [
    "API_KEY_ENV",
    "BulkAdded",
    "BulkClassResult",
    "DEFAULT_BULK_SIZE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ClassInfo",
    "ClassSummary",
    "ClassifyResult",
    "DeletedNamespace",
    "DroppedModel",
    "FewShotClient",
    "ImageInput",
    "ModelCompleteness",
    "ModelInfo",
    "NamespaceInfo",
    "Prediction",
    "errors",
]
