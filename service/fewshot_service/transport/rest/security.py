"""The REST side of access control and browser safety.

- :func:`require`: a route dependency that reads ``Authorization: Bearer <key>`` and the
  ``namespace`` query parameter and asks :meth:`AccessControl.check` (the same check gRPC's
  interceptor makes). :class:`AuthenticateFirst` runs those checks before the body is read.
- :class:`CrossOriginGuard`: a state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin``
  is neither the server's own nor one of ``--cors-origins`` gets 403, so a web page elsewhere
  cannot add or delete examples on a server it can reach (e.g. one on the visitor's loopback).
  Requests without ``Origin`` (curl, SDKs) are not browser cross-origin requests: they pass, and
  the key still applies. Allowed origins get CORS answers from Starlette's CORSMiddleware.
- :class:`HostGuard`: a server without API keys trusts whoever reaches it, i.e. its loopback. A page
  on a DNS-rebinding domain (evil.example first resolving to the attacker, then to 127.0.0.1) would
  reach it as its *own* origin, so the origin rule cannot tell; its requests still say
  ``Host: evil.example``. Such a server answers only the host names in ``--allowed-hosts`` (default:
  localhost, 127.0.0.1, ::1), as Jupyter does; with keys, or with an explicit list, the list rules.
  ``Host`` is parsed as RFC 9110 says (:mod:`.host_header`): a malformed one is 400, not a name.

Request ids come from ``access_log.AccessLog`` (``X-Request-ID``); error bodies of server-side
failures quote them (``http_errors``), with the detail in the log only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fewshot_common import errors

from ..access import AccessControl, Action, Principal, bearer_key
from .access_log import KEY_NAME_STATE, REQUEST_ID_HEADER
from .dependencies import decode_path_param, strict_query_string
from .host_header import MalformedHost, normalize_host_name, parse_host
from .http_errors import HTTP_STATUS, error_response

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")


def require(action: Action, *, namespace_in_path: bool = False) -> Any:
    """``dependencies=[require(Action.ADD)]``: 401 / 403 unless the caller's key allows it.

    The namespace is the ``namespace`` query parameter, or (``namespace_in_path``) the raw
    ``{namespace}`` path parameter, percent-decoded as the handler decodes it. As a handler
    parameter it also hands over the caller's :class:`Principal`.
    """

    def authorized(request: Request) -> Principal:
        early: dict[object, Principal] = getattr(request.state, _CHECKED_EARLY, None) or {}
        if authorized in early:  # AuthenticateFirst ran this very check before the body came
            return early[authorized]
        access: AccessControl = request.app.state.access
        principal = access.authenticate(bearer_key(request.headers.get("authorization")))
        if access.enabled:
            setattr(request.state, KEY_NAME_STATE, principal.name)  # for the access log
        strict_query_string(request)  # judge the namespace the route will use, not a U+FFFD copy
        if namespace_in_path:
            namespace = decode_path_param(request.path_params["namespace"], "namespace")
        else:
            namespace = request.query_params.get("namespace")
        access.authorize(principal, action, namespace)
        return principal

    setattr(authorized, _ACCESS_CHECK, True)  # AuthenticateFirst runs it before the body is read
    return Depends(authorized)


_ACCESS_CHECK = "fewshot_access_check"
_CHECKED_EARLY = "fewshot_access_checked_early"  # request.state: {check: its principal}
AccessCheck = Callable[[Request], Principal]


def _access_checks(dependant: Dependant) -> list[AccessCheck]:
    """The :func:`require` checks in a route's dependency tree."""
    found: list[AccessCheck] = []
    for dep in dependant.dependencies:
        if getattr(dep.call, _ACCESS_CHECK, False):
            found.append(dep.call)  # type: ignore[arg-type]
        found.extend(_access_checks(dep))
    return found


class _Refused(Exception):
    """Raised from ``receive``: the body is not for this caller."""


