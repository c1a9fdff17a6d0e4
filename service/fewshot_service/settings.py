"""Every server setting in one typed object, read from the environment and ``fewshot serve`` flags.

Flags win over environment variables, which win over the defaults below. Environment names are
``FEWSHOT_<FIELD>`` (e.g. ``FEWSHOT_HTTP_PORT``), except the conventional ``REDIS_URL``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fewshot_common.image_formats import normalise_formats
from fewshot_common.images import ImageLimits

from .core.batcher import CPU_MAX_BATCH_SIZE, BatchConfig
from .tls import TlsFiles

MiB = 1024 * 1024
DEFAULT_MODEL = Path("models") / "default.onnx"
# Like Triton's HTTP default; enough for 64 phone photos. Both transports refuse larger requests.
DEFAULT_MAX_REQUEST_BYTES = 64 * MiB
# The checkout this package lives in (an editable install): the second place to look for the model.
_REPO_ROOT = Path(__file__).resolve().parents[2]
# Where the defaults of the image limits and the batcher are defined (one place each).
_IMAGE_LIMITS = ImageLimits()
_BATCHING = BatchConfig()

LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseSettings):
    """Each field is one setting: its type, default and description here are the only ones; the
    environment variable and the ``fewshot serve`` flag are derived from it (see cli/serve.py)."""

    model_config = SettingsConfigDict(env_prefix="FEWSHOT_", extra="forbid")

    model: Path | None = Field(
        default=None,
        description=f"ONNX model to serve (none: {DEFAULT_MODEL} in the working directory or the checkout)",
    )
    precision: Literal["auto", "fp32", "int8", "fp16", "bf16"] = Field(
        default="auto",
        description="which checked variant of the model to serve (NAME.int8.onnx next to it); "
        "auto: the fastest for the host (bf16 through OpenVINO on a CPU with AMX-BF16, else int8 "
        "on CPU; fp16 on GPU; else the file itself)",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("redis_url", "REDIS_URL", "FEWSHOT_REDIS_URL"),
        description="Redis to keep classes in; none starts a private server in data_dir",
    )
    redis_cluster: bool = Field(
        default=False,
        description="the Redis URL names one node of a Redis Cluster: use the cluster client",
    )
    durability: Literal["everysec", "always"] = Field(
        default="everysec",
        description="when an add is acknowledged: everysec (Redis fsyncs once a second; a power loss "
        "can lose about the last second of adds) or always (after Redis fsynced it; the embedded "
        "server runs appendfsync always, an external one must, else the server refuses to start)",
    )
    redis_key_prefix: str = Field(
        default="fewshot", pattern=r"^[^{}]+$", description="prefix of every Redis key (no braces)"
    )
    data_dir: Path = Field(
        default=Path(".fewshot"), description="where the private Redis keeps its append-only file"
    )
    host: str | None = Field(
        default=None,
        description="address to listen on (none: 0.0.0.0 with --api-keys, else 127.0.0.1)",
    )
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0: any free)")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP port (0: any free)")

    # Security (docs/security.md): keys, TLS, protected mode, browser origins.
    api_keys: Path | None = Field(
        default=None, description="TOML file of API keys (fewshot keygen); none: no keys, loopback only"
    )
    api_keys_poll_s: float = Field(
        default=2.0, ge=0, description="seconds between checks of the key file for changes (0: SIGHUP only)"
    )
    allow_unauthenticated: bool = Field(
        default=False, description="allow listening on a non-loopback address without --api-keys"
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate chain: serve HTTPS and gRPC over TLS"
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA: require client certificates signed by it (mTLS) on both ports"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated origins (https://app.example) whose pages may call this server",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated host names HTTP requests may name in Host (none: any with "
        "--api-keys, else localhost, 127.0.0.1 and ::1 only: a DNS-rebinding defence)",
    )

    # Request limits (refused with 413 / RESOURCE_EXHAUSTED).
    max_image_bytes: int = Field(
        default=_IMAGE_LIMITS.max_image_bytes, gt=0, description="bytes per image file"
    )
    max_pixels: int = Field(default=_IMAGE_LIMITS.max_pixels, gt=0, description="pixels per decoded image")
    max_images: int = Field(default=_IMAGE_LIMITS.max_images, gt=0, description="images per request")
    max_bulk_images: int = Field(
        default=1024,
        gt=0,
        le=65536,
        description="images per bulk add (POST /v1/examples:bulk); each batch of them within the "
        "per-request limits",
    )
    max_request_bytes: int = Field(
        default=DEFAULT_MAX_REQUEST_BYTES, gt=0, description="bytes per HTTP body or gRPC message"
    )
    # Decode budget (refused with 413 / RESOURCE_EXHAUSTED before any pixel is decoded).
    max_jpeg_scans: int = Field(
        default=_IMAGE_LIMITS.max_jpeg_scans,
        gt=0,
        description="scans a progressive JPEG may have (encoders write ~10)",
    )
    max_decoded_bytes: int = Field(
        default=_IMAGE_LIMITS.max_decoded_bytes,
        gt=0,
        description="decoded memory one image may need (w x h x bytes/pixel)",
    )
    max_request_pixels: int = Field(
        default=_IMAGE_LIMITS.max_request_pixels,
        gt=0,
        description="decoded pixels of one request, summed over its images",
    )
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(_IMAGE_LIMITS.formats),
        description="comma-separated image formats accepted, told from their first bytes (others: "
        "415); of JPEG, PNG, WEBP, GIF, BMP, TIFF",
    )
    # Each decode runs in a worker process under hard limits (413 beyond; decode_worker.py).
    decode_cpu_s: int = Field(
        default=_IMAGE_LIMITS.max_decode_cpu_s,
        gt=0,
        description="CPU seconds one image's decode may take in its worker (RLIMIT_CPU)",
    )
    decode_memory: int = Field(
        default=_IMAGE_LIMITS.max_decode_memory,
        gt=0,
        description="bytes of memory a decode worker may take for an image beyond its own (RLIMIT_AS)",
    )
    # Decode pool: a full queue answers 429 / RESOURCE_EXHAUSTED at once.
    decode_workers: int | None = Field(
        default=None, gt=0, description="requests decoding at once (default: one per CPU core)"
    )
    decode_queue: int = Field(
        default=16, ge=0, description="requests that may wait for a decode worker before 429"
    )
    # Slow or stuck clients (the connection is closed; see http_timeouts.py).
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="seconds an HTTP client may take to send a request line and headers",
    )
    http_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds an HTTP request body may go without a byte arriving",
    )
    # gRPC: calls beyond this are refused at once; health checks keep threads of their own.
    grpc_workers: int = Field(
        default=16,
        gt=0,
        description="FewShot gRPC calls that may run at once (more: RESOURCE_EXHAUSTED)",
    )
    # Registry.
    max_examples_per_class: int = Field(
        default=1000, gt=0, description="examples a class may hold; an add beyond is refused (409)"
    )
    # Model rolls (backfill.py): a stored image per example lets a new model embed it later.
    store_images: bool = Field(
        default=True,
        description="keep a bounded copy of each added example's image (shorter side <= 384 px, no "
        "metadata), so a server of another model can embed it without a re-upload; any key that may "
        "read the namespace can read it (GET .../examples/{id}/image, the playground's gallery)",
    )
    backfill_on_demand: int = Field(
        default=32,
        ge=0,
        description="missing embeddings of this model a Classify computes itself from stored images "
        "before answering; more start a background backfill and a 409 with the progress",
    )
    backfill_on_start: bool = Field(
        default=True,
        description="at start, embed in the background the examples of every namespace this "
        "model has not embedded yet (else only when a Classify asks)",
    )
    backfill_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds a backfill lease lasts unless renewed (after each batch): how long "
        "a namespace waits for a replica to take over the backfill of one that died",
    )
    backfill_sweep_s: float = Field(
        default=10.0,
        ge=0,
        description="with backfill_on_start, seconds between looks for namespaces this model has "
        "yet to embed, so a backfill whose server died resumes once its lease expires, without "
        "traffic (0: only at start)",
    )
    heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        description="seconds between announcements of the model this server runs (lapsing after "
        "three): dropping a model a live server announces is refused unless forced",
    )
    # Open set and shot quality (open_set.py, shot_quality.py).
    unknown_rate: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="share of images of registered classes flagged unknown when a request sets none",
    )
    duplicate_similarity: float = Field(
        default=0.98,
        gt=0,
        le=1,
        description="cosine at which a new example is reported as a near-duplicate of its class's",
    )

    # Inference.
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers, comma-separated: auto (the default: "
        "TensorRT or CUDA where onnxruntime-gpu has them and a GPU starts, else CPU), cpu, cuda, "
        "tensorrt or ONNX Runtime's names. Named, the first must start or the server refuses to",
    )
    intra_op_threads: int | None = Field(
        default=None,
        gt=0,
        description="ONNX Runtime threads per model run (none: on a CPU, the cores shared equally "
        "among batch_workers; on a GPU, ONNX Runtime's choice)",
    )
    # Spinning threads take the cores that decoding and gRPC need between runs
    # (docs/benchmarks/code-notes.md).
    intra_op_spinning: bool = Field(
        default=False,
        description="let idle ONNX Runtime threads busy-wait for the next parallel section "
        "(faster for one process doing only inference; slower beside decoding)",
    )
    max_batch_size: int | None = Field(
        default=None,
        gt=0,
        description="largest inference batch, merged or of one request (none: on a CPU, "
        f"{CPU_MAX_BATCH_SIZE}, what one ONNX Runtime thread runs fastest; on a GPU, "
        f"{_BATCHING.max_batch_size})",
    )
    max_queue_delay_ms: float = Field(
        default=_BATCHING.max_queue_delay_ms,
        ge=0,
        description="how long a request may wait for others to share its model run",
    )
    # Dynamic batching merges concurrent requests into one model run. On a small shared CPU,
    # independent runs have measured faster (docs/benchmarks/code-notes.md), so it can be switched off.
    batching: bool = Field(
        default=_BATCHING.enabled, description="merge concurrent requests into one model run"
    )
    batch_workers: int = Field(
        default=_BATCHING.workers, gt=0, description="merged batches that may run at once"
    )

    # Graceful shutdown (SIGTERM): readiness goes false, then in-flight calls get this long.
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="seconds to keep serving with readiness false before refusing new "
        "connections (time for a load balancer to notice; e.g. 5 behind Kubernetes)",
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="seconds in-flight calls may take to finish on shutdown; then they are cut",
    )

    # Redis client: short timeouts so a lost Redis answers 503 quickly instead of hanging.
    redis_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="Redis connect/read timeout, seconds; the server also bounds each registry "
        "operation's whole time in Redis by it",
    )
    log_level: LogLevel = Field(default="info", description="log level")
    # Tracing (docs/observability.md): off unless an endpoint is set here or in the environment.
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC collector (http://collector:4317): export OpenTelemetry traces "
        "(none: OTEL_EXPORTER_OTLP_ENDPOINT if set, else tracing off); needs the otel extra",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("providers", "cors_origins", "allowed_hosts", "image_formats", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        return list(normalise_formats(value))  # ValueError names the known formats

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, value: list[str]) -> list[str]:
        from fewshot_common.providers import provider_names  # imports onnxruntime: not for --help

        return provider_names(value)

    @model_validator(mode="after")
    def _cluster_needs_a_url(self) -> Settings:
        # The private server that starts without a URL is a single node, never a cluster.
        if self.redis_cluster and not self.redis_url:
            raise ValueError("redis_cluster needs a Redis URL naming a node of the cluster")
        return self

    @model_validator(mode="after")
    def _protected_mode(self) -> Settings:
        # Like Redis' protected mode: without keys, only this machine may reach the server.
        if self.host is None:
            self.host = "0.0.0.0" if self.api_keys else "127.0.0.1"
        elif not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: anyone who can reach it could "
                "read, add and delete every class. Pass --api-keys FILE (see `fewshot keygen`), or "
                "--allow-unauthenticated if something else guards the network (e.g. a container "
                "whose ports are published on the host's loopback only)"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        return self

    @property
    def tls(self) -> TlsFiles | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_client_ca)

    def plain_http_warning(self) -> str | None:
        """Why this bind is readable by others on the network, or None: a non-loopback address
        without TLS sends API keys (and every image) in clear text. Said at start, not refused: a
        TLS-terminating proxy or a private network may guard it."""
        if self.tls is not None or self.host is None or is_loopback(self.host):
            return None
        keys = "API keys, images and answers" if self.api_keys else "images and answers"
        return (
            f"listening on {self.host} over plain HTTP and gRPC: {keys} cross the network in clear "
            "text. Pass --tls-cert and --tls-key (docs/security.md), or put a TLS-terminating proxy "
            "in front and bind 127.0.0.1"
        )

    @property
    def redis_data_dir(self) -> Path:
        return self.data_dir / "redis"

    def model_path(self) -> Path:
        """The model file to serve; a clear FileNotFoundError when there is none."""
        if self.model is not None:
            if not self.model.is_file():
                raise FileNotFoundError(f"model file not found: {self.model}")
            return self.model
        candidates = [Path.cwd() / DEFAULT_MODEL, _REPO_ROOT / DEFAULT_MODEL]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise FileNotFoundError(
            f"no model given and no default model found (tried {tried}); pass --model PATH, set "
            "FEWSHOT_MODEL, or create one with `fewshot export --output models/default.onnx`"
        )


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
