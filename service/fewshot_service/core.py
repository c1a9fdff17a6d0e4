"""The one object both transports call: embedding, classification and the example registry.

gRPC and REST only translate; every check on a request's meaning (namespace, label, example id,
top_k; image limits through the embedder) is made here, once, so a request is refused the same way
whichever door it came through. The registry below trusts the names it is given.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fewshot_common.cancellation import CancellationCheck
from fewshot_common.embedder import Embedder
from fewshot_common.errors import Cancelled, InvalidInput
from fewshot_common.images import load_batch

from . import inference_metrics as metrics
from .batcher import BatchConfig, DynamicBatcher
from .classifier import DEFAULT_TOP_K, Prediction, PrototypeMatrix
from .decode_pool import DecodePool

if TYPE_CHECKING:  # the registry imports redis; keep this module importable on its own
    from .registry import ClassInfo, ClassSummary, Registry

DEFAULT_NAMESPACE = "default"
MAX_TOP_K = 1000
# Namespaces, labels and example ids alike: any UTF-8 string of 1-128 characters (the registry
# keeps names out of its key syntax by hex-encoding them, so no alphabet restriction is needed).
MAX_NAME_CHARS = 128


def resolve_name(value: object, what: str) -> str:
    """A label, namespace or example id: a UTF-8 string of 1-128 characters, else InvalidInput."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_NAME_CHARS:
        raise InvalidInput(f"{what} must be 1-{MAX_NAME_CHARS} characters long, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8: {exc.reason}") from None
    return value


def resolve_namespace(namespace: str | None) -> str:
    """Empty (or unset) means ``default``; otherwise a name of at most 128 characters."""
    if not namespace:
        return DEFAULT_NAMESPACE
    if isinstance(namespace, str) and len(namespace) > MAX_NAME_CHARS:
        raise InvalidInput(
            f"namespace must be at most {MAX_NAME_CHARS} characters, got {len(namespace)}"
        )
    return resolve_name(namespace, "namespace")


def resolve_label(label: object) -> str:
    return resolve_name(label, "label")


def resolve_example_id(example_id: object) -> str:
    return resolve_name(example_id, "example id")


def resolve_top_k(top_k: int | None) -> int:
    """0 (or unset) means 5; at most :data:`MAX_TOP_K`."""
    if not top_k:
        return DEFAULT_TOP_K
    if top_k < 0 or top_k > MAX_TOP_K:
        raise InvalidInput(f"top_k must be between 0 and {MAX_TOP_K}, got {top_k}")
    return int(top_k)


class FewShotCore:
    """Embedder + registry + classifier behind one thread-safe API; owns the dynamic batcher,
    so Embed, Classify and example uploads from every transport share model runs."""

    def __init__(
        self,
        embedder: Embedder,
        registry: "Registry",
        *,
        batching: BatchConfig | None = None,
        decode_pool: DecodePool | None = None,
    ) -> None:
        self.embedder = embedder
        self.registry = registry
        self.decode_pool = decode_pool or DecodePool()
        self._batcher = DynamicBatcher(
            embedder.embed_array,
            batching or BatchConfig(max_batch_size=embedder.max_batch_size),
        )

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def batch_config(self) -> BatchConfig:
        return self._batcher.config

    def close(self) -> None:
        self._batcher.close()
        self.decode_pool.close()

    # -- inference ---------------------------------------------------------------------------

    def embed(
        self,
        images: Sequence[bytes],
        *,
        operation: str = "embed",
        cancellation: CancellationCheck | None = None,
    ) -> np.ndarray:
        """Encoded image files -> ``[N, D]`` L2-normalised float32 embeddings.

        Decoding runs in the bounded decode pool (Overloaded when its queue is full); a set
        ``cancellation`` stops the work at the next image or before the batcher runs it.
        """
        started = time.perf_counter()
        pre, limits = self.embedder.meta.preprocess, self.embedder.limits
        try:
            pixels = self.decode_pool.run(
                lambda: load_batch(images, pre, limits, cancellation), cancellation
            )
        except Cancelled:
            metrics.CANCELLED_REQUESTS.labels("decode").inc()
            raise
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
        metrics.IMAGES_TOTAL.labels(operation).inc(len(pixels))
        try:
            return self._batcher.submit(pixels, cancellation)
        except Cancelled:
            metrics.CANCELLED_REQUESTS.labels("queue").inc()
            raise

    def classify(
        self,
        images: Sequence[bytes],
        namespace: str | None = None,
        top_k: int | None = 0,
        cancellation: CancellationCheck | None = None,
    ) -> list[list[Prediction]]:
        """Per image, the ``top_k`` classes of ``namespace`` by cosine similarity, best first."""
        namespace = resolve_namespace(namespace)
        top_k = resolve_top_k(top_k)
        # The prototypes first: a namespace we cannot answer for should not cost an inference.
        matrix = self._prototype_matrix(namespace)
        embeddings = self.embed(images, operation="classify", cancellation=cancellation)
        return matrix.top_k(embeddings, top_k)

    def _prototype_matrix(self, namespace: str) -> PrototypeMatrix:
        # The registry caches one ready matrix per namespace state, and refuses
        # (FailedPrecondition) an empty namespace or one whose examples came from another model.
        return self.registry.prototypes(namespace, expected_model_id=self.model_id).classifier

    # -- registry ----------------------------------------------------------------------------

    def add_examples(
        self,
        namespace: str | None,
        label: str,
        images: Sequence[bytes],
        cancellation: CancellationCheck | None = None,
    ) -> "ClassInfo":
        """Embed every image first, so one bad file adds nothing; then add them atomically.

        A request cancelled before its inference starts adds nothing.
        """
        namespace, label = resolve_namespace(namespace), resolve_label(label)
        embeddings = self.embed(images, operation="add_examples", cancellation=cancellation)
        return self.registry.add_examples(namespace, label, embeddings, self.model_id)

    def list_classes(self, namespace: str | None = None) -> "list[ClassSummary]":
        return self.registry.list_classes(resolve_namespace(namespace))

    def get_class(self, namespace: str | None, label: str) -> "ClassInfo":
        return self.registry.get_class(resolve_namespace(namespace), resolve_label(label))

    def delete_class(self, namespace: str | None, label: str) -> None:
        return self.registry.delete_class(resolve_namespace(namespace), resolve_label(label))

    def delete_example(
        self, namespace: str | None, label: str, example_id: str
    ) -> "ClassInfo | None":
        """The class as it is after the deletion, or None when that was its last example."""
        return self.registry.delete_example(
            resolve_namespace(namespace), resolve_label(label), resolve_example_id(example_id)
        )

    # -- health ------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Model loaded (it is, once constructed) and Redis answering."""
        try:
            return bool(self.registry.ping())
        except Exception:  # a health probe reports, it never raises
            return False
