"""Cross-origin rules for browsers, and no secrets or internals in output (issue 13)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis

from fewshot_client import FewShotClient
from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_client import redacted_url
from fewshot_service.registry.redis_server import ManagedRedis, free_port
from fewshot_service.transport.rest.host_header import MalformedHost, parse_host

import image_samples as samples
from conftest import stack_settings

ALLOWED_ORIGIN = "https://app.example"
EVIL_ORIGIN = "http://evil.example"


@pytest.fixture
def open_server(tiny_model_path: Path, redis_url: str) -> Iterator[httpx.Client]:
    """No keys, loopback, one allowed cross-origin site."""
    settings = stack_settings(tiny_model_path, redis_url, cors_origins=[ALLOWED_ORIGIN])
    with ServerStack(settings) as stack:
        with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=60) as http:
            yield http


def _add(http: httpx.Client, label: str, origin: str | None) -> httpx.Response:
    headers = {"Origin": origin} if origin else {}
    files = {"files": ("x.png", samples.grey_png(), "image/png")}
    return http.post(f"/v1/classes/{label}/examples", files=files, headers=headers)


@pytest.mark.parametrize("origin", [EVIL_ORIGIN, "null", "http://127.0.0.1", "https://app.example.evil"])
def test_cross_origin_changes_are_refused(open_server: httpx.Client, origin: str) -> None:
    refused = _add(open_server, "cat", origin)
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden_origin"
    assert "access-control-allow-origin" not in refused.headers
    assert _add(open_server, "dog", None).status_code == 201
    delete = open_server.delete("/v1/classes/dog", headers={"Origin": origin})
    assert delete.status_code == 403
    classes = open_server.get("/v1/classes").json()["classes"]
    assert classes == [{"label": "dog", "count": 1}]  # nothing added, nothing deleted


def test_same_origin_and_originless_requests_pass(open_server: httpx.Client) -> None:
    own_origin = str(open_server.base_url).rstrip("/")
    assert _add(open_server, "cat", own_origin).status_code == 201
    assert _add(open_server, "dog", None).status_code == 201
    assert open_server.delete("/v1/classes/cat", headers={"Origin": own_origin}).status_code == 200
    assert open_server.delete("/v1/classes/dog").status_code == 200


def test_allowed_origins_get_cors_answers(open_server: httpx.Client) -> None:
    added = _add(open_server, "cat", ALLOWED_ORIGIN)
    assert added.status_code == 201
    assert added.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = open_server.options(
        "/v1/classes/cat",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "DELETE" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    foreign = open_server.options(
        "/v1/classes/cat", headers={"Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "DELETE"}
    )
    assert foreign.status_code == 400
    assert "access-control-allow-origin" not in foreign.headers
    # A foreign page may send a read, but the browser gets no CORS header to let it see the answer.
    read = open_server.get("/v1/classes", headers={"Origin": EVIL_ORIGIN})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]"])
def test_an_open_server_refuses_foreign_host_names(open_server: httpx.Client, host: str) -> None:
    # A DNS-rebinding page is same-origin with itself, so only its Host header gives it away.
    refused = open_server.get("/v1/classes", headers={"Host": host})
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden_host"
    added = open_server.post(
        "/v1/classes/cat/examples",
        headers={"Host": host, "Origin": f"http://{host}"},
        files={"files": ("x.png", samples.grey_png(), "image/png")},
    )
    assert added.status_code == 403
    assert open_server.get("/v1/classes").json()["classes"] == []  # nothing was added
    for own in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST.", "localhost:", "[0:0::1]"):
        assert open_server.get("/v1/classes", headers={"Host": own}).status_code == 200, own


MALFORMED_HOSTS = [
    "localhost:18000@evil.example",
    "[::1]evil.example",
    "localhost:evil",
    "127.0.0.1:80:80",
    "[::1",
    "[fe80::1%25eth0]",
    "[localhost]",
    "localhost/x",
    "local host",
    ":8000",
    "",
]


@pytest.mark.parametrize("host", MALFORMED_HOSTS)
def test_an_open_server_answers_a_malformed_host_400(open_server: httpx.Client, host: str) -> None:
    # RFC 9110: uri-host [":" port]; a loose split took the odd ones for "localhost".
    refused = open_server.get("/v1/classes", headers={"Host": host})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "bad_host"
    added = open_server.post(
        "/v1/classes/cat/examples",
        headers={"Host": host},
        files={"files": ("x.png", samples.grey_png(), "image/png")},
    )
    assert added.status_code == 400
    assert open_server.get("/v1/classes").json()["classes"] == []


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("localhost", "localhost"),
        ("LocalHost.:8000", "localhost"),
        ("127.0.0.1:", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[0:0:0:0:0:0:0:1]:80", "::1"),
        ("[V1.fe:80]", "v1.fe:80"),
        ("[::1]:", "::1"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a%2Db", "a%2db"),
    ],
)
def test_parse_host_reads_rfc_9110_hosts(value: str, host: str) -> None:
    assert parse_host(value) == host


@pytest.mark.parametrize("value", [*MALFORMED_HOSTS, "[]", "[::1]x:1", "a:1:2", "h\u00e9.example", "%zz"])
def test_parse_host_refuses_what_rfc_9110_does_not_allow(value: str) -> None:
    with pytest.raises(MalformedHost):
        parse_host(value)


def test_a_request_without_host_is_400(open_server: httpx.Client) -> None:
    port = open_server.base_url.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/classes HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"bad_host" in answer


def test_allowed_hosts_name_the_hosts_an_open_server_answers(tiny_model_path: Path, redis_url: str) -> None:
    settings = stack_settings(tiny_model_path, redis_url, allowed_hosts=["fewshot.lan"])
    with ServerStack(settings) as stack, httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}") as http:
        assert http.get("/healthz", headers={"Host": "fewshot.lan:8000"}).status_code == 200
        assert http.get("/healthz", headers={"Host": "localhost"}).status_code == 403  # the list rules


# --- no secrets, no internals -----------------------------------------------------------------------


def test_redacted_url_hides_only_the_password() -> None:
    assert redacted_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted_url("rediss://user:s3cret@[::1]:6380") == "rediss://user:***@[::1]:6380"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_redis_password_is_never_printed(tiny_model_path: Path, tmp_path: Path, serve_process) -> None:
    password = "pw-7c0ffee-do-not-print"
    with ManagedRedis(tmp_path / "redis", persistent=False) as store:
        redis.Redis.from_url(store.url).config_set("requirepass", password)
        url = f"redis://:{password}@127.0.0.1:{store.port}/0"
        server = serve_process(["--model", tiny_model_path, "--log-level", "debug"], env={"REDIS_URL": url})
        server.wait_ready()
        assert httpx.get(f"{server.http_url}/readyz", timeout=30).json()["ready"] is True
        assert "redis://:***@" in server.banner
        assert server.stop() == 0
        output = server.banner + server.output()
    assert password not in output
    assert "***" in output


def test_redis_failures_answer_a_request_id_not_the_address(
    tiny_model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    with ServerStack(stack_settings(tiny_model_path, f"redis://127.0.0.1:{port}/0")) as stack:
        response = httpx.get(f"http://127.0.0.1:{stack.http_port}/v1/classes", timeout=30)
        assert response.status_code == 503
        body = response.json()
        assert body["error"] == "unavailable"
        assert body["request_id"] == response.headers["x-request-id"]
        assert str(port) not in response.text and "127.0.0.1" not in response.text
        # The detail is in the server log, under the same id.
        logged = [r.getMessage() for r in caplog.records if body["request_id"] in r.getMessage()]
        assert logged and str(port) in logged[0]

        with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
            call = client._stub.Classify.with_call  # the client's stub: to read trailing metadata
            from fewshot_api.fewshot.v1 import fewshot_pb2

            with pytest.raises(grpc.RpcError) as failed:
                call(fewshot_pb2.ClassifyRequest(images=[samples.grey_png()]), timeout=30)
    error = failed.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    request_id = dict(error.trailing_metadata())["request-id"]
    assert f"request id {request_id}" in error.details()
    assert str(port) not in error.details()
    assert any(request_id in r.getMessage() and str(port) in r.getMessage() for r in caplog.records)


def test_every_response_has_one_request_id(open_server: httpx.Client) -> None:
    first, second = open_server.get("/healthz"), open_server.get("/v1/classes/nope")
    assert second.status_code == 404
    ids = [first.headers.get_list("x-request-id"), second.headers.get_list("x-request-id")]
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]


# --- security headers ---------------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(open_server: httpx.Client) -> None:
    from fewshot_service.transport.rest.security_headers import API_CSP, DOCS_CSP, UI_CSP

    answers = {
        "/v1/classes": (open_server.get("/v1/classes"), API_CSP),
        "404": (open_server.get("/v1/classes/nope"), API_CSP),
        "422": (open_server.get("/v1/classes?namespace=" + "n" * 129), API_CSP),
        "413": (open_server.post("/v1/classify", content=b"x" * (65 * 2**20)), API_CSP),
        "403 host": (open_server.get("/v1/classes", headers={"Host": "evil.example"}), API_CSP),
        "400 host": (open_server.get("/v1/classes", headers={"Host": "localhost:evil"}), API_CSP),
        "/metrics": (open_server.get("/metrics"), API_CSP),
        "/ui/": (open_server.get("/ui/"), UI_CSP),
        "/ui/app.js": (open_server.get("/ui/app.js"), UI_CSP),
        "/docs": (open_server.get("/docs"), DOCS_CSP),
        "/redoc": (open_server.get("/redoc"), DOCS_CSP),
        "/docs-assets": (open_server.get("/docs-assets/swagger-ui-bundle.js"), DOCS_CSP),
    }
    assert answers["413"][0].status_code == 413 and answers["400 host"][0].status_code == 400
    for what, (response, csp) in answers.items():
        assert response.headers["x-content-type-options"] == "nosniff", what
        assert response.headers["x-frame-options"] == "DENY", what
        assert response.headers["referrer-policy"] == "no-referrer", what
        assert response.headers["content-security-policy"] == csp, what
        assert "frame-ancestors 'none'" in csp
    assert "script-src 'self'" in UI_CSP and "unsafe-inline" not in UI_CSP
    # The gallery shows fetched example images from blob: URLs; nothing needs data: any more.
    assert "img-src 'self' blob:;" in UI_CSP and "data:" not in UI_CSP
