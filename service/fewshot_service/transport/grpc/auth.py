"""The gRPC side of access control: one server interceptor that reads ``authorization: Bearer
<key>`` metadata and asks :meth:`AccessControl.check` about the method and its namespace.

``grpc.health.v1`` and reflection (which only describes the API, like /openapi.json) stay open.
A method of ``fewshot.v1.FewShot`` missing from :data:`METHOD_ACTIONS` is refused: a new RPC gets
no access by accident.

A missing or unknown key is refused from the metadata alone, before the request message is read:
the refusing handler is a stream handler that never asks for the message, so a stranger's 60 MB
message is neither waited for nor parsed. A known key is checked again, with the namespace, once
the message is in and before the servicer sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc

from fewshot_api.fewshot.v1 import fewshot_pb2
from fewshot_common import errors

from ..access import AccessControl, Action, bearer_key
from .guards import UndecodableRequest

SERVICE_NAME = fewshot_pb2.DESCRIPTOR.services_by_name["FewShot"].full_name
_PREFIX = f"/{SERVICE_NAME}/"

# Method -> (action, the namespace of its request; None for methods that touch no namespace).
METHOD_ACTIONS: dict[str, tuple[Action, Callable[[Any], str] | None]] = {
    "Embed": (Action.EMBED, None),
    "Classify": (Action.CLASSIFY, lambda request: request.namespace),
}


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(
        self, access: AccessControl, status_table: Mapping[type[errors.FewshotError], grpc.StatusCode]
    ) -> None:
        self._access = access
        self._status = status_table

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not self._access.enabled or not details.method.startswith(_PREFIX):
            return handler
        rule = METHOD_ACTIONS.get(details.method[len(_PREFIX) :])
        key = bearer_key(_metadata(details.invocation_metadata, "authorization"))
        try:
            self._access.authenticate(key)
        except errors.Unauthenticated as exc:
            return _refusal_before_the_message(errors.lookup(self._status, exc), str(exc))
        if handler.unary_unary is None:  # streaming RPCs: none today, and none unchecked
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, f"{details.method} has no access rule")
        inner = handler.unary_unary

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if rule is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{details.method} has no access rule")
            action, namespace_of = rule
            try:
                if isinstance(request, UndecodableRequest):
                    # No namespace to judge: a stranger still gets 401; the servicer answers the
                    # rest INVALID_ARGUMENT, as without keys.
                    self._access.authenticate(key)
                else:
                    self._access.check(key, action, namespace_of(request) if namespace_of else None)
            except errors.FewshotError as exc:
                context.abort(errors.lookup(self._status, exc), str(exc))
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _metadata(metadata: tuple[tuple[str, str | bytes], ...] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _refusal_before_the_message(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` at once: as a request-streaming handler it is called
    before any message arrives and never reads one (the wire format is the same as unary's)."""

    def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)
