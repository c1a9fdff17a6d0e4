"""``fewshot serve``: run the gRPC + REST server until SIGTERM or Ctrl-C.

Every flag has an environment twin (see :mod:`settings`); a flag left out keeps the environment's
value. With no Redis URL a private Valkey/Redis is started in ``--data-dir`` and stopped on exit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from .settings import Settings

# Flag -> Settings field. Defaults live in Settings only, so the environment is not overridden.
_FLAGS: dict[str, str] = {
    "--grpc-port": "grpc_port",
    "--http-port": "http_port",
    "--host": "host",
    "--model": "model",
    "--precision": "precision",
    "--redis-url": "redis_url",
    "--data-dir": "data_dir",
    "--providers": "providers",
    "--max-batch-size": "max_batch_size",
    "--max-images": "max_images",
    "--max-image-bytes": "max_image_bytes",
    "--log-level": "log_level",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--grpc-port", type=int, metavar="PORT", help="gRPC port (default 50051; env FEWSHOT_GRPC_PORT)")
    add("--http-port", type=int, metavar="PORT", help="HTTP port (default 8000; env FEWSHOT_HTTP_PORT)")
    add("--host", help="address to listen on (default 0.0.0.0; env FEWSHOT_HOST)")
    add("--model", type=Path, metavar="PATH",
        help="ONNX model (default models/default.onnx; env FEWSHOT_MODEL)")
    add("--precision", choices=("auto", "fp32", "int8", "fp16"),
        help="serve this checked variant of the model (NAME.int8.onnx next to it); default auto: "
        "the fastest for the host (env FEWSHOT_PRECISION)")
    add("--redis-url", metavar="URL",
        help="Redis to keep classes in (env REDIS_URL); none starts a private server in --data-dir")
    add("--data-dir", type=Path, metavar="DIR",
        help="where the private Redis keeps its append-only file (default .fewshot; env FEWSHOT_DATA_DIR)")
    add("--providers", metavar="LIST",
        help="ONNX Runtime providers, comma-separated (default CUDA if present, else CPU)")
    add("--max-batch-size", type=int, metavar="N", help="largest merged inference batch (default 32)")
    add("--max-images", type=int, metavar="N", help="images per request (default 64)")
    add("--max-image-bytes", type=int, metavar="BYTES", help="bytes per image (default 20 MiB)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    # fmt: skip


def settings_from_args(args: argparse.Namespace) -> "Settings":
    """Flags given on the command line over the environment over the defaults."""
    from .settings import Settings

    overrides = {}
    for flag, field in _FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"fewshot serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    # Installed before anything starts, so a signal during start-up still shuts down in order.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    from .app import ServerStack
    from fewshot_common.embedder import InvalidModel
    from .redis_server import RedisBinaryNotFound

    stack = ServerStack(settings)
    try:
        try:
            stack.start()
        except (FileNotFoundError, InvalidModel, RedisBinaryNotFound, OSError, RuntimeError) as exc:
            print(f"fewshot serve: {exc}", file=sys.stderr)
            return 1
        print(
            f"fewshot serve: model {stack.core.model_id if stack.core else '?'} "
            f"({stack.core.embedder.meta.precision if stack.core else '?'}); "
            f"gRPC on {settings.host}:{stack.grpc_port}, HTTP on http://{settings.host}:{stack.http_port} "
            f"(docs at /docs); Redis {stack.redis_url}",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print(f"fewshot serve: {signal.Signals(received[0]).name}, shutting down", flush=True)
        return 0
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
