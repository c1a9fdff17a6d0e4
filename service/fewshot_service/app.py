"""The composition root: one :class:`Settings` in, a running gRPC + REST server stack out.

Builds the Redis client (or a private :class:`ManagedRedis`), the :class:`Registry`, the
:class:`Embedder` and one :class:`FewShotCore`, and hands that same core to both transports, so a
class added over REST is the class that gRPC classifies. ``fewshot serve`` and the tests use it
alike; stopping it stops everything it started, in reverse order.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import ExitStack
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import uvicorn

from fewshot_common.cores import intra_op_threads_per_batch, usable_cores
from fewshot_common.embedder import Embedder
from fewshot_common.images import ImageLimits
from fewshot_common.providers import choose_providers
from fewshot_common.variants import choose_model_file

from . import __version__, tracing
from .classify.prototypes import limit_blas_threads
from .core.batcher import CPU_MAX_BATCH_SIZE, BatchConfig
from .core.core import FewShotCore
from .core.decode_pool import DecodePool
from .core.malloc_tuning import reuse_freed_buffers
from .core.metrics import MODEL_INFO
from .registry.durability import appendfsync_for, check_external
from .registry.heartbeats import Heartbeat, new_server_id
from .registry.redis_client import RedisClient, connect_redis, redacted_url
from .registry.redis_health import PROBE_TIMEOUT_SHARE, RedisHealth
from .registry.redis_server import ManagedRedis
from .registry.registry import Registry
from .settings import Settings
from .transport.access import AccessControl
from .transport.grpc.server import create_grpc_server
from .transport.rest import create_app
from .transport.rest.http_timeouts import timed_http_protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

_HTTP_START_TIMEOUT_S = 15.0


def concurrent_model_runs(settings: Settings) -> int:
    """How many model runs the server starts at once: one per batch worker, or with batching off
    two (requests then run side by side on their own threads)."""
    return settings.batch_workers if settings.batching else 2


def default_intra_op_threads(providers: list[str], settings: Settings) -> int | None:
    """On a CPU, each model run that may happen at once gets its share of the cores; on a GPU,
    ONNX Runtime's own choice."""
    if providers[0] != "CPUExecutionProvider":
        return None
    return intra_op_threads_per_batch(usable_cores(), concurrent_model_runs(settings))


def default_max_batch_size(providers: list[str]) -> int:
    """Small runs on a CPU, where they are faster per image; large ones on a GPU."""
    return CPU_MAX_BATCH_SIZE if providers[0] == "CPUExecutionProvider" else BatchConfig().max_batch_size


def build_core(settings: Settings, client: RedisClient) -> FewShotCore:
    limits = ImageLimits(
        max_image_bytes=settings.max_image_bytes,
        max_pixels=settings.max_pixels,
        max_images=settings.max_images,
        max_jpeg_scans=settings.max_jpeg_scans,
        max_decoded_bytes=settings.max_decoded_bytes,
        max_request_pixels=settings.max_request_pixels,
        formats=tuple(settings.image_formats),
        max_decode_cpu_s=settings.decode_cpu_s,
        max_decode_memory=settings.decode_memory,
    )
    # The providers that start here; --providers cuda without a usable GPU refuses (ProviderUnavailable).
    providers = choose_providers(settings.providers).providers
    served = choose_model_file(settings.model_path(), settings.precision, providers)
    max_batch_size = settings.max_batch_size or default_max_batch_size(providers)
    embedder = Embedder(
        served.path,
        providers=providers,
        limits=limits,
        intra_op_threads=settings.intra_op_threads or default_intra_op_threads(providers, settings),
        spinning=settings.intra_op_spinning,
        max_batch_size=max_batch_size,
        concurrent_runs=concurrent_model_runs(settings),
    )
    MODEL_INFO.info(
        {"model_id": embedder.model_id, "precision": embedder.meta.precision, "engine": embedder.engine}
    )
    registry = Registry(
        client,
        key_prefix=settings.redis_key_prefix,
        max_examples_per_class=settings.max_examples_per_class,
    )
    batching = BatchConfig(
        max_batch_size=max_batch_size,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        enabled=settings.batching,
        workers=settings.batch_workers,
    )
    decode_pool = DecodePool(settings.decode_workers, max_queued=settings.decode_queue)
    return FewShotCore(
        embedder,
        registry,
        batching=batching,
        decode_pool=decode_pool,
        unknown_rate=settings.unknown_rate,
        duplicate_similarity=settings.duplicate_similarity,
        store_images=settings.store_images,
        max_bulk_images=settings.max_bulk_images,
        backfill_options={
            "on_demand_limit": settings.backfill_on_demand,
            "lease_ms": int(settings.backfill_lease_s * 1000),
        },
    )


