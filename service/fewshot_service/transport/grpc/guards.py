"""What stands between a FewShot RPC and the core: parsing that never raises, a bound on the calls
that run at once, and a cancellation handle that follows the call's deadline and its client.

* grpcio answers INTERNAL, and logs a traceback per call, when a request deserializer raises.
  :func:`add_leniently_parsed_servicer` registers the methods with a deserializer that returns an
  :class:`UndecodableRequest` instead, which :class:`UndecodableRequests` turns into
  INVALID_ARGUMENT (warned once in the log, then only counted). Protobuf's own UTF-8 check on
  string fields (a namespace of invalid UTF-8 bytes) fails here too.
* :class:`CallSlots` admits at most N FewShot calls at once; the gRPC thread pool is larger, so
  health checks and reflection always find a free thread however slow those calls are.
* :func:`call_cancellation` is set when the RPC ends for any reason (deadline, client cancel or
  disconnect), so the core stops decoding or queueing for a caller that has gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from prometheus_client import Counter

from fewshot_common.cancellation import Cancellation

log = logging.getLogger(__name__)

UNDECODABLE_REQUESTS = Counter(
    "fewshot_grpc_undecodable_requests_total",
    "gRPC requests whose bytes were not a valid protobuf message (answered INVALID_ARGUMENT).",
    ["method"],
)
BUSY_REFUSALS = Counter(
    "fewshot_grpc_busy_refusals_total",
    "FewShot gRPC calls refused with RESOURCE_EXHAUSTED because every call slot was taken.",
    ["method"],
)


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes did not parse as ``message_type``."""

    message_type: str
    reason: str


def lenient_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    """``message_class.FromString`` that returns an :class:`UndecodableRequest` instead of raising."""
    full_name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | UndecodableRequest:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError, including bad UTF-8 in a string field
            # The library's text repeats the type name; keep only what went wrong.
            reason = str(exc).rsplit(": ", 1)[-1] if ": " in str(exc) else type(exc).__name__
            return UndecodableRequest(full_name, reason)

    return parse


def add_leniently_parsed_servicer(servicer: object, service: ServiceDescriptor, server: grpc.Server) -> None:
    """Register ``servicer``'s unary methods of ``service`` (what the generated
    ``add_*Servicer_to_server`` does) with deserializers that never raise."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{method.full_name}: only unary methods are supported")
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class UndecodableRequests:
    """Refuses undecodable requests; the first one a server sees is logged, the rest counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._warned = False

    def refuse(self, request: UndecodableRequest, context: grpc.ServicerContext, method: str) -> None:
        """Abort the call with INVALID_ARGUMENT (raises, like ``context.abort``)."""
        UNDECODABLE_REQUESTS.labels(method).inc()
        with self._lock:
            first, self._warned = not self._warned, True
        if first:
            log.warning(
                "a %s request was not a valid %s message (%s); answering INVALID_ARGUMENT. Further "
                "ones are counted in fewshot_grpc_undecodable_requests_total, not logged",
                method,
                request.message_type,
                request.reason,
            )
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {request.message_type} message: {request.reason}",
        )


class CallSlots:
    """At most ``limit`` calls at once; :meth:`try_enter` never waits, so a refused call does not
    hold a thread of the pool either."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"need a limit > 0, got {limit}")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def try_enter(self) -> bool:
        return self._slots.acquire(blocking=False)

    def leave(self) -> None:
        self._slots.release()


def call_cancellation(context: grpc.ServicerContext) -> Cancellation:
    """A handle that is cancelled when the call's deadline passes or the RPC ends otherwise
    (client cancel, disconnect); set at once if it has ended already."""
    cancellation = Cancellation.after(context.time_remaining())
    if not context.add_callback(cancellation.cancel):
        cancellation.cancel()
    return cancellation
