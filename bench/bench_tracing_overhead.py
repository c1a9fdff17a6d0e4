"""What tracing costs per request: the instrumentation calls one REST Classify makes, timed with
tracing off (the default: no SDK provider) and on (the SDK's TracerProvider with a batch processor
to an exporter that drops the spans, so export I/O is not counted).

The calls, in a request's order: the request-span middleware (``request_span`` behind its
``enabled()`` check), ``set_attributes`` for the image count (read_uploads), the ``registry`` span
(prototypes), the ``decode`` span, the batcher's ``recording()`` check and ``record`` of
``queue_wait`` and ``inference``, the ``inference`` span of a run on the caller's thread, and the
access log's ``trace_id()``. An empty loop of the same length is subtracted; times are this
thread's CPU time (the batch processor's export thread is not counted). Prints one JSON line:

    PYTHONPATH=service:service/client python bench/bench_tracing_overhead.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence

from fewshot_service import tracing

HEADERS = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)


def one_request() -> None:
    """The tracing calls of one request, as the server makes them (see the module doc)."""
    if tracing.enabled():
        context = tracing.request_span("unmatched", HEADERS, {"http.request.method": "POST"})
    else:
        context = tracing._NULL
    with context:
        tracing.set_attributes(**{"fewshot.images": 2})
        with tracing.span("registry", **{"fewshot.registry_op": "prototypes"}):
            pass
        with tracing.span("decode", **{"fewshot.images": 2}):
            pass
        if tracing.recording():
            now = time.time_ns()
            tracing.record("queue_wait", now, now, **{"fewshot.images": 2})
            tracing.record("inference", now, now, **{"fewshot.images": 2, "fewshot.parts": 1})
        with tracing.span("inference", **{"fewshot.batch_images": 2}):
            pass
        tracing.trace_id()
        tracing.set_attributes(**{"fewshot.route": "/v1/classify"})
        tracing.end_request(200, failed=False)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def empty() -> None:
    pass


def per_call_ns(function: object, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean nanoseconds per call, in this thread's CPU time (on a
    shared machine wall-clock time also counts other processes' turns on the core)."""
    samples = []
    for _ in range(rounds):
        started = time.thread_time_ns()
        for _ in range(calls):
            function()  # type: ignore[operator]
        samples.append((time.thread_time_ns() - started) / calls)
    return statistics.median(samples)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    baseline = per_call_ns(empty, args.calls, args.rounds)
    tracing.use_provider(None)
    off = per_call_ns(one_request, args.calls, args.rounds) - baseline

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65536))
    tracing.use_provider(provider)
    on = per_call_ns(one_request, max(1, args.calls // 10), args.rounds) - baseline
    tracing.use_provider(None)
    provider.shutdown()
    print(
        json.dumps(
            {
                "cpu": cpu_name(),
                "tracing_off_ns_per_request": round(off, 1),
                "tracing_on_us_per_request": round(on / 1000, 1),
                "spans_per_request_on": 6,  # one more than a real request: an upper bound
                "calls": args.calls,
                "rounds": args.rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
