"""A thin typed Python client for the ``fewshot.v1.FewShot`` gRPC service.

>>> with FewShotClient("localhost:50051") as client:
...     vectors = client.embed(["cat.jpg", "dog.png"])          # [2, D], unit norm
...     client.classify([open("x.jpg", "rb").read()], top_k=3)  # [[Prediction(...), ...]]

With TLS and an API key (``FEWSHOT_API_KEY`` is the default key)::

    FewShotClient("fewshot.example:50051", api_key="...", root_certificates="ca.pem",
                  private_key="client.key", certificate_chain="client.crt")  # the last two: mTLS

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


API_KEY_ENV = "FEWSHOT_API_KEY"
PemInput = Union[bytes, str, os.PathLike]  # noqa: UP007 (runtime alias): PEM bytes or a file path


def _read(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _pem(value: PemInput | None) -> bytes | None:
    return None if value is None else _read(value)


class FewShotClient:
    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: PemInput | None = None,
        private_key: PemInput | None = None,
        certificate_chain: PemInput | None = None,
    ) -> None:
        """``target`` is ``host:port``; pass ``channel`` for other custom channels.

        ``api_key`` (default: ``$FEWSHOT_API_KEY``) is sent as ``authorization: Bearer``. TLS is
        used when ``tls`` or any certificate option is given, with grpc's own names:
        ``root_certificates`` (CA to trust; none: the system's), ``private_key`` and
        ``certificate_chain`` (the client's, for mTLS); each PEM bytes or a file path.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if channel is not None:
            self._channel = channel
        elif tls or root_certificates is not None or private_key is not None or certificate_chain is not None:
            credentials = grpc.ssl_channel_credentials(
                _pem(root_certificates), _pem(private_key), _pem(certificate_chain)
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        # Per-call metadata rather than call credentials: it works on plaintext loopback too.
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._stub = fewshot_pb2_grpc.FewShotStub(self._channel)
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.model_id: str | None = None  # from the latest response

    def embed(self, images: Sequence[ImageInput]) -> np.ndarray:
        """``[N, D]`` float32 L2-normalised embeddings, in the order of ``images``."""
        parts = []
        for chunk in self._chunks(images):
            response = self._stub.Embed(
                fewshot_pb2.EmbedRequest(images=chunk), timeout=self.timeout, metadata=self._metadata
            )
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
                metadata=self._metadata,
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
