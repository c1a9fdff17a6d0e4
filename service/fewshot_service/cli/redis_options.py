"""The Redis flags of the commands that talk to Redis directly (``export-namespace``,
``import-namespace``): the server's own settings (settings.py), so each is declared once and
means the same as for ``fewshot serve``; here the URL is required (no embedded server)."""

from __future__ import annotations

import sys

from pydantic import BaseModel, Field, ValidationError

from fewshot_common.settings_flags import model_from_args

from ..registry.redis_client import RedisClient, connect_redis
from ..registry.registry import Registry
from ..settings import Settings

_FIELDS = Settings.model_fields


class RedisOptions(BaseModel):
    redis_url: str = Field(
        description="Redis (or a Cluster node) holding the namespaces, e.g. redis://host:6379/0"
    )
    redis_cluster: bool = _FIELDS["redis_cluster"]
    redis_key_prefix: str = _FIELDS["redis_key_prefix"]
    redis_timeout_s: float = _FIELDS["redis_timeout_s"]


def registry_from_args(args: object, command: str) -> tuple[Registry, RedisClient] | None:
    """The registry the flags name, or None after printing why not (a missing --redis-url)."""
    try:
        options = model_from_args(RedisOptions, args)  # type: ignore[arg-type]
    except ValidationError as exc:
        print(
            f"fewshot {command}: {'; '.join(e['loc'][0] + ': ' + e['msg'] for e in exc.errors())}",
            file=sys.stderr,
        )
        return None
    client = connect_redis(options.redis_url, options.redis_timeout_s, cluster=options.redis_cluster)
    return Registry(client, key_prefix=options.redis_key_prefix), client
