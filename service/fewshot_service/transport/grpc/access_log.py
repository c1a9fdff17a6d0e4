"""One access-log line and the gRPC metrics per call: a server interceptor.

``fewshot_grpc_requests_total{method, code}`` and ``fewshot_grpc_request_seconds{method}``; the
method is the full name (``/fewshot.v1.FewShot/Classify``) of a registered service, so the label
set is bounded. The log line (logger ``fewshot.access``) has the method, status code and
milliseconds -- never a message's content. A streaming response is timed until its last message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from ...core.metrics import LATENCY_BUCKETS

log = logging.getLogger("fewshot.access")

GRPC_REQUESTS = Counter(
    "fewshot_grpc_requests_total", "gRPC calls by full method name and status code.", ["method", "code"]
)
GRPC_SECONDS = Histogram(
    "fewshot_grpc_request_seconds",
    "gRPC call latency by full method name.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)


def _record(method: str, context: grpc.ServicerContext, started: float, failed: bool) -> None:
    code = context.code()  # set by abort()/set_code(); None for a plain return
    if code is None:
        code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
    seconds = time.perf_counter() - started
    GRPC_REQUESTS.labels(method, code.name).inc()
    GRPC_SECONDS.labels(method).observe(seconds)
    log.info("grpc method=%s code=%s ms=%.1f", method, code.name, seconds * 1000)


def _unary_response(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def observed(request: Any, context: grpc.ServicerContext) -> Any:
        started, failed = time.perf_counter(), True
        try:
            response = behavior(request, context)
            failed = False
            return response
        finally:
            _record(method, context, started, failed)

    return observed


def _stream_response(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started, failed = time.perf_counter(), True
        try:
            yield from behavior(request, context)
            failed = False
        finally:
            _record(method, context, started, failed)

    return observed


class AccessLogInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED without a handler
        method = handler_call_details.method
        # The four handler kinds of grpc's RpcMethodHandler (a namedtuple): wrap the one set.
        if handler.unary_unary:
            return handler._replace(unary_unary=_unary_response(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_unary_response(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_stream_response(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_stream_response(handler.stream_stream, method))
        return handler
