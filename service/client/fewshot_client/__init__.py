"""The fewshot Python client (``pip install ./service/client``): see :class:`FewShotClient`.

Only grpcio, protobuf, httpx and numpy are needed, and :mod:`fewshot_api` (the generated gRPC code
and the typed errors), which ships with it; nothing here imports the server's modules.
"""

from . import errors
from .client import API_KEY_ENV, DEFAULT_BULK_SIZE, DEFAULT_MAX_MESSAGE_BYTES, FewShotClient, ImageInput
from .types import (
    BulkAdded,
    BulkClassResult,
    ClassifyResult,
    ClassInfo,
    ClassJudgement,
    ClassSummary,
    ConfusedPair,
    DeletedNamespace,
    DroppedModel,
    ModelCompleteness,
    ModelInfo,
    NamespaceInfo,
    NamespaceReport,
    Prediction,
)

# The fewshot-client distribution's version (service/client/pyproject.toml reads it here: that
# build cannot see fewshot_common). A test keeps it equal to fewshot_common.__version__.
__version__ = "0.1.0"

__all__ = [
    "API_KEY_ENV",
    "BulkAdded",
    "BulkClassResult",
    "DEFAULT_BULK_SIZE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ClassInfo",
    "ClassJudgement",
    "ClassSummary",
    "ClassifyResult",
    "ConfusedPair",
    "DeletedNamespace",
    "DroppedModel",
    "FewShotClient",
    "ImageInput",
    "ModelCompleteness",
    "ModelInfo",
    "NamespaceInfo",
    "NamespaceReport",
    "Prediction",
    "errors",
]
