"""Prometheus metrics of the inference path, per stage (on the default registry, which the HTTP
app exposes at ``/metrics``). Names follow Prometheus conventions: base units, ``_seconds``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, Info

# Buckets from 0.5 ms to 10 s: a tiny model on a GPU to a large one on a busy CPU.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = _LATENCY_BUCKETS  # shared with the HTTP and gRPC request histograms

PREPROCESS_SECONDS = Histogram(
    "fewshot_preprocess_seconds",
    "Decoding, limit checks and preprocessing of one request's images.",
    buckets=_LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "fewshot_queue_seconds",
    "Time a request waited in the dynamic batcher before its batch started.",
    buckets=_LATENCY_BUCKETS,
)
# What this process serves: one model file, run by one engine (dashboards tell replicas on int8
# from replicas on bf16 by it). Set when the server builds its core.
MODEL_INFO = Info(
    "fewshot_model",
    "The model served: its model id, the variant's precision and the engine that runs it.",
)
INFERENCE_SECONDS = Histogram(
    "fewshot_inference_seconds",
    "One model run (a whole merged batch).",
    buckets=_LATENCY_BUCKETS,
)
BATCH_IMAGES = Histogram(
    "fewshot_batch_images",
    "Images per model run after dynamic batching.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
IMAGES_TOTAL = Counter(
    "fewshot_images_total",
    "Images embedded, by operation (embed, classify, add_examples).",
    ["operation"],
)
CANCELLED_REQUESTS = Counter(
    "fewshot_cancelled_requests_total",
    "Requests whose caller went away (deadline, cancel, disconnect), by the stage they were "
    "stopped at: decode (before or between image decodes) or queue (before their model run).",
    ["stage"],
)
