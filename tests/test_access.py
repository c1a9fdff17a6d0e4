"""API keys, roles and namespaces on real servers over real TLS (issue 13).

One server with TLS and a key file serves the whole role x namespace x transport x operation
matrix; others test mTLS, key rotation (file change and SIGHUP), keygen and protected mode.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from fewshot_api.fewshot.v1 import fewshot_pb2
from fewshot_client import FewShotClient
from fewshot_common import cli
from fewshot_common.errors import NotFound, Unauthenticated
from fewshot_service.app import ServerStack
from fewshot_service.settings import Settings
from fewshot_service.transport.access import AccessControl, Action, key_digest

import image_samples as samples
from conftest import stack_settings
from tls_certs import Pki, make_pki

TEAM_A, TEAM_B = "team-a", "team-b"
SEED_IMAGE = samples.solid_png((200, 30, 30))
# Key name -> (role, namespaces); the key itself is made per run.
KEY_SPECS = {
    "read-a": ("read", [TEAM_A]),
    "write-a": ("write", [TEAM_A]),
    "read-all": ("read", ["*"]),
    "write-all": ("write", ["*"]),
}


def write_key_file(path: Path, keys: dict[str, tuple[str, str, list[str]]]) -> None:
    """``keys``: name -> (key, role, namespaces). Replaced atomically, as an operator would."""
    entries = "".join(
        f'[[keys]]\nname = "{name}"\nsha256 = "{key_digest(key).hex()}"\nrole = "{role}"\n'
        f"namespaces = [{', '.join(repr(ns).replace(chr(39), chr(34)) for ns in namespaces)}]\n\n"
        for name, (key, role, namespaces) in keys.items()
    )
    staging = path.with_suffix(".new")
    staging.write_text(entries)
    os.replace(staging, path)


def ssl_context(pki: Pki, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


@dataclass
class SecureServer:
    stack: ServerStack
    pki: Pki
    keys: dict[str, str]  # name -> key

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.stack.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.stack.grpc_port}"

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.https_url, verify=ssl_context(self.pki), headers=headers, timeout=60
        )

    def grpc_client(self, key: str | None = None) -> FewShotClient:
        return FewShotClient(self.grpc_target, api_key=key or "", root_certificates=self.pki.ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_server(
    tiny_model_path: Path, private_redis, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureServer]:
    """TLS + API keys, classes "seed" in both namespaces (own key prefix: other tests flush the
    shared private Redis only between tests, never during this module)."""
    import secrets

    keys = {name: secrets.token_urlsafe(32) for name in KEY_SPECS}
    key_file = tmp_path_factory.mktemp("keys") / "api-keys.toml"
    write_key_file(key_file, {n: (keys[n], *KEY_SPECS[n]) for n in KEY_SPECS})
    settings = stack_settings(
        tiny_model_path,
        private_redis.url,
        redis_key_prefix="access-matrix",
        api_keys=key_file,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
    )
    with ServerStack(settings) as stack:
        assert stack.core is not None
        for namespace in (TEAM_A, TEAM_B):
            stack.core.add_examples(namespace, "seed", [SEED_IMAGE])
        yield SecureServer(stack, pki, keys)


# --- the matrix -----------------------------------------------------------------------------------

ROLES = ["read", "write"]
# allowed: a team-a key on team-a; denied: a team-a key on team-b; star: a "*" key on team-b.
NAMESPACE_CASES = {"allowed": ("-a", TEAM_A), "denied": ("-a", TEAM_B), "star": ("-all", TEAM_B)}
REST_OPERATIONS = ["embed", "classify", "list", "get", "image", "report", "add", "delete"]
GRPC_OPERATIONS = ["embed", "classify"]  # the gRPC API has no class management


def expected_allowed(role: str, namespace_case: str, operation: str) -> bool:
    if operation == "embed":
        return True  # any valid key; touches no namespace
    if namespace_case == "denied":
        return False
    return role == "write" or operation not in {"add", "delete"}


MATRIX = [
    pytest.param(transport, role, case, op, id=f"{transport}-{role}-{case}-{op}")
    for transport, operations in (("rest", REST_OPERATIONS), ("grpc", GRPC_OPERATIONS))
    for role in ROLES
    for case in NAMESPACE_CASES
    for op in operations
]


@pytest.mark.parametrize(("transport", "role", "namespace_case", "operation"), MATRIX)
def test_role_namespace_transport_matrix(
    secure_server: SecureServer, transport: str, role: str, namespace_case: str, operation: str
) -> None:
    suffix, namespace = NAMESPACE_CASES[namespace_case]
    key_name = f"{role}{suffix}"
    key = secure_server.keys[key_name]
    core = secure_server.stack.core
    assert core is not None
    allowed = expected_allowed(role, namespace_case, operation)
    label = f"{operation}-{transport}-{role}-{namespace_case}"
    image = samples.solid_png((190, 40, 40))

    if transport == "grpc":
        with secure_server.grpc_client(key) as client:
            call: Callable[[], object] = {
                "embed": lambda: client.embed([image]),
                # The seed's own image: "seed" stays first whatever other tests added.
                "classify": lambda: client.classify([SEED_IMAGE], namespace=namespace),
            }[operation]
            if allowed:
                result = call()
                if operation == "classify":
                    assert result[0][0].label == "seed"  # type: ignore[index]
                return
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            message = refused.value.details()
            assert key_name in message and f"namespace {namespace!r}" in message and key not in message
            return

    if operation == "delete":
        core.add_examples(namespace, label, [image])
    with secure_server.http(key) as http:
        files = {"files": ("x.png", image, "image/png")}
        params = {"namespace": namespace}
        response = {
            "embed": lambda: http.post("/v1/embed", files=files),
            "classify": lambda: http.post("/v1/classify", params=params, files=files),
            "list": lambda: http.get("/v1/classes", params=params),
            "get": lambda: http.get("/v1/classes/seed", params=params),
            "image": lambda: http.get(
                f"/v1/classes/seed/examples/{core.get_class(namespace, 'seed').example_ids[0]}/image",
                params=params,
            ),
            "report": lambda: http.get("/v1/report", params=params),
            "add": lambda: http.post(f"/v1/classes/{label}/examples", params=params, files=files),
            "delete": lambda: http.delete(f"/v1/classes/{label}", params=params),
        }[operation]()
    if allowed:
        assert response.status_code == (201 if operation == "add" else 200), response.text
        if operation == "delete":
            with pytest.raises(NotFound):
                core.get_class(namespace, label)
        if operation == "add":
            assert core.get_class(namespace, label).count == 1
        if operation == "image":
            assert response.headers["content-type"] == "image/png"
        return
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"] == "permission_denied"
    assert key_name in body["message"] and key not in response.text
    # The role is checked first: a read key's write names the role, otherwise the namespace.
    role_refused = role == "read" and operation in {"add", "delete"}
    assert ("needs role 'write'" if role_refused else f"namespace {namespace!r}") in body["message"]
    # The registry is untouched by a refused change.
    if operation == "delete":
        assert core.get_class(namespace, label).count == 1
    if operation == "add":
        with pytest.raises(NotFound):
            core.get_class(namespace, label)


# --- missing and unknown keys, open endpoints --------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key", "Basic dXNlcjpwYXNz", "Bearer"])
def test_rest_without_a_valid_key_is_401(secure_server: SecureServer, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with secure_server.http() as http:
        for response in (
            http.get("/v1/classes", params={"namespace": TEAM_A}, headers=headers),
            http.post("/v1/classify", files={"files": ("x.png", samples.grey_png())}, headers=headers),
            http.delete("/v1/classes/seed", params={"namespace": TEAM_A}, headers=headers),
            http.get("/metrics", headers=headers),
        ):
            assert response.status_code == 401, response.text
            assert response.json()["error"] == "unauthenticated"
            assert response.headers["www-authenticate"] == "Bearer"
            assert "not-a-key" not in response.text
    assert secure_server.stack.core is not None
    assert secure_server.stack.core.get_class(TEAM_A, "seed").count == 1


UPLOAD_BYTES = 30 * 1000 * 1000
UPLOAD_SECONDS = 2.0  # paced like a fast client link (15 MB/s): reading it all takes this long


@pytest.fixture(scope="module")
def plain_keyed_stack(
    tiny_model_path: Path, private_redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerStack, str]]:
    """Keys without TLS (on loopback): a plain socket can stream a body from one thread while
    another reads the answer (an SSL socket cannot be shared so)."""
    import secrets

    key, read_key = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    key_file = tmp_path_factory.mktemp("plain-keys") / "api-keys.toml"
    write_key_file(key_file, {"write-a": (key, "write", [TEAM_A]), "read-a": (read_key, "read", [TEAM_A])})
    settings = stack_settings(
        tiny_model_path, private_redis.url, redis_key_prefix="access-early", api_keys=key_file
    )
    with ServerStack(settings) as stack:
        yield stack, key, read_key


def _time_to_answer(
    port: int, path: str, authorization: str | None, chunked: bool
) -> tuple[float, bytes, int]:
    """POST a 30 MB multipart body over a real socket, streamed by a second thread over
    ``UPLOAD_SECONDS``; (seconds from the end of the headers to the status line, the answer: head
    and body, body bytes sent by then)."""
    boundary = "b0undary"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        + (f"Authorization: {authorization}\r\n" if authorization else "")
        + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {UPLOAD_BYTES}\r\n")
        + "\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0

    def stream_body() -> None:
        nonlocal sent
        part_head = 'Content-Disposition: form-data; name="files"; filename="x.jpg"'
        piece = f"--{boundary}\r\n{part_head}\r\n\r\n".encode()
        piece = piece.ljust(65536, b"\0")
        try:
            while sent < UPLOAD_BYTES:
                pause = started + UPLOAD_SECONDS * sent / UPLOAD_BYTES - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                data = piece[: UPLOAD_BYTES - sent]
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: what an early refusal does

    sock.sendall(head)
    started = time.perf_counter()
    sender = threading.Thread(target=stream_body, daemon=True)
    sender.start()
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    seconds, taken = time.perf_counter() - started, sent
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):  # the refusal's JSON body, for its message
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    sock.close()
    sender.join(timeout=30)
    return seconds, head + b"\r\n\r\n" + body, taken


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key"])
def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(
    plain_keyed_stack: tuple[ServerStack, str, str], authorization: str | None, chunked: bool
) -> None:
    stack, key, _ = plain_keyed_stack
    assert stack.http_port is not None and stack.core is not None
    for path in ("/v1/classify", "/v1/classes/cat/examples?namespace=team-a", "/v1/embed"):
        seconds, head, taken = _time_to_answer(stack.http_port, path, authorization, chunked)
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b"www-authenticate: Bearer" in head
        assert seconds < 0.5, f"{path}: 401 after {seconds:.2f}s"
        assert taken < UPLOAD_BYTES, f"{path}: the whole body was taken before the 401"
    with pytest.raises(NotFound):
        stack.core.get_class(TEAM_A, "cat")
    # The same body with the key is read and judged (a body that holds no image: 422).
    seconds, head, taken = _time_to_answer(
        stack.http_port, "/v1/classify?namespace=team-a", f"Bearer {key}", chunked
    )
    assert taken == UPLOAD_BYTES and not head.startswith(b"HTTP/1.1 401"), head


def test_an_upload_outside_the_keys_role_or_namespaces_is_refused_before_its_body_is_read(
    plain_keyed_stack: tuple[ServerStack, str, str],
) -> None:
    stack, write_key, read_key = plain_keyed_stack
    assert stack.http_port is not None and stack.core is not None
    for path, key, message in (
        ("/v1/classes/cat/examples?namespace=team-a", read_key, b"needs role 'write'"),
        ("/v1/classify?namespace=team-b", write_key, b"namespace 'team-b'"),
        ("/v1/classes/cat/examples?namespace=team-b", write_key, b"namespace 'team-b'"),
    ):
        seconds, head, taken = _time_to_answer(stack.http_port, path, f"Bearer {key}", chunked=False)
        assert head.startswith(b"HTTP/1.1 403") and message in head, head
        assert seconds < 0.5 and taken < UPLOAD_BYTES, f"{path}: 403 after {seconds:.2f}s"
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}") as http:
        refused = http.post(
            "/v1/classes/cat/examples",
            params={"namespace": TEAM_B},
            files={"files": ("x.png", samples.grey_png())},
            headers={"Authorization": f"Bearer {write_key}"},
        )
        assert refused.status_code == 403 and "team-b" in refused.json()["message"]

        def allowed_decisions() -> float:
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {read_key}"}).text
            line = 'fewshot_auth_decisions_total{key="write-a",outcome="allowed"}'
            return sum(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(line))

        before = allowed_decisions()
        added = http.post(
            "/v1/classes/cat/examples",
            params={"namespace": TEAM_A},
            files={"files": ("x.png", samples.grey_png())},
            headers={"Authorization": f"Bearer {write_key}"},
        )
        assert added.status_code == 201, added.text
        # The early check is the route's check: one decision per request, not one per pass.
        assert allowed_decisions() - before == 1.0


@pytest.mark.parametrize("key", ["", "not-a-key"])
def test_grpc_without_a_valid_key_is_unauthenticated(secure_server: SecureServer, key: str) -> None:
    with secure_server.grpc_client(key) as client:
        for call in (
            lambda: client.embed([samples.grey_png()]),
            lambda: client.classify([samples.grey_png()]),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "not-a-key" not in refused.value.details()


@pytest.mark.parametrize("key", ["", "not-a-key"])
def test_grpc_refuses_a_stranger_before_the_request_message_arrives(
    secure_server: SecureServer, key: str
) -> None:
    """The request message is held back for 3 s (as a slow 60 MB upload would be): the refusal
    must not wait for it, and the message is never parsed or used."""
    credentials = grpc.ssl_channel_credentials(secure_server.pki.ca.read_bytes())
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    request = fewshot_pb2.ClassifyRequest(images=[samples.grey_png()], namespace=TEAM_A).SerializeToString()

    def held_back() -> Iterator[bytes]:
        time.sleep(3.0)
        yield request

    with grpc.secure_channel(secure_server.grpc_target, credentials) as channel:
        classify = channel.stream_unary("/fewshot.v1.FewShot/Classify")  # bytes in, bytes out
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as refused:
            classify(held_back(), metadata=metadata, timeout=30)
        seconds = time.perf_counter() - started
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert seconds < 0.5, f"UNAUTHENTICATED after {seconds:.2f}s"
        # With a key the same held-back message is waited for and answered.
        read_key = (("authorization", f"Bearer {secure_server.keys['read-a']}"),)
        answer = fewshot_pb2.ClassifyResponse.FromString(classify(held_back(), metadata=read_key, timeout=30))
        assert len(answer.results) == 1 and answer.results[0].predictions


def test_health_docs_and_reflection_stay_open_metrics_need_a_key(secure_server: SecureServer) -> None:
    with secure_server.http() as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").json()["ready"] is True
        assert http.get("/docs").status_code == 200
        for page in ("/redoc", "/redoc-assets/redoc.standalone.js", "/redoc-assets/logo.svg", "/favicon.ico"):
            assert http.get(page).status_code == 200, page
        assert http.get("/openapi.json").status_code == 200
        assert http.get("/metrics").status_code == 401
    with secure_server.http(secure_server.keys["read-a"]) as http:
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert 'fewshot_auth_decisions_total{key="read-a",outcome="allowed"}' in metrics.text
    assert not any(key in metrics.text for key in secure_server.keys.values())

    credentials = grpc.ssl_channel_credentials(secure_server.pki.ca.read_bytes())
    with grpc.secure_channel(secure_server.grpc_target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert "fewshot.v1.FewShot" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_plaintext_clients_cannot_talk_to_the_tls_server(secure_server: SecureServer) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{secure_server.stack.http_port}/healthz", timeout=10)
    with FewShotClient(
        secure_server.grpc_target, api_key=secure_server.keys["read-all"], timeout=10
    ) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.embed([samples.grey_png()])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_reads_the_key_from_the_environment(
    secure_server: SecureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEWSHOT_API_KEY", secure_server.keys["read-a"])
    with FewShotClient(
        secure_server.grpc_target, root_certificates=secure_server.pki.ca.read_bytes()
    ) as client:
        assert client.classify([SEED_IMAGE], namespace=TEAM_A)[0][0].label == "seed"


# --- mTLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_stack(tiny_model_path: Path, private_redis, pki: Pki) -> Iterator[ServerStack]:
    settings = stack_settings(
        tiny_model_path,
        private_redis.url,
        redis_key_prefix="access-mtls",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    with ServerStack(settings) as stack:
        yield stack


def test_mtls_accepts_a_client_certificate_from_its_ca(mtls_stack: ServerStack, pki: Pki) -> None:
    url = f"https://127.0.0.1:{mtls_stack.http_port}"
    with httpx.Client(base_url=url, verify=ssl_context(pki, client_cert=True), timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/v1/classes").status_code == 200
    with FewShotClient(
        f"127.0.0.1:{mtls_stack.grpc_port}",
        root_certificates=pki.ca,
        private_key=pki.client_key,
        certificate_chain=pki.client_cert,
    ) as client:
        assert client.embed([samples.grey_png()]).shape[0] == 1


@pytest.mark.parametrize("certificate", ["none", "rogue"])
def test_mtls_refuses_clients_without_a_trusted_certificate(
    mtls_stack: ServerStack, pki: Pki, certificate: str
) -> None:
    context = ssl_context(pki)
    client_files: dict[str, Path] = {}
    if certificate == "rogue":
        context.load_cert_chain(str(pki.rogue_client_cert), str(pki.rogue_client_key))
        client_files = {"private_key": pki.rogue_client_key, "certificate_chain": pki.rogue_client_cert}
    with pytest.raises(httpx.TransportError):
        with httpx.Client(verify=context, timeout=10) as http:
            http.get(f"https://127.0.0.1:{mtls_stack.http_port}/healthz")
    with FewShotClient(
        f"127.0.0.1:{mtls_stack.grpc_port}", root_certificates=pki.ca, timeout=10, **client_files
    ) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.embed([samples.grey_png()])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# --- rotation ---------------------------------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _list_status(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/classes", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def test_keys_rotate_when_the_file_changes_and_a_bad_file_keeps_them(
    tiny_model_path: Path, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "keys.toml"
    write_key_file(key_file, {"old": ("old-key-123", "read", ["*"])})
    settings = stack_settings(tiny_model_path, redis_url, api_keys=key_file, api_keys_poll_s=0.1)
    with ServerStack(settings) as stack:
        url = f"http://127.0.0.1:{stack.http_port}"
        assert _list_status(url, "old-key-123") == 200
        assert _list_status(url, "new-key-456") == 401

        write_key_file(key_file, {"new": ("new-key-456", "read", ["*"])})
        assert _wait_for(lambda: _list_status(url, "new-key-456") == 200)
        assert _list_status(url, "old-key-123") == 401
        with FewShotClient(f"127.0.0.1:{stack.grpc_port}", api_key="new-key-456") as client:
            assert client.embed([samples.grey_png()]).shape[0] == 1

        key_file.write_text("[[keys]]\nname = 'broken'\n")  # no digest, no role
        assert _wait_for(lambda: "keeping the 1 keys in use" in caplog.text)
        assert _list_status(url, "new-key-456") == 200
    assert "new-key-456" not in caplog.text and "old-key-123" not in caplog.text


def test_sighup_reloads_the_keys(
    tiny_model_path: Path, redis_url: str, tmp_path: Path, serve_process
) -> None:
    key_file = tmp_path / "keys.toml"
    write_key_file(key_file, {"old": ("old-key-123", "read", ["*"])})
    server = serve_process(
        ["--model", tiny_model_path, "--api-keys", key_file, "--api-keys-poll-s", "0"],
        env={"REDIS_URL": redis_url},
    ).wait_ready()
    assert "API keys: from" in server.banner
    assert _list_status(server.http_url, "old-key-123") == 200
    write_key_file(key_file, {"new": ("new-key-456", "write", ["*"])})
    time.sleep(0.5)
    assert _list_status(server.http_url, "new-key-456") == 401  # no polling: only SIGHUP reloads
    server.process.send_signal(signal.SIGHUP)
    assert _wait_for(lambda: _list_status(server.http_url, "new-key-456") == 200)
    assert _list_status(server.http_url, "old-key-123") == 401
    assert server.process.poll() is None
    assert server.stop() == 0
    assert "old-key-123" not in server.output() and "new-key-456" not in server.output()


# --- keygen, protected mode --------------------------------------------------------------------------


def test_keygen_prints_a_key_and_a_working_toml_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keygen", "--name", "ingest-bot", "--role", "write", "--namespace", TEAM_A]) == 0
    captured = capsys.readouterr()
    key = captured.err.split("\n")[1].strip()
    entry = captured.out  # stdout is the TOML entry and nothing else
    assert len(key) >= 43 and key not in entry
    assert tomllib.loads(entry)["keys"][0] == {
        "name": "ingest-bot",
        "sha256": key_digest(key).hex(),
        "role": "write",
        "namespaces": [TEAM_A],
    }
    (tmp_path / "keys.toml").write_text(entry)
    access = AccessControl(tmp_path / "keys.toml")
    principal = access.check(key, Action.ADD, TEAM_A)
    assert principal.name == "ingest-bot"


def test_keygen_appended_with_a_shell_redirect_gives_a_valid_file_for_any_unicode(tmp_path: Path) -> None:
    """``fewshot keygen ... >> keys.toml``, twice, with names JSON would escape as surrogate
    pairs (non-BMP), quotes, backslashes and control characters: the server's loader accepts the
    file and each key opens its own namespace."""
    fewshot = Path(sys.executable).with_name("fewshot")
    keys_file = tmp_path / "keys.toml"
    old_entry = f'[[keys]]\nname = "old"\nsha256 = "{"0" * 64}"\nrole = "read"\nnamespaces = ["x"]'
    keys_file.write_text("# keys\n" + old_entry)  # no final newline
    odd_names = {"emoji-bot 😀": "ns😀", 'q"uote\\bs': "tab\there\u007f", "\u0001ctl": "日本"}
    keys: dict[str, str] = {}
    for name, namespace in odd_names.items():
        done = subprocess.run(
            f"{fewshot} keygen --name {shlex.quote(name)} --role read "
            f"--namespace {shlex.quote(namespace)} >> {keys_file}",
            shell=True,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        keys[name] = done.stderr.split("\n")[1].strip()
        assert keys[name] not in keys_file.read_text(encoding="utf-8")
    access = AccessControl(keys_file)
    for name, namespace in odd_names.items():
        principal = access.check(keys[name], Action.LIST, namespace)
        assert principal.name == name and principal.namespaces == frozenset({namespace})
    assert "\\ud83d" not in keys_file.read_text(encoding="utf-8")


def test_protected_mode_defaults_to_loopback_and_refuses_open_networks(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.toml"
    write_key_file(keys, {"k": ("key-1", "read", ["*"])})
    assert Settings().host == "127.0.0.1"
    assert Settings(api_keys=keys).host == "0.0.0.0"
    assert Settings(host="0.0.0.0", allow_unauthenticated=True).host == "0.0.0.0"
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert Settings(host=loopback).host == loopback

    # fewshot serve refuses before starting anything, and says how to proceed.
    assert cli.main(["serve", "--model", str(tiny_model_path), "--host", "0.0.0.0"]) == 2
    message = capsys.readouterr().err
    assert "--allow-unauthenticated" in message and "--api-keys" in message


def test_a_non_loopback_bind_without_tls_warns_at_start(
    tiny_model_path: Path, redis_url: str, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys make 0.0.0.0 the default bind: over plain HTTP those keys cross the network in clear,
    so the start says so (a warning, not a refusal: a TLS-terminating proxy may guard it)."""
    keys = tmp_path / "keys.toml"
    write_key_file(keys, {"k": ("key-1", "read", ["*"])})
    assert Settings(host="127.0.0.1", api_keys=keys).plain_http_warning() is None
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    assert Settings(api_keys=keys, **tls).plain_http_warning() is None
    open_bind = Settings(host="0.0.0.0", allow_unauthenticated=True).plain_http_warning()
    assert open_bind is not None and "API keys" not in open_bind

    settings = stack_settings(tiny_model_path, redis_url, api_keys=keys).model_copy(
        update={"host": "0.0.0.0"}
    )
    with caplog.at_level("WARNING", logger="fewshot_service.app"), ServerStack(settings):
        pass
    [warning] = [r.getMessage() for r in caplog.records if "plain HTTP" in r.getMessage()]
    assert "0.0.0.0" in warning and "API keys" in warning and "--tls-cert" in warning
    caplog.clear()
    with (
        caplog.at_level("WARNING", logger="fewshot_service.app"),
        ServerStack(stack_settings(tiny_model_path, redis_url, api_keys=keys)),
    ):
        pass
    assert not [r for r in caplog.records if "plain HTTP" in r.getMessage()]


