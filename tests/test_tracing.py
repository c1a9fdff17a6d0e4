"""OpenTelemetry traces (issue 32) on a real ServerStack over both transports, collected by the
SDK's InMemorySpanExporter: span names, parent/child links, attributes, W3C traceparent honoured,
the trace id in the access log, and nothing at all while tracing is off."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_service import tracing
from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import stack_settings

NAMESPACE = "traced"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
IMAGES = [samples.solid_png((200, 40, 40)), samples.solid_png((40, 200, 40))]
CHILDREN = {"decode", "queue_wait", "inference", "registry"}


@pytest.fixture(scope="module")
def provider() -> Iterator[TracerProvider]:
    """Spans kept in memory (``provider.memory``), through this module's tracer only."""
    sdk = TracerProvider()
    sdk.memory = InMemorySpanExporter()  # type: ignore[attr-defined]
    sdk.add_span_processor(SimpleSpanProcessor(sdk.memory))  # type: ignore[attr-defined]
    tracing.use_provider(sdk)
    try:
        yield sdk
    finally:
        tracing.use_provider(None)
        sdk.shutdown()


@pytest.fixture(scope="module")
def exporter(provider: TracerProvider) -> InMemorySpanExporter:
    return provider.memory  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stack(exporter: InMemorySpanExporter, tiny_model_path: Path, private_redis) -> Iterator[ServerStack]:
    settings = stack_settings(tiny_model_path, private_redis.url, redis_key_prefix="tracing")
    with ServerStack(settings) as running:
        running.core.add_examples(NAMESPACE, "red", [IMAGES[0]])
        running.core.add_examples(NAMESPACE, "green", [IMAGES[1]])
        yield running


@pytest.fixture
def spans(exporter: InMemorySpanExporter, stack: ServerStack) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def rest_classify(stack: ServerStack, headers: dict[str, str] | None = None) -> httpx.Response:
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(IMAGES)]
    return httpx.post(
        f"http://127.0.0.1:{stack.http_port}/v1/classify",
        params={"namespace": NAMESPACE},
        files=files,
        headers=headers or {},
        timeout=30,
    )


def grpc_classify(stack: ServerStack, metadata: list[tuple[str, str]] | None = None) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        fewshot_pb2_grpc.FewShotStub(channel).Classify(
            fewshot_pb2.ClassifyRequest(images=IMAGES, namespace=NAMESPACE), metadata=metadata, timeout=30
        )


def roots(finished: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in finished if s.name == tracing.REQUEST_SPAN]


def children_of(root: ReadableSpan, finished: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in finished if s.parent is not None and s.parent.span_id == root.context.span_id]


def finished_trace(exporter: InMemorySpanExporter, trace_id: str = TRACE_ID) -> tuple[ReadableSpan, ...]:
    """The spans of ``trace_id`` once its request span has ended: over HTTP that is just after
    the answer went out, so the client may see the answer first."""
    deadline = time.monotonic() + 10
    while True:
        finished = tuple(
            s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id
        )
        if roots(finished) or time.monotonic() > deadline:
            return finished
        time.sleep(0.01)


