"""The names and limits of a request, checked the same way whichever transport it came through:
namespaces, labels, example ids (``resolve_*``) and top_k, with their ``MAX_*`` limits.

A module of its own, importing only :mod:`fewshot_common.errors`, so the access rules, the REST
routes and ``fewshot keygen`` can check a name without loading the core (and ONNX Runtime).
"""

from __future__ import annotations

from fewshot_common.errors import InvalidInput

DEFAULT_TOP_K = 5
DEFAULT_NAMESPACE = "default"
MAX_TOP_K = 1000
# Namespaces, labels and example ids alike: any UTF-8 string of 1-128 characters (the registry
# keeps names out of its key syntax by hex-encoding them, so no alphabet restriction is needed).
MAX_NAME_CHARS = 128
# Except these: URL parsers (browsers, proxies, httpx) resolve them as dot-segments, even
# percent-encoded, so such a name could be created but never be listed or deleted again over REST.
DOT_SEGMENT_NAMES = frozenset({".", ".."})


def resolve_name(value: object, what: str) -> str:
    """A label, namespace or example id: a UTF-8 string of 1-128 characters other than ``.`` and
    ``..``, else InvalidInput."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_NAME_CHARS:
        raise InvalidInput(f"{what} must be 1-{MAX_NAME_CHARS} characters long, got {len(value)}")
    if value in DOT_SEGMENT_NAMES:
        raise InvalidInput(
            f"{what} {value!r} is not allowed: a URL cannot carry it ('.' and '..' are path "
            "navigation, even percent-encoded)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8: {exc.reason}") from None
    return value


def resolve_namespace(namespace: str | None) -> str:
    """Empty (or unset) means ``default``; otherwise a name of at most 128 characters."""
    if not namespace:
        return DEFAULT_NAMESPACE
    if isinstance(namespace, str) and len(namespace) > MAX_NAME_CHARS:
        raise InvalidInput(f"namespace must be at most {MAX_NAME_CHARS} characters, got {len(namespace)}")
    return resolve_name(namespace, "namespace")


def resolve_label(label: object) -> str:
    return resolve_name(label, "label")


def resolve_example_id(example_id: object) -> str:
    return resolve_name(example_id, "example id")


def resolve_top_k(top_k: int | None) -> int:
    """0 (or unset) means 5; at most :data:`MAX_TOP_K`."""
    if not top_k:
        return DEFAULT_TOP_K
    if top_k < 0 or top_k > MAX_TOP_K:
        raise InvalidInput(f"top_k must be between 0 and {MAX_TOP_K}, got {top_k}")
    return int(top_k)