def _bind(host: str, port: int) -> socket.socket:
    """Bind the HTTP socket ourselves, so port 0 gives a known free port and a clash fails early."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket names TCP (base_events._set_nodelay). Without it, Nagle's algorithm held each kept-alive
    # response's body behind the client's delayed ACK of its headers (docs/benchmarks/code-notes.md).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class ServerStack:
    """Redis (managed or external) + core + gRPC + HTTP. ``start()``, then ``stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.managed_redis: ManagedRedis | None = None
        self.redis_health: RedisHealth | None = None
        self.heartbeat: Heartbeat | None = None
        self.server_id = new_server_id()
        self.redis_url: str | None = None
        self.core: FewShotCore | None = None
        self.access: AccessControl | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._cleanup = ExitStack()

    def start(self) -> ServerStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        settings = self.settings
        model_path = settings.model_path()  # fail on a missing model before starting anything
        provider = tracing.configure(settings.otlp_endpoint, __version__)  # None: tracing stays off
        if provider is not None:
            self._cleanup.callback(_stop_tracing, provider)  # last out: flushes the spans of the drain
        if settings.redis_url:
            self.redis_url = settings.redis_url
        else:
            self.managed_redis = ManagedRedis(
                settings.redis_data_dir, persistent=True, appendfsync=appendfsync_for(settings.durability)
            )
            self.redis_url = self.managed_redis.start()
            self._cleanup.callback(self.managed_redis.stop)
        client = connect_redis(self.redis_url, settings.redis_timeout_s, cluster=settings.redis_cluster)
        self._cleanup.callback(client.close)
        # Readiness and the fail-fast breaker read this probe, not Redis (redis_health.py).
        probe_client = connect_redis(
            self.redis_url, settings.redis_timeout_s * PROBE_TIMEOUT_SHARE, cluster=settings.redis_cluster
        )
        self.redis_health = RedisHealth(client, probe_client, timeout_s=settings.redis_timeout_s).start()
        self._cleanup.callback(self.redis_health.stop)
        if settings.redis_url:  # the embedded server is started as --durability asks
            check_external(client, settings.durability)

        limit_blas_threads()  # top-k beside ONNX Runtime: see classifier.limit_blas_threads
        reuse_freed_buffers()  # pixels and batches: see malloc_tuning
        self.core = build_core(settings.model_copy(update={"model": model_path}), client)
        self._cleanup.callback(self.core.close)
        if self.managed_redis is not None:  # deleted images leave its append-only file soon
            self.core.deletion_listeners.append(self.managed_redis.compact_soon)
            managed = self.managed_redis  # restarted when it dies; liveness fails if it cannot be
            self.core.liveness_checks.append(lambda: not managed.dead)
        # Announced as long as it runs: a drop of its model is refused meanwhile (heartbeats.py).
        self.heartbeat = Heartbeat(
            client,
            settings.redis_key_prefix,
            self.core.model_id,
            self.server_id,
            interval_s=settings.heartbeat_s,
        ).start()
        self._cleanup.callback(self.heartbeat.stop)
        # A bad key file stops the start (KeyFileError); later edits are polled and SIGHUP'd.
        self.access = AccessControl(settings.api_keys, poll_seconds=settings.api_keys_poll_s)
        self.access.watch()
        self._cleanup.callback(self.access.close)
        host = settings.host
        assert host is not None  # Settings fills it in (protected mode)
        if (warning := settings.plain_http_warning()) is not None:
            log.warning(warning)

        self._grpc, self.grpc_port = create_grpc_server(
            self.core,
            host=host,
            port=settings.grpc_port,
            max_message_bytes=settings.max_request_bytes,
            max_workers=settings.grpc_workers,
            access=self.access,
            tls=settings.tls,
        )
        grace = settings.shutdown_grace_s
        self._cleanup.callback(lambda: self._grpc.stop(grace).wait(grace + 1.0))  # type: ignore[union-attr]

        sock = _bind(host, settings.http_port)
        self.http_port = int(sock.getsockname()[1])
        app = create_app(
            self.core,
            max_request_bytes=settings.max_request_bytes,
            access=self.access,
            cors_origins=settings.cors_origins,
            allowed_hosts=settings.allowed_hosts,
        )
        tls_options = settings.tls.uvicorn_options() if settings.tls else {}
        config = uvicorn.Config(
            app,
            log_level=settings.log_level,
            access_log=False,
            lifespan="off",
            http=timed_http_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s),
            timeout_graceful_shutdown=max(int(settings.shutdown_grace_s), 1),  # whole seconds
            **tls_options,
        )
        self._http = uvicorn.Server(config)
        # Uvicorn in a thread of ours: signals stay with the main thread (see cli/serve.py).
        self._http_thread = threading.Thread(
            target=self._http.run, kwargs={"sockets": [sock]}, name="fewshot-http", daemon=True
        )
        self._cleanup.callback(sock.close)  # runs after _stop_http (ExitStack unwinds in reverse)
        self._http_thread.start()
        self._cleanup.callback(self._stop_http)
        deadline = time.monotonic() + _HTTP_START_TIMEOUT_S
        while not self._http.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {host}:{self.http_port}")
            time.sleep(0.02)
        if settings.backfill_on_start:
            self.core.backfill_incomplete_namespaces(sweep_every_s=settings.backfill_sweep_s)
        log.info(
            "serving model %s as server %s: gRPC on %s:%d, HTTP on %s:%d, Redis %s",
            self.core.model_id,
            self.server_id,
            host,
            self.grpc_port,
            host,
            self.http_port,
            "managed in " + str(settings.redis_data_dir)
            if self.managed_redis
            else redacted_url(self.redis_url),
        )

    def _stop_http(self) -> None:
        if self._http is not None and self._http_thread is not None:
            self._http.should_exit = True
            self._http_thread.join(timeout=self.settings.shutdown_grace_s + 2.0)

    def alive(self) -> bool:
        """Liveness (see FewShotCore.alive): false once a part failed for good."""
        return self.core is None or self.core.alive()

    def stop(self) -> None:
        """Stop taking requests, finish the ones in flight, then release Redis. Idempotent."""
        self._drain()
        self._cleanup.close()

    def _drain(self) -> None:
        """Graceful shutdown: readiness false first, then both transports refuse new calls and
        finish the ones in flight together, within ``shutdown_grace_s``."""
        if self.core is None or self._grpc is None or self._http is None or self._http.should_exit:
            return  # not fully started (start() failed), or drained already
        settings = self.settings
        self.core.begin_draining()  # /readyz 503, gRPC health NOT_SERVING
        log.info(
            "shutting down: not ready; finishing calls in flight (up to %.1fs)", settings.shutdown_grace_s
        )
        time.sleep(settings.shutdown_delay_s)
        grpc_done = self._grpc.stop(settings.shutdown_grace_s)  # refuses new RPCs at once
        self._stop_http()  # uvicorn closes its socket, then waits for open requests
        grpc_done.wait(settings.shutdown_grace_s + 1.0)

    def __enter__(self) -> ServerStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _stop_tracing(provider: TracerProvider) -> None:
    tracing.use_provider(None)
    provider.shutdown()