def test_tls_files_go_together(pki: Pki) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_cert=pki.server_cert)
    with pytest.raises(ValidationError, match="mTLS"):
        Settings(tls_client_ca=pki.ca)


def test_bad_bytes_and_bad_utf8_are_judged_after_the_key(secure_server: SecureServer) -> None:
    credentials = grpc.ssl_channel_credentials(secure_server.pki.ca.read_bytes())
    with grpc.secure_channel(secure_server.grpc_target, credentials) as channel:
        classify = channel.unary_unary(
            "/fewshot.v1.FewShot/Classify", request_serializer=bytes, response_deserializer=bytes
        )
        junk = b"\xff\xff\xff\xff"
        for key, expected in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (secure_server.keys["read-a"], grpc.StatusCode.INVALID_ARGUMENT),
        ):
            metadata = (("authorization", f"Bearer {key}"),) if key else None
            with pytest.raises(grpc.RpcError) as refused:
                classify(junk, metadata=metadata, timeout=10)
            assert refused.value.code() == expected
    with secure_server.http(secure_server.keys["read-all"]) as http:
        bad = http.get("/v1/classes?namespace=bad%FF")
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_input"


# --- namespaces ---------------------------------------------------------------------------------


@pytest.fixture
def seeded(secure_server: SecureServer) -> SecureServer:
    """Exactly one "seed" example in each team namespace (tests that use redis_url flush Redis)."""
    core = secure_server.stack.core
    for namespace in (TEAM_A, TEAM_B):
        try:
            core.delete_namespace(namespace)
        except NotFound:
            pass
        core.add_examples(namespace, "seed", [SEED_IMAGE])
    return secure_server


