"""The ``fewshot.request`` span of each gRPC call (:mod:`fewshot_service.tracing`): the outermost
server interceptor, so the access log line, the key check and the servicer run inside it; a W3C
``traceparent`` in the call's metadata makes it the caller's child. The span ends when the unary
handler returns or aborts; the handler's thread carries it to the core's child spans. Returns the
handler unchanged while tracing is off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ... import tracing


def _traced(behavior: Callable[..., Any], method: str, metadata: tuple[Any, ...]) -> Callable[..., Any]:
    def traced(request: Any, context: grpc.ServicerContext) -> Any:
        attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.method": method, "fewshot.transport": "grpc"}
        images = getattr(request, "images", None)
        if images is not None:
            attributes["fewshot.images"] = len(images)
        namespace = getattr(request, "namespace", None)
        if isinstance(namespace, str):
            attributes["fewshot.namespace"] = namespace or "default"
        headers = ((k, v) for k, v in metadata if isinstance(v, str))
        with tracing.request_span(method, headers, attributes):
            failed = True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                code = context.code()  # set by abort(); None for a plain return
                if code is None:
                    code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
                tracing.end_request(code.name, failed=code in _SERVER_FAILURES)

    return traced


_SERVER_FAILURES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE})


class RequestSpanInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not tracing.enabled():
            return handler
        metadata = tuple(details.invocation_metadata or ())
        # FewShot's calls are unary; a refusal made before the message (stream_unary) is traced too.
        if handler.unary_unary:
            return handler._replace(unary_unary=_traced(handler.unary_unary, details.method, metadata))
        if handler.stream_unary:
            return handler._replace(stream_unary=_traced(handler.stream_unary, details.method, metadata))
        return handler  # streaming responses (health Watch): not traced