def wait_for(condition: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def access_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    deadline = time.monotonic() + 10  # the HTTP line, too, is written once the answer is out
    while not (lines := [r.getMessage() for r in caplog.records if text in r.getMessage()]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return lines


def check_request_trace(finished: tuple[ReadableSpan, ...]) -> ReadableSpan:
    """One request span, child of the caller's traceparent, with every child kind under it."""
    (root,) = roots(finished)
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == PARENT_SPAN_ID
    assert root.parent.is_remote
    children = children_of(root, finished)
    assert {s.name for s in children} == CHILDREN
    assert all(s.context.trace_id == root.context.trace_id for s in finished)
    for child in children:  # each inside its parent's time
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    decode = next(s for s in children if s.name == "decode")
    assert decode.attributes["fewshot.images"] == len(IMAGES)
    registry = [s.attributes["fewshot.registry_op"] for s in children if s.name == "registry"]
    assert registry == ["prototypes"]
    return root


def test_rest_request_span_has_its_children_and_honours_traceparent(
    stack: ServerStack, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    rest_classify(stack)  # the namespace is cached after one answer: later ones queue for a batch
    spans.clear()
    caplog.set_level(logging.INFO, logger="fewshot.access")
    answer = rest_classify(stack, {"traceparent": TRACEPARENT})
    assert answer.status_code == 200
    root = check_request_trace(finished_trace(spans))
    attributes = dict(root.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == attributes["fewshot.route"] == "/v1/classify"
    assert attributes["fewshot.namespace"] == NAMESPACE
    assert attributes["fewshot.images"] == len(IMAGES)
    assert attributes["fewshot.status"] == 200
    (line,) = access_lines(caplog, TRACE_ID)
    assert line.startswith("http method=POST route=/v1/classify status=200 ")
    assert line.endswith(f" trace_id={TRACE_ID}")


def test_grpc_call_span_has_its_children_and_honours_traceparent(
    stack: ServerStack, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    grpc_classify(stack)
    spans.clear()
    caplog.set_level(logging.INFO, logger="fewshot.access")
    grpc_classify(stack, [("traceparent", TRACEPARENT)])
    root = check_request_trace(finished_trace(spans))
    attributes = dict(root.attributes or {})
    assert attributes["rpc.method"] == attributes["fewshot.route"] == "/fewshot.v1.FewShot/Classify"
    assert attributes["fewshot.namespace"] == NAMESPACE
    assert attributes["fewshot.images"] == len(IMAGES)
    assert attributes["fewshot.status"] == "OK"
    (line,) = access_lines(caplog, TRACE_ID)
    assert line.startswith("grpc method=/fewshot.v1.FewShot/Classify code=OK ")
    assert line.endswith(f" trace_id={TRACE_ID}")


def test_without_traceparent_a_new_trace_starts_and_errors_are_recorded(
    stack: ServerStack, spans: InMemorySpanExporter
) -> None:
    bad = httpx.post(
        f"http://127.0.0.1:{stack.http_port}/v1/classify",
        params={"namespace": NAMESPACE, "top_k": -1},
        files=[("files", ("x.png", IMAGES[0], "image/png"))],
        timeout=30,
    )
    assert bad.status_code == 422
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            fewshot_pb2_grpc.FewShotStub(channel).Classify(
                fewshot_pb2.ClassifyRequest(images=[], namespace=NAMESPACE), timeout=30
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def failed_roots() -> list[ReadableSpan]:
        return [
            s
            for s in roots(spans.get_finished_spans())
            if s.attributes["fewshot.status"] in (422, "INVALID_ARGUMENT")
        ]

    assert wait_for(lambda: len(failed_roots()) == 2)
    http_root, grpc_root = sorted(failed_roots(), key=lambda s: s.start_time)
    assert http_root.parent is None and grpc_root.parent is None
    assert format(http_root.context.trace_id, "032x") != TRACE_ID
    assert http_root.context.trace_id != grpc_root.context.trace_id
    assert http_root.attributes["fewshot.status"] == 422
    assert grpc_root.attributes["fewshot.status"] == "INVALID_ARGUMENT"
    # A client's mistake is not a server error.
    assert http_root.status.status_code is StatusCode.UNSET
    assert grpc_root.status.status_code is StatusCode.UNSET


def test_a_malformed_traceparent_is_ignored(stack: ServerStack, spans: InMemorySpanExporter) -> None:
    answer = rest_classify(stack, {"traceparent": "00-not-a-trace-01"})
    assert answer.status_code == 200
    assert wait_for(
        lambda: any(
            s.attributes["fewshot.route"] == "/v1/classify" for s in roots(spans.get_finished_spans())
        )
    )
    (root,) = [
        s for s in roots(spans.get_finished_spans()) if s.attributes["fewshot.route"] == "/v1/classify"
    ]
    assert root.parent is None


def test_tracing_off_makes_no_spans_and_no_trace_ids(
    stack: ServerStack,
    spans: InMemorySpanExporter,
    provider: TracerProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fewshot.access")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "fewshot.access"]

    tracing.use_provider(None)
    try:
        assert not tracing.enabled()
        headers = {"traceparent": TRACEPARENT, "X-Request-ID": "tracing-off"}
        assert rest_classify(stack, headers).status_code == 200
        grpc_classify(stack, [("traceparent", TRACEPARENT)])
        # Written before tracing comes back on (the HTTP line follows the answer).
        assert wait_for(lambda: any("request_id=tracing-off" in line for line in lines()))
    finally:
        tracing.use_provider(provider)
    mine = [line for line in lines() if "tracing-off" in line or "FewShot/Classify" in line]
    assert len(mine) == 2 and not any("trace_id" in line for line in mine)
    assert not [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID]


def test_the_endpoint_comes_from_the_setting_or_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, provider: TracerProvider
) -> None:
    for variable in tracing.OTLP_ENDPOINT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert tracing.otlp_endpoint(None) is None
    assert tracing.configure(None) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.otlp_endpoint(None) == "http://collector:4317"
    assert tracing.otlp_endpoint("http://other:4317") == "http://other:4317"
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    exporting = tracing.configure("http://127.0.0.1:9")  # nothing is sent before a span ends
    try:
        assert exporting is not None and exporting.resource.attributes["service.name"] == "fewshot"
    finally:
        tracing.use_provider(provider)
        exporting.shutdown()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector on loopback: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802 (the generated name)
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_endpoint_exports_the_spans_to_a_collector(
    tiny_model_path: Path, private_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--otlp-endpoint end to end: the SDK provider the server builds exports by OTLP/gRPC (last in
    this module: the server's stop turns tracing off)."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fewshot-under-test")
    try:
        settings = stack_settings(
            tiny_model_path,
            private_redis.url,
            redis_key_prefix="tracing-otlp",
            otlp_endpoint=f"http://127.0.0.1:{port}",
        )
        with ServerStack(settings) as stack:
            assert tracing.enabled()
            reply = httpx.post(
                f"http://127.0.0.1:{stack.http_port}/v1/embed",
                files=[("files", ("a.png", IMAGES[0], "image/png"))],
                headers={"traceparent": TRACEPARENT},
                timeout=30,
            )
            assert reply.status_code == 200
        assert not tracing.enabled()  # the stop shut the provider down, flushing its batch
    finally:
        server.stop(None)
    exported = [
        (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
        if span.trace_id.hex() == TRACE_ID
    ]
    names = sorted(span.name for _, span in exported)
    assert names == ["decode", "fewshot.request", "inference"]
    resource = exported[0][0]
    service = {a.key: a.value.string_value for a in resource.attributes}
    assert service["service.name"] == "fewshot-under-test"
