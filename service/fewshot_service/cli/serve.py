"""``fewshot serve``: run the gRPC + REST server until SIGTERM or Ctrl-C.

Every setting of :class:`Settings` is a flag here (``max_batch_size`` -> ``--max-batch-size``,
booleans as ``--batching/--no-batching``) and an environment variable; a flag left out keeps the
environment's value. With no Redis URL a private Valkey/Redis is started in ``--data-dir`` and
stopped on exit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pydantic import ValidationError

from fewshot_common import settings_flags

from ..settings import Settings

OPTIONS = Settings  # one flag per field (fewshot_common.cli, fewshot_common.settings_flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``fewshot serve`` parses, on another parser (tests, embedding)."""
    settings_flags.add_arguments(parser, Settings)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line over the environment over the defaults."""
    return settings_flags.model_from_args(Settings, args)


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
    from fewshot_common.embedder import InvalidModel

    from ..app import ServerStack
    from ..registry.redis_client import redacted_url
    from ..registry.redis_server import RedisBinaryNotFound
    from ..transport.access import KeyFileError

    stack = ServerStack(settings)

    def reload_keys(_signum: int, _frame: object) -> None:
        if stack.access is not None:  # SIGHUP rotates API keys without a restart
            stack.access.reload()

    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload_keys)
    try:
        try:
            stack.start()
        except (
            FileNotFoundError,
            InvalidModel,
            RedisBinaryNotFound,
            KeyFileError,
            OSError,
            RuntimeError,
        ) as exc:
            print(f"fewshot serve: {exc}", file=sys.stderr)
            return 1
        keys = f"from {settings.api_keys}" if settings.api_keys else "none (no authentication)"
        print(
            f"fewshot serve: model {stack.core.model_id if stack.core else '?'} "
            f"(precision {stack.core.embedder.meta.precision if stack.core else '?'}, "
            f"engine {stack.core.embedder.engine if stack.core else '?'}); "
            f"gRPC on {settings.host}:{stack.grpc_port}{' (TLS)' if settings.tls else ''}, "
            f"HTTP on {'https' if settings.tls else 'http'}://{settings.host}:{stack.http_port} "
            f"(docs at /docs); Redis {redacted_url(stack.redis_url or '')}; "
            f"API keys: {keys}",
            flush=True,
        )
        while not stop.wait(0.5):
            if not stack.alive():  # e.g. the embedded Redis could not be restarted
                print(
                    "fewshot serve: liveness failed (see the log), shutting down", file=sys.stderr, flush=True
                )
                return 1  # non-zero: a process supervisor (or make serve's caller) restarts us
        print(f"fewshot serve: {signal.Signals(received[0]).name}, shutting down", flush=True)
        return 0
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
