"""Every server setting in one typed object, read from the environment and ``fewshot serve`` flags.

Flags win over environment variables, which win over the defaults below. Environment names are
``FEWSHOT_<FIELD>`` (e.g. ``FEWSHOT_HTTP_PORT``), except the conventional ``REDIS_URL``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
DEFAULT_MODEL = Path("models") / "default.onnx"
# The checkout this package lives in (an editable install): the second place to look for the model.
_REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEWSHOT_", extra="forbid")

    model: Path | None = Field(
        default=None, description=f"ONNX model to serve (default: {DEFAULT_MODEL})"
    )
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        default="auto",
        description="which checked variant of the model to serve (NAME.int8.onnx next to it); "
        "auto: the fastest for the host (int8 on CPU, fp16 on GPU, else the file itself)",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("redis_url", "REDIS_URL", "FEWSHOT_REDIS_URL"),
        description="Redis to keep classes in; none starts a private server in data_dir",
    )
    redis_key_prefix: str = Field(default="fewshot", pattern=r"^[^{}]+$")
    data_dir: Path = Field(default=Path(".fewshot"), description="the private Redis keeps its AOF here")
    host: str = "0.0.0.0"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_port: int = Field(default=8000, ge=0, le=65535)

    # Request limits (refused with 413 / RESOURCE_EXHAUSTED).
    max_image_bytes: int = Field(default=20 * MiB, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0)
    max_images: int = Field(default=64, gt=0)
    max_request_bytes: int = Field(default=64 * MiB, gt=0)

    # Inference.
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers, comma-separated (default: CUDA if present, else CPU)",
    )
    intra_op_threads: int | None = Field(default=None, gt=0)
    max_batch_size: int = Field(default=32, gt=0)
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    # Dynamic batching merges concurrent requests into one model run. On a small shared CPU,
    # independent runs measured ~18% faster (bench/bench_serving.py), so it can be switched off.
    batching: bool = True
    batch_workers: int = Field(default=2, gt=0, description="merged batches that may run at once")

    # Redis client: short timeouts so a lost Redis answers 503 quickly instead of hanging.
    redis_timeout_s: float = Field(default=2.0, gt=0)
    log_level: str = "info"

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

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
