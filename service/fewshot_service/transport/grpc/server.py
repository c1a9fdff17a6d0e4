"""The gRPC transport: ``fewshot.v1.FewShot`` over :class:`FewShotCore`, plus health and reflection.

Handlers only translate protobuf <-> core calls; errors are mapped to status codes in one table,
:data:`GRPC_STATUS` (the REST twin is ``rest.HTTP_STATUS``), following the table in :mod:`errors`.
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_common import errors
from fewshot_common.cancellation import Cancellation

from ...core.core import FewShotCore
from ...settings import DEFAULT_MAX_REQUEST_BYTES
from ...tls import TlsFiles
from ..access import AccessControl
from . import guards
from .access_log import AccessLogInterceptor
from .auth import AuthInterceptor
from .request_spans import RequestSpanInterceptor

log = logging.getLogger(__name__)

SERVICE_NAME = fewshot_pb2.DESCRIPTOR.services_by_name["FewShot"].full_name
# FewShot calls that may run at once (each holds a thread); the pool has HEALTH_WORKERS more, so
# health checks and reflection answer however slow those calls are.
DEFAULT_MAX_WORKERS = 16
HEALTH_WORKERS = 4
# Larger messages get RESOURCE_EXHAUSTED (the same limit as an HTTP body).
DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_MAX_REQUEST_BYTES
HEALTH_POLL_SECONDS = 2.0

# Status code per error class; errors.lookup() picks the nearest mapped class.
GRPC_STATUS: dict[type[errors.FewshotError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,  # with retry-after metadata
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FewshotError: grpc.StatusCode.INTERNAL,  # an error type nobody mapped: a bug
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[["FewShotServicer", Request, grpc.ServicerContext, Cancellation], Response]


def _translate_errors(handler: Handler) -> Handler:
    """Guard a FewShot call (see :mod:`grpc_guards`): refuse unparsable bytes and calls beyond
    the call slots, hand the core a cancellation that follows the RPC, and turn the core's
    typed errors into status codes with the error's own message.

    Every call gets a request id (trailing metadata ``request-id``); a server-side failure is
    logged with it and answered with it, never with its detail (Redis address, keys, scripts).
    """

    @functools.wraps(handler)
    def wrapper(self: FewShotServicer, request: Request, context: grpc.ServicerContext) -> Response:
        request_id = uuid.uuid4().hex
        context.set_trailing_metadata((("request-id", request_id),))
        if isinstance(request, guards.UndecodableRequest):
            self.undecodable.refuse(request, context, handler.__name__)
        if not self.slots.try_enter():
            guards.BUSY_REFUSALS.labels(handler.__name__).inc()
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is busy: {self.slots.limit} calls running; retry shortly",
            )
        cancellation = guards.call_cancellation(context)
        try:
            return handler(self, request, context, cancellation)
        except errors.FewshotError as exc:
            code = errors.lookup(GRPC_STATUS, exc)
            if isinstance(exc, errors.Cancelled) and cancellation.deadline_passed():
                # Stopped by the call's own deadline, which may pass here a moment before the
                # client's clock says so: the answer is the one gRPC gives for a passed deadline.
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            message = str(exc)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                log.warning(
                    "request %s: %s in %s: %s%s",
                    request_id,
                    type(exc).__name__,
                    handler.__name__,
                    exc,
                    f" ({exc.detail})" if exc.detail else "",
                )
                message = f"{message} (request id {request_id})"
            context.abort(code, message)
        except Exception:
            log.exception("request %s: unexpected error in %s", request_id, handler.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal server error (request id {request_id})")
        finally:
            self.slots.leave()

    return wrapper


class FewShotServicer(fewshot_pb2_grpc.FewShotServicer):
    def __init__(self, core: FewShotCore, max_concurrent_calls: int = DEFAULT_MAX_WORKERS) -> None:
        self.core = core
        self.slots = guards.CallSlots(max_concurrent_calls)
        self.undecodable = guards.UndecodableRequests()

    @_translate_errors
    def Embed(
        self,
        request: fewshot_pb2.EmbedRequest,
        context: grpc.ServicerContext,
        cancellation: Cancellation,
    ) -> fewshot_pb2.EmbedResponse:
        vectors = self.core.embed(list(request.images), cancellation=cancellation)
        return fewshot_pb2.EmbedResponse(
            embeddings=[fewshot_pb2.Embedding(values=row) for row in vectors.tolist()],
            model_id=self.core.model_id,
        )

    @_translate_errors
    def Classify(
        self,
        request: fewshot_pb2.ClassifyRequest,
        context: grpc.ServicerContext,
        cancellation: Cancellation,
    ) -> fewshot_pb2.ClassifyResponse:
        results = self.core.classify_open_set(
            list(request.images), request.namespace, request.top_k, request.unknown_rate, cancellation
        )
        return fewshot_pb2.ClassifyResponse(
            results=[
                fewshot_pb2.Classification(
                    predictions=[
                        fewshot_pb2.Prediction(label=p.label, score=p.score, confidence=p.confidence)
                        for p in result.predictions
                    ],
                    unknown=result.unknown,
                    unknown_probability=result.unknown_probability,
                )
                for result in results
            ],
            model_id=self.core.model_id,
        )


class ReadinessHealth(health.HealthServicer):
    """grpc.health.v1 whose status follows ``core.ready()``: refreshed on every Check, and polled
    while the server runs so that Watch streams see Redis going away and coming back."""

    def __init__(self, core: FewShotCore) -> None:
        super().__init__()
        self._core = core
        self.refresh()

    def refresh(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._core.ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.set(service, status)

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.refresh()
        return super().Check(request, context)

    def poll_until_stopped(self, server: grpc.Server, seconds: float = HEALTH_POLL_SECONDS) -> None:
        """Start a thread that refreshes the status every ``seconds`` until ``server`` stops."""

        def poll() -> None:
            # wait_for_termination returns True on timeout, False once the server has stopped.
            while server.wait_for_termination(timeout=seconds):
                self.refresh()

        threading.Thread(target=poll, name="fewshot-health", daemon=True).start()


def create_grpc_server(
    core: FewShotCore,
    *,
    host: str = "127.0.0.1",
    port: int,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    access: AccessControl | None = None,
    tls: TlsFiles | None = None,
) -> tuple[grpc.Server, int]:
    """Build and start the server; returns it with the bound port (``port=0`` picks a free one).

    At most ``max_workers`` FewShot calls run at once; one more is refused with
    RESOURCE_EXHAUSTED at once rather than queued behind them. ``access`` checks API keys on the
    FewShot methods (health and reflection stay open); ``tls`` serves TLS (mutual with a client
    CA) instead of plaintext.

    Stop it with ``server.stop(grace)``; the health poller stops with it. The core is not
    closed here: it may serve other transports.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers + HEALTH_WORKERS, thread_name_prefix="fewshot-grpc"
        ),
        # The call's span, a log line and metrics per call (refusals too), then the API key check.
        interceptors=[RequestSpanInterceptor(), AccessLogInterceptor()]
        + ([AuthInterceptor(access, GRPC_STATUS)] if access is not None else []),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    guards.add_leniently_parsed_servicer(
        FewShotServicer(core, max_workers), fewshot_pb2.DESCRIPTOR.services_by_name["FewShot"], server
    )
    health_servicer = ReadinessHealth(core)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls is not None:
        bound_port = server.add_secure_port(address, tls.grpc_credentials())
    else:
        bound_port = server.add_insecure_port(address)
    if bound_port == 0:
        raise OSError(f"could not bind the gRPC server to {host}:{port}")
    server.start()
    health_servicer.poll_until_stopped(server)
    return server, bound_port