class AuthenticateFirst:
    """The access rules of a route (its :func:`require` checks: key, role, namespace) applied
    before a byte of the request body is read.

    FastAPI reads and parses a (multipart) body before it runs any dependency, so without this a
    stranger's 60 MB upload was read and parsed before its 401. The checks run on the handler's
    first ``receive``: by then the router has picked the route (``scope["route"]``), so each route
    keeps its own rules (open routes stay open), and the namespace is in the query or the path.
    A check that passed is not repeated when the route's dependencies run.
    """

    def __init__(self, app: ASGIApp, access: AccessControl) -> None:
        self.app = app
        self.access = access
        self._checks: dict[int, list[AccessCheck]] = {}  # per route object: its tree never changes

    def _checks_of(self, route: object) -> list[AccessCheck]:
        if id(route) not in self._checks:
            dependant = getattr(route, "dependant", None)
            self._checks[id(route)] = _access_checks(dependant) if isinstance(dependant, Dependant) else []
        return self._checks[id(route)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.access.enabled:
            await self.app(scope, receive, send)
            return
        refusal: errors.FewshotError | None = None
        checked = False

        async def receive_after_the_checks() -> Message:
            nonlocal refusal, checked
            if not checked:
                checked = True
                passed: dict[object, Principal] = {}
                try:
                    for check in self._checks_of(scope.get("route")):
                        passed[check] = check(Request(scope))
                except errors.FewshotError as exc:
                    refusal = exc
                    raise _Refused() from None
                scope.setdefault("state", {})[_CHECKED_EARLY] = passed
            return await receive()

        async def send_unless_refused(message: Message) -> None:
            if refusal is None:  # else: the app's answer to a body it never got; ours follows
                await send(message)

        try:
            await self.app(scope, receive_after_the_checks, send_unless_refused)
        except _Refused:
            pass
        if refusal is not None:
            status, kind = errors.lookup(HTTP_STATUS, refusal)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            await error_response(status, kind, str(refusal), headers=headers)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def is_same_origin(scope: Scope, origin: str) -> bool:
    """``origin`` is this request's own scheme://host[:port] (the Host header; browsers leave
    default ports out of both)."""
    host = _header(scope, b"host")
    return host is not None and origin.lower() == f"{scope.get('scheme', 'http')}://{host}".lower()


class CrossOriginGuard:
    def __init__(self, app: ASGIApp, allowed_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in STATE_CHANGING_METHODS:
            origin = _header(scope, b"origin")
            if origin is not None and origin not in self.allowed and not is_same_origin(scope, origin):
                response = error_response(
                    403,
                    "forbidden_origin",
                    f"cross-origin {scope['method']} from origin {origin!r} refused: this server "
                    "accepts changes only from its own origin and the origins in --cors-origins",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HostGuard:
    """403 for an HTTP request whose ``Host`` names none of ``allowed_hosts`` (see the module doc);
    400 for one whose ``Host`` is missing or not RFC 9110's ``uri-host [":" port]``."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(normalize_host_name(h) for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            value = _header(scope, b"host")
            try:
                host = parse_host(value) if value is not None else None
            except MalformedHost as exc:
                await error_response(400, "bad_host", f"malformed Host header: {exc}")(scope, receive, send)
                return
            if host is None:
                await error_response(400, "bad_host", "the request has no Host header")(scope, receive, send)
                return
            if host not in self.allowed:
                response = error_response(
                    403,
                    "forbidden_host",
                    f"host {host!r} refused: without API keys this server answers only "
                    "requests for its own names (--allowed-hosts)",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_security(
    app: FastAPI,
    access: AccessControl | None,
    cors_origins: Sequence[str],
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Keys for the routes that use :func:`require`, the Host rule and the cross-origin rules.

    Middleware added later wraps the earlier: CORS answers preflights before the guard sees them.
    """
    app.state.access = access or AccessControl()
    # Innermost: it must see the scope the router fills in (and the Host and Origin rules go first).
    app.add_middleware(AuthenticateFirst, access=app.state.access)
    app.add_middleware(CrossOriginGuard, allowed_origins=list(cors_origins))
    if allowed_hosts or not app.state.access.enabled:
        app.add_middleware(HostGuard, allowed_hosts=list(allowed_hosts or LOOPBACK_HOST_NAMES))
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
