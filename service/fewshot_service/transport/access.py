"""Who may do what: API keys from a TOML file, and the one :meth:`AccessControl.authorize` that
both transports call (a FastAPI dependency and a gRPC interceptor only extract the credential).

The key file (``fewshot serve --api-keys FILE``, made with ``fewshot keygen``)::

    [[keys]]
    name = "ingest-bot"      # in logs and metrics; never the key itself
    sha256 = "<hex sha256 of the key>"
    role = "write"           # "read": embed, classify, list, get; "write": also add, delete
    namespaces = ["team-a"]  # or ["*"]
    requests_per_s = 20      # optional rate limits (per replica; absent: unlimited), see
    images_per_s = 100       # rate_limit.py; requests_burst / images_burst: default the rate

Only digests are kept; a presented key is hashed and compared with every digest in constant time.
The file is re-read when it changes (polled) or on :meth:`reload` (SIGHUP); a file that does not
parse keeps the keys in use, so a bad edit never locks everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewshot_common.errors import PermissionDenied, Unauthenticated

from ..names import resolve_namespace
from .rate_limit import UNLIMITED, KeyLimits, Limit, RateLimiter

log = logging.getLogger(__name__)

ANY_NAMESPACE = "*"
DEFAULT_POLL_SECONDS = 2.0

AUTH_DECISIONS = Counter(
    "fewshot_auth_decisions_total",
    "Access decisions by API key name (never the key) and outcome.",
    ["key", "outcome"],  # outcome: allowed, denied, unauthenticated
)


class Role(str, Enum):
    READ = "read"
    WRITE = "write"


class Action(str, Enum):
    EMBED = "embed"
    CLASSIFY = "classify"
    LIST = "list"
    GET = "get"
    ADD = "add"
    DELETE = "delete"
    METRICS = "metrics"  # GET /metrics
    # GET /v1/namespaces: any valid key; the answer holds only the namespaces the key may use.
    LIST_NAMESPACES = "list_namespaces"
    # GET /v1/models: any valid key, over its namespaces. DELETE /v1/models/{id}: role write;
    # it drops the model's embeddings in the namespaces the key may use (write to) only.
    LIST_MODELS = "list_models"
    DROP_MODEL = "drop_model"


WRITE_ACTIONS = frozenset({Action.ADD, Action.DELETE, Action.DROP_MODEL})
# Actions that name no one namespace: any valid key may run them (those over several namespaces
# act only on the ones the key may use).
NAMESPACE_FREE_ACTIONS = frozenset(
    {Action.EMBED, Action.METRICS, Action.LIST_NAMESPACES, Action.LIST_MODELS, Action.DROP_MODEL}
)


@dataclass(frozen=True)
class Principal:
    """The caller, as its key says: name, role and namespaces (``*``: all)."""

    name: str
    role: Role
    namespaces: frozenset[str]
    limits: KeyLimits = UNLIMITED

    def may_use(self, namespace: str) -> bool:
        return ANY_NAMESPACE in self.namespaces or namespace in self.namespaces


# Who calls a server started without --api-keys (it listens on loopback, or the operator chose
# --allow-unauthenticated): everything is allowed.
ANONYMOUS = Principal("anonymous", Role.WRITE, frozenset({ANY_NAMESPACE}))


class KeyFileError(ValueError):
    """The API key file cannot be used (unreadable, not TOML, or an entry is wrong)."""


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    role: Role
    namespaces: list[str] = Field(min_length=1)
    # Rate limits (per replica); a burst defaults to one second's worth, at least 1.
    requests_per_s: float | None = Field(default=None, gt=0)
    requests_burst: float | None = Field(default=None, ge=1)
    images_per_s: float | None = Field(default=None, gt=0)
    images_burst: float | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> _KeyEntry:
        for kind in ("requests", "images"):
            if getattr(self, f"{kind}_burst") is not None and getattr(self, f"{kind}_per_s") is None:
                raise ValueError(f"{kind}_burst needs {kind}_per_s")
        return self

    def limits(self) -> KeyLimits:
        return KeyLimits(
            requests=_limit(self.requests_per_s, self.requests_burst),
            images=_limit(self.images_per_s, self.images_burst),
        )


def _limit(rate: float | None, burst: float | None) -> Limit | None:
    if rate is None:
        return None
    return Limit(rate=rate, burst=burst if burst is not None else max(1.0, rate))


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class _StoredKey:
    digest: bytes
    principal: Principal


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_key_file(path: Path) -> tuple[_StoredKey, ...]:
    """The keys of ``path``; KeyFileError naming the problem (never a digest) when unusable."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        entries = _KeyFile.model_validate(data).keys
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"cannot read API key file {path}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise KeyFileError(f"API key file {path} is invalid: {problems}") from None
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise KeyFileError(f"API key file {path}: key names must be unique")
    if len({e.sha256.lower() for e in entries}) != len(entries):
        raise KeyFileError(f"API key file {path}: two entries have the same key")
    return tuple(
        _StoredKey(bytes.fromhex(e.sha256), Principal(e.name, e.role, frozenset(e.namespaces), e.limits()))
        for e in entries
    )


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Changes when the file is rewritten or replaced (a Kubernetes Secret swaps a symlink)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class AccessControl:
    """The key table of one server; without a key file every caller is :data:`ANONYMOUS`."""

    def __init__(self, key_file: Path | None = None, *, poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self.key_file = key_file
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._keys: tuple[_StoredKey, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.limiter = RateLimiter()
        if key_file is not None:
            self._stamp = _file_stamp(key_file)
            self._keys = load_key_file(key_file)  # at start-up a bad file is fatal
            log.info("API keys: %d loaded (%s)", len(self._keys), self._names())

    @property
    def enabled(self) -> bool:
        return self.key_file is not None

    def _names(self) -> str:
        return ", ".join(k.principal.name for k in self._keys) or "none"

    # -- decisions -----------------------------------------------------------------------------

    def authenticate(self, key: str | None) -> Principal:
        """The principal of ``key``; Unauthenticated when it is missing or unknown."""
        if not self.enabled:
            return ANONYMOUS
        if not key:
            AUTH_DECISIONS.labels("", "unauthenticated").inc()
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>'")
        digest = key_digest(key)
        found: Principal | None = None
        with self._lock:
            keys = self._keys
        for stored in keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(stored.digest, digest):
                found = stored.principal
        if found is None:
            AUTH_DECISIONS.labels("", "unauthenticated").inc()
            raise Unauthenticated("unknown API key")
        return found

    def authorize(self, principal: Principal, action: Action, namespace: str | None = None) -> None:
        """PermissionDenied, naming what was refused, unless ``principal`` may run ``action`` on
        ``namespace`` (empty: ``default``; ignored for actions that touch no namespace)."""
        if action in WRITE_ACTIONS and principal.role is not Role.WRITE:
            AUTH_DECISIONS.labels(principal.name, "denied").inc()
            raise PermissionDenied(
                f"API key {principal.name!r} has role {principal.role.value!r}; "
                f"{action.value} needs role 'write'"
            )
        if action not in NAMESPACE_FREE_ACTIONS:
            resolved = resolve_namespace(namespace)
            if not principal.may_use(resolved):
                AUTH_DECISIONS.labels(principal.name, "denied").inc()
                raise PermissionDenied(
                    f"API key {principal.name!r} may not {action.value} in namespace {resolved!r}"
                )
        if self.enabled:
            AUTH_DECISIONS.labels(principal.name, "allowed").inc()

    def check(self, key: str | None, action: Action, namespace: str | None = None) -> Principal:
        """:meth:`authenticate` then :meth:`authorize`: what a transport calls per request."""
        principal = self.authenticate(key)
        self.authorize(principal, action, namespace)
        return principal

    def admit_request(self, principal: Principal) -> None:
        """RateLimited when ``principal``'s key is over its requests per second."""
        self.limiter.take(principal.name, "requests", principal.limits.requests)

    def admit_images(self, principal: Principal, count: int) -> None:
        """RateLimited when ``count`` more images would put the key over its images per second."""
        self.limiter.take(principal.name, "images", principal.limits.images, count)

    # -- rotation ------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the key file; on any problem keep the keys in use and log why."""
        if self.key_file is None:
            return False
        stamp = _file_stamp(self.key_file)
        if stamp is not None and stamp[1] == 0:
            # An editor or `>` that rewrites the file in place truncates it first: read then, it
            # would revoke every key until the next poll. The finished write changes the stamp.
            with self._lock:
                self._stamp = stamp
            log.warning("API keys: the key file is empty; keeping the %d keys in use", len(self._keys))
            return False
        try:
            keys = load_key_file(self.key_file)
        except KeyFileError as exc:
            with self._lock:
                self._stamp = stamp  # do not retry the same broken file every poll
            log.error("API keys: keeping the %d keys in use: %s", len(self._keys), exc)
            return False
        with self._lock:
            self._keys, self._stamp = keys, stamp
        log.info("API keys: reloaded, %d keys (%s)", len(keys), self._names())
        return True

    def watch(self) -> None:
        """Reload whenever the file changes, checked every ``poll_seconds`` (0: never)."""
        if self.key_file is None or self.poll_seconds <= 0 or self._watcher is not None:
            return

        def poll() -> None:
            while not self._stop.wait(self.poll_seconds):
                if _file_stamp(self.key_file) != self._stamp:  # type: ignore[arg-type]
                    self.reload()

        self._watcher = threading.Thread(target=poll, name="fewshot-api-keys", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None