def _listed(server: SecureServer, key: str) -> dict[str, int]:
    with server.http(key) as http:
        response = http.get("/v1/namespaces")
    assert response.status_code == 200, response.text
    return {n["namespace"]: n["class_count"] for n in response.json()["namespaces"]}


def test_namespaces_list_only_what_the_key_may_use(seeded: SecureServer) -> None:
    secure_server = seeded
    assert _listed(secure_server, secure_server.keys["read-a"]) == {TEAM_A: 1}
    assert _listed(secure_server, secure_server.keys["write-all"]) == {TEAM_A: 1, TEAM_B: 1}
    with secure_server.http() as http:
        assert http.get("/v1/namespaces").status_code == 401


def test_deleting_a_namespace_needs_role_write_on_it(seeded: SecureServer) -> None:
    secure_server = seeded
    keys = secure_server.keys
    for key, namespace in [("read-all", TEAM_A), ("read-a", TEAM_A), ("write-a", TEAM_B)]:
        with secure_server.http(keys[key]) as http:
            refused = http.delete(f"/v1/namespaces/{namespace}")
        assert refused.status_code == 403, (key, namespace, refused.text)
        assert refused.json()["error"] == "permission_denied"
    assert _listed(secure_server, keys["read-all"]) == {TEAM_A: 1, TEAM_B: 1}  # nothing deleted

    try:
        with secure_server.http(keys["write-a"]) as http:
            deleted = http.delete(f"/v1/namespaces/{TEAM_A}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"namespace": TEAM_A, "deleted_classes": 1, "deleted_examples": 1}
        assert _listed(secure_server, keys["read-all"]) == {TEAM_B: 1}
    finally:  # the other tests of this module use the seed class
        secure_server.stack.core.add_examples(TEAM_A, "seed", [SEED_IMAGE])


def test_the_client_over_tls_with_a_key_and_typed_errors(seeded: SecureServer) -> None:
    from fewshot_client import errors

    server = seeded
    with FewShotClient(
        server.grpc_target,
        http_url=server.https_url,
        api_key=server.keys["read-a"],
        root_certificates=server.pki.ca,
    ) as client:
        assert [n.namespace for n in client.list_namespaces()] == [TEAM_A]
        assert [c.label for c in client.list_classes(namespace=TEAM_A)] == ["seed"]
        assert client.classify(SEED_IMAGE, namespace=TEAM_A)[0].predictions[0].label == "seed"
        with pytest.raises(errors.PermissionDenied) as refused:
            client.add_examples("x", SEED_IMAGE, namespace=TEAM_A)
        assert refused.value.status == 403
        with pytest.raises(errors.PermissionDenied):
            client.classify(SEED_IMAGE, namespace=TEAM_B)
    with FewShotClient(
        server.grpc_target, http_url=server.https_url, api_key="", root_certificates=server.pki.ca
    ) as anonymous:
        with pytest.raises(errors.Unauthenticated) as rest_refused:
            anonymous.list_namespaces()
        assert rest_refused.value.status == 401
        with pytest.raises(errors.Unauthenticated) as grpc_refused:
            anonymous.embed(SEED_IMAGE)
        assert grpc_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- models (a finished model roll) ---------------------------------------------------------------


def test_models_are_listed_per_key_and_dropping_one_needs_write_and_stays_in_its_namespaces(
    seeded: SecureServer,
) -> None:
    server, keys = seeded, seeded.keys
    registry = server.stack.core.registry
    old = "retired-model-000000000001"
    for namespace in (TEAM_A, TEAM_B):  # what a retired model's replicas left behind
        registry.add_examples(namespace, "retired", np.ones((1, 4), np.float32), old)
    try:
        with server.http() as http:
            assert http.get("/v1/models").status_code == 401
            assert http.delete(f"/v1/models/{old}").status_code == 401
        with server.http(keys["read-a"]) as http:
            listed = {m["model_id"]: m["namespaces"] for m in http.get("/v1/models").json()["models"]}
            assert listed == {server.stack.core.model_id: 1, old: 1}  # TEAM_A's only
        for key in ("read-all", "read-a"):
            with server.http(keys[key]) as http:
                refused = http.delete(f"/v1/models/{old}")
            assert refused.status_code == 403 and refused.json()["error"] == "permission_denied"
        with server.http(keys["write-a"]) as http:
            dropped = http.delete(f"/v1/models/{old}")
            assert dropped.status_code == 200, dropped.text
            assert dropped.json() == {"model_id": old, "dropped_embeddings": 1, "namespaces": [TEAM_A]}
            refused = http.delete(f"/v1/models/{server.stack.core.model_id}")
            assert refused.status_code == 409 and "the model this server runs" in refused.json()["message"]
        held = {n.name: [m.model_id for m in n.models] for n in registry.list_namespaces()}
        assert old not in held[TEAM_A] and old in held[TEAM_B]  # write-a may not touch TEAM_B
    finally:
        for namespace in (TEAM_A, TEAM_B):
            registry.delete_class(namespace, "retired")


def test_a_key_file_caught_empty_mid_rewrite_keeps_the_keys(tmp_path: Path) -> None:
    """Rewritten in place (truncated, then written), the file is empty for a moment: a poll that
    reads it then must not revoke every key; the finished file is applied on the next."""
    key_file = tmp_path / "keys.toml"
    write_key_file(key_file, {"old": ("old-key-123", "read", ["*"])})
    access = AccessControl(key_file)
    key_file.write_text("")
    assert access.reload() is False
    assert access.check("old-key-123", Action.LIST).name == "old"
    write_key_file(key_file, {"new": ("new-key-456", "read", ["*"])})
    assert access.reload() is True
    assert access.check("new-key-456", Action.LIST).name == "new"
    with pytest.raises(Unauthenticated, match="unknown API key"):
        access.check("old-key-123", Action.LIST)
