"""The Python client: Embed/Classify over gRPC, classes, examples and namespaces over REST.

It imports only grpcio, protobuf, httpx, numpy and :mod:`fewshot_api` (the generated stubs and
typed errors, shipped with it), never the server's modules (``tests/test_package_boundaries.py``),
so ``pip install ./service/client`` installs all it needs.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Union
from urllib.parse import quote

import grpc
import httpx
import numpy as np

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc

from .errors import from_grpc, from_http
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

ImageInput = Union[bytes, str, os.PathLike]  # noqa: UP007 (runtime alias): file bytes or a path
Images = Union[ImageInput, Sequence[ImageInput]]  # noqa: UP007 (runtime alias): one image or several
PemInput = Union[bytes, str, os.PathLike]  # noqa: UP007 (runtime alias): PEM bytes or a file path
DEFAULT_CHUNK_SIZE = 32
DEFAULT_BULK_SIZE = 256  # uploads per bulk request (the server's --max-bulk-images: 1024)
# What the server accepts by default (settings.DEFAULT_MAX_REQUEST_BYTES; a test keeps them equal).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
API_KEY_ENV = "FEWSHOT_API_KEY"


def _read(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _pem(value: PemInput | None) -> bytes | None:
    return None if value is None else _read(value)


def _image_list(images: Images) -> list[ImageInput]:
    """One image (bytes or a path) or a sequence of them, as a list."""
    if isinstance(images, (bytes, str, os.PathLike)):
        return [images]
    return list(images)


def _rest_ssl_context(
    root_certificates: PemInput | None, private_key: PemInput | None, certificate_chain: PemInput | None
) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if root_certificates is not None:
        context.load_verify_locations(cadata=_read(root_certificates).decode("ascii"))
    if certificate_chain is not None or private_key is not None:
        # The ssl module loads a client certificate from files only.
        if isinstance(certificate_chain, bytes) or isinstance(private_key, bytes):
            raise ValueError("for REST, pass private_key and certificate_chain as file paths")
        context.load_cert_chain(certificate_chain, private_key)  # type: ignore[arg-type]
    return context


class FewShotClient:
    """>>> with FewShotClient("localhost:50051", http_url="http://localhost:8000") as client:
    ...     client.add_examples("cat", ["cat1.jpg", "cat2.jpg"])
    ...     client.classify("x.jpg")[0].unknown

    ``target`` (``host:port``) is the gRPC server: embed and classify go there. ``http_url`` is
    the REST server: classes, examples and namespaces go there, and embed/classify too when no
    ``target`` is given. Server errors raise the typed exceptions of :mod:`.errors`.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        http_url: str | None = None,
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
        """``api_key`` (default: ``$FEWSHOT_API_KEY``) is sent as ``Authorization: Bearer``. TLS
        (gRPC) is used when ``tls`` or any certificate option is given, with grpc's own names:
        ``root_certificates`` (CA to trust; none: the system's), ``private_key`` and
        ``certificate_chain`` (the client's, for mTLS); each PEM bytes or a file path. REST uses
        TLS when ``http_url`` is ``https://``, with the same options (client ones as paths).
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if target is None and channel is None and http_url is None:
            raise ValueError("give a gRPC target, an http_url, or both")
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.model_id: str | None = None  # from the latest response
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._channel: grpc.Channel | None = channel
        if channel is None and target is not None:
            options = [
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ]
            if tls or any(v is not None for v in (root_certificates, private_key, certificate_chain)):
                credentials = grpc.ssl_channel_credentials(
                    _pem(root_certificates), _pem(private_key), _pem(certificate_chain)
                )
                self._channel = grpc.secure_channel(target, credentials, options=options)
            else:
                self._channel = grpc.insecure_channel(target, options=options)
        # Per-call metadata rather than call credentials: it works on plaintext loopback too.
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._stub = fewshot_pb2_grpc.FewShotStub(self._channel) if self._channel is not None else None
        self._http: httpx.Client | None = None
        if http_url is not None:
            verify: ssl.SSLContext | bool = True
            if http_url.startswith("https://"):
                verify = _rest_ssl_context(root_certificates, private_key, certificate_chain)
            self._http = httpx.Client(
                base_url=http_url.rstrip("/"),
                headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                timeout=timeout,
                verify=verify,
            )

    # -- inference: gRPC when there is a target, else REST ------------------------------------

    def embed(self, images: Images) -> np.ndarray:
        """``[N, D]`` float32 L2-normalised embeddings, in the order of ``images``."""
        parts = []
        for chunk in self._chunks(images):
            if self._stub is not None:
                response = self._rpc(self._stub.Embed, fewshot_pb2.EmbedRequest(images=chunk))
                self.model_id = response.model_id
                parts.append(np.array([e.values for e in response.embeddings], dtype=np.float32))
            else:
                body = self._rest("POST", "/v1/embed", files=_files(chunk))
                self.model_id = body["model_id"]
                parts.append(np.asarray(body["embeddings"], dtype=np.float32))
        if not parts:
            raise ValueError("embed() needs at least one image")
        return np.concatenate(parts)

    def classify(
        self, images: Images, *, namespace: str = "", top_k: int = 0, unknown_rate: float = 0.0
    ) -> list[ClassifyResult]:
        """Per image, up to ``top_k`` (0 = 5) classes of ``namespace`` (empty = default), best
        first, and whether it matches none of them; ``unknown_rate`` (0: the server's) is the
        share of images of known classes the server flags unknown."""
        results: list[ClassifyResult] = []
        for chunk in self._chunks(images):
            if self._stub is not None:
                request = fewshot_pb2.ClassifyRequest(
                    images=chunk, namespace=namespace, top_k=top_k, unknown_rate=unknown_rate
                )
                response = self._rpc(self._stub.Classify, request)
                self.model_id = response.model_id
                results += [
                    ClassifyResult(
                        [Prediction(p.label, p.score, p.confidence) for p in r.predictions],
                        r.unknown,
                        r.unknown_probability,
                    )
                    for r in response.results
                ]
            else:
                params = {"namespace": namespace, "top_k": top_k, "unknown_rate": unknown_rate}
                body = self._rest("POST", "/v1/classify", params=params, files=_files(chunk))
                self.model_id = body["model_id"]
                unknown = body.get("unknown") or [False] * len(body["results"])
                p_unknown = body.get("unknown_probability") or [None] * len(body["results"])
                results += [
                    ClassifyResult([Prediction(**p) for p in predictions], flag, probability)
                    for predictions, flag, probability in zip(
                        body["results"], unknown, p_unknown, strict=True
                    )
                ]
        if not results:
            raise ValueError("classify() needs at least one image")
        return results

    # -- classes and examples (REST) -----------------------------------------------------------

    def add_examples(self, label: str, images: Images, *, namespace: str = "") -> ClassInfo:
        """Add ``images`` as examples of ``label`` (created on first use). Each chunk of
        ``chunk_size`` images is added all or none; the answer is the class after the last."""
        body: dict[str, Any] = {}
        added: list[str] = []
        warnings: list[dict] = []
        for chunk in self._chunks(images):
            body = self._rest(
                "POST", _class_path(label, "/examples"), params=_ns(namespace), files=_files(chunk)
            )
            added += body["added_example_ids"]
            warnings += body.get("warnings", [])
        if not body:
            raise ValueError("add_examples() needs at least one image")
        self.model_id = body["model_id"]
        return ClassInfo(
            body["namespace"], body["label"], body["count"], body["example_ids"], added, warnings
        )

    def add_examples_bulk(
        self,
        items: Sequence[tuple[str, ImageInput]],
        *,
        namespace: str = "",
        batch_size: int = DEFAULT_BULK_SIZE,
    ) -> BulkAdded:
        """Add each ``(label, image)`` of ``items`` (many classes at once), ``batch_size`` per
        request (POST /v1/examples:bulk). An image whose bytes its class already holds is
        skipped, so sending the same items again adds nothing. Each request is all or none for
        bad images; a class the server refuses (at its cap) comes back with its ``error``."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not items:
            raise ValueError("add_examples_bulk() needs at least one item")
        classes: dict[str, BulkClassResult] = {}
        body: dict[str, Any] = {}
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            form = {"labels": [label for label, _ in chunk]}  # one field per file, in order
            files = _files([_read(image) for _, image in chunk])
            body = self._rest("POST", "/v1/examples:bulk", params=_ns(namespace), data=form, files=files)
            for answer in body["classes"]:
                merged = classes.setdefault(answer["label"], BulkClassResult(answer["label"], 0))
                merged.count = answer["count"]
                merged.added_example_ids += answer["added_example_ids"]
                merged.skipped += [(start + s["index"], s["example_id"]) for s in answer["skipped"]]
                merged.warnings += answer.get("warnings", [])
                merged.error = answer.get("error") or merged.error
        self.model_id = body["model_id"]
        return BulkAdded(
            body["namespace"],
            sum(len(c.added_example_ids) for c in classes.values()),
            sum(len(c.skipped) for c in classes.values()),
            list(classes.values()),
        )

    def list_classes(self, *, namespace: str = "", query: str = "") -> list[ClassSummary]:
        """Every class (of those whose label contains ``query``), by label: all pages read."""
        return [
            summary for page in self.iter_class_pages(namespace=namespace, query=query) for summary in page
        ]

    def iter_class_pages(
        self, *, namespace: str = "", query: str = "", page_size: int = 0
    ) -> Iterator[list[ClassSummary]]:
        """The classes by label a page at a time (``page_size`` 0: the server's default),
        following the server's cursor; a page is fetched when the one before has been used."""
        params: dict[str, Any] = {**_ns(namespace)}
        if query:
            params["q"] = query
        if page_size:
            params["limit"] = page_size
        while True:
            body = self._rest("GET", "/v1/classes", params=params)
            yield [ClassSummary(c["label"], c["count"]) for c in body["classes"]]
            cursor = body.get("next_cursor")  # absent from servers before paging: one page
            if not cursor:
                return
            params["cursor"] = cursor

    def get_class(self, label: str, *, namespace: str = "") -> ClassInfo:
        body = self._rest("GET", _class_path(label), params=_ns(namespace))
        return ClassInfo(body["namespace"], body["label"], body["count"], body["example_ids"])

    def delete_class(self, label: str, *, namespace: str = "") -> None:
        self._rest("DELETE", _class_path(label), params=_ns(namespace))

    def delete_example(self, label: str, example_id: str, *, namespace: str = "") -> ClassInfo | None:
        """The class after the deletion, or None when that was its last example (class gone)."""
        path = _class_path(label, f"/examples/{quote(example_id, safe='')}")
        body = self._rest("DELETE", path, params=_ns(namespace))
        if body["class_deleted"]:
            return None
        return ClassInfo(body["namespace"], body["label"], body["count"], body["example_ids"])

    def example_image(
        self, label: str, example_id: str, *, size: int | None = None, namespace: str = ""
    ) -> bytes:
        """The stored copy of an example's image (JPEG or PNG bytes, no metadata), or with
        ``size`` (16..512) a thumbnail whose longer side is at most ``size`` (never enlarged).
        NotFound for an example added while the server ran with ``--no-store-images``."""
        path = _class_path(label, f"/examples/{quote(example_id, safe='')}/image")
        params = {**_ns(namespace), **({"size": str(size)} if size is not None else {})}
        return self._rest_bytes("GET", path, params=params)

    def report(self, namespace: str = "") -> NamespaceReport:
        """Will the namespace's classes work: each class's leave-one-out accuracy, the most
        confused pairs, classes needing more or cleaner shots, the expected accuracy."""
        body = self._rest("GET", "/v1/report", params=_ns(namespace))
        self.model_id = body["model_id"]
        return NamespaceReport(
            **{
                **_known(NamespaceReport, body),
                "per_class": [ClassJudgement(**_known(ClassJudgement, c)) for c in body["per_class"]],
                "confused_pairs": [ConfusedPair(**_known(ConfusedPair, p)) for p in body["confused_pairs"]],
            }
        )

    # -- namespaces (REST) ---------------------------------------------------------------------

    def list_namespaces(self) -> list[NamespaceInfo]:
        """The namespaces holding classes that this client's API key may use."""
        body = self._rest("GET", "/v1/namespaces")
        return [
            NamespaceInfo(**{**n, "models": [ModelCompleteness(**m) for m in n.get("models", [])]})
            for n in body["namespaces"]
        ]

    def delete_namespace(self, namespace: str) -> DeletedNamespace:
        """Delete ``namespace`` with every class and example in it (atomic)."""
        body = self._rest("DELETE", f"/v1/namespaces/{quote(namespace, safe='')}")
        return DeletedNamespace(**body)

    # -- models (REST) -------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """The models holding embeddings in this key's namespaces, and how complete each is."""
        return [ModelInfo(**m) for m in self._rest("GET", "/v1/models")["models"]]

    def delete_model(self, model_id: str, force: bool = False) -> DroppedModel:
        """Drop ``model_id``'s embeddings in every namespace this key may write to (a model no
        server runs any more); FailedPrecondition for the model the server runs, and for one a
        live server announces unless ``force``."""
        params = {"force": "true"} if force else {}
        return DroppedModel(**self._rest("DELETE", f"/v1/models/{quote(model_id, safe='')}", params=params))

    # -- plumbing --------------------------------------------------------------------------------

    def _rpc(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    def _rest(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._rest_response(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            return None

    def _rest_bytes(self, method: str, path: str, **kwargs: Any) -> bytes:
        return self._rest_response(method, path, **kwargs).content

    def _rest_response(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer when it is a success, else the typed error its JSON body describes."""
        if self._http is None:
            raise ValueError(f"{method} {path} is a REST call: create the client with http_url=")
        request = self._http.build_request(method, path, **kwargs)
        # A multipart body joined before it is sent goes out in one socket write, not several per
        # file (a bulk request of hundreds of files spent most of the client's CPU on those).
        request.read()
        response = self._http.send(request)
        if response.is_error:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise from_http(response.status_code, body, retry_after=response.headers.get("Retry-After"))
        return response

    def _chunks(self, images: Images) -> Iterator[list[bytes]]:
        listed = _image_list(images)
        for start in range(0, len(listed), self.chunk_size):
            yield [_read(image) for image in listed[start : start + self.chunk_size]]

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> FewShotClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _class_path(label: str, suffix: str = "") -> str:
    # Every reserved character encoded, '/' too: the server routes on the raw path.
    return f"/v1/classes/{quote(label, safe='')}{suffix}"


def _known(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``body`` that dataclass ``cls`` has: a newer server may answer more."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in body.items() if key in names}


def _ns(namespace: str) -> dict[str, str]:
    return {"namespace": namespace} if namespace else {}


def _files(chunk: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(chunk)]
