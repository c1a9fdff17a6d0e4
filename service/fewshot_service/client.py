"""A thin typed Python client for the ``fewshot.v1.FewShot`` gRPC service.

>>> with FewShotClient("localhost:50051") as client:
...     vectors = client.embed(["cat.jpg", "dog.png"])          # [2, D], unit norm
...     client.classify([open("x.jpg", "rb").read()], top_k=3)  # [[Prediction(...), ...]]

Images may be given as bytes or as file paths. Long lists are sent in chunks of ``chunk_size``
images per RPC (the server refuses more than 64 per request by default). Server errors surface as
:class:`grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Iterator, Sequence, Union

import grpc
import numpy as np

from ._proto.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from .classifier import Prediction
from .settings import DEFAULT_MAX_REQUEST_BYTES

ImageInput = Union[bytes, str, os.PathLike]  # noqa: UP007 (runtime alias)
DEFAULT_CHUNK_SIZE = 32
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_MAX_REQUEST_BYTES  # what the server accepts by default


def _read(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


class FewShotClient:
    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
    ) -> None:
        """``target`` is ``host:port``; pass ``channel`` for TLS or other custom channels."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = fewshot_pb2_grpc.FewShotStub(self._channel)
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.model_id: str | None = None  # from the latest response

    def embed(self, images: Sequence[ImageInput]) -> np.ndarray:
        """``[N, D]`` float32 L2-normalised embeddings, in the order of ``images``."""
        parts = []
        for chunk in self._chunks(images):
            response = self._stub.Embed(fewshot_pb2.EmbedRequest(images=chunk), timeout=self.timeout)
            self.model_id = response.model_id
            parts.append(np.array([e.values for e in response.embeddings], dtype=np.float32))
        if not parts:
            raise ValueError("embed() needs at least one image")
        return np.concatenate(parts)

    def classify(
        self, images: Sequence[ImageInput], *, namespace: str = "", top_k: int = 0
    ) -> list[list[Prediction]]:
        """Per image, up to ``top_k`` (0 = 5) classes of ``namespace`` (empty = default), best
        first; ``score`` is the cosine similarity to the class prototype."""
        results: list[list[Prediction]] = []
        for chunk in self._chunks(images):
            response = self._stub.Classify(
                fewshot_pb2.ClassifyRequest(images=chunk, namespace=namespace, top_k=top_k),
                timeout=self.timeout,
            )
            self.model_id = response.model_id
            results += [
                [Prediction(p.label, p.score) for p in result.predictions]
                for result in response.results
            ]
        if not results:
            raise ValueError("classify() needs at least one image")
        return results

    def _chunks(self, images: Sequence[ImageInput]) -> Iterator[list[bytes]]:
        for start in range(0, len(images), self.chunk_size):
            yield [_read(image) for image in images[start : start + self.chunk_size]]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "FewShotClient":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
