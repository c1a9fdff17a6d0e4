"""``fewshot keygen``: a new random API key, printed once, and the TOML entry for the key file.

The server keeps only the key's sha256, so the key cannot be shown again: store it now. The TOML
entry is all that goes to stdout (the key and the prose go to stderr), so
``fewshot keygen ... >> keys.toml`` appends a valid entry and never the key itself.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Annotated, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field

from fewshot_common import settings_flags
from fewshot_common.settings_flags import Flag

from ..transport.access import ANY_NAMESPACE, Role, key_digest

KEY_BYTES = 32  # 256 random bits, URL-safe base64 (43 characters)
RoleName = Literal[tuple(r.value for r in Role)]  # type: ignore[valid-type]
# A rate: positive and finite. Left out: unlimited (per replica, docs/security.md).
Rate = Annotated[float | None, Field(gt=0, allow_inf_nan=False)]


class KeygenOptions(BaseModel):
    """Every option of ``fewshot keygen``, declared once: its flags and help derive from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="shows up in logs and metrics (never the key)")
    role: RoleName = Field(description="read: embed, classify, list, get; write: also add and delete")
    namespaces: Annotated[list[str], Flag(name="namespace", repeat=True, metavar="NS")] = Field(
        description=f"a namespace the key may use (repeat for several; '{ANY_NAMESPACE}': all)"
    )
    requests_per_s: Annotated[Rate, Flag(metavar="RATE")] = Field(
        None, description="at most RATE requests per second (default: unlimited)"
    )
    requests_burst: Annotated[Rate, Flag(metavar="N")] = Field(
        None, description="requests that may come at once (default: one second's worth)"
    )
    images_per_s: Annotated[Rate, Flag(metavar="RATE")] = Field(
        None, description="at most RATE images per second (default: unlimited)"
    )
    images_burst: Annotated[Rate, Flag(metavar="N")] = Field(
        None, description="images that may come at once (default: one second's worth)"
    )

    def limits(self) -> dict[str, float]:
        """The limit fields of the entry, only those given (an int when whole: `2`, not `2.0`)."""
        fields = ("requests_per_s", "requests_burst", "images_per_s", "images_burst")
        return {f: int(v) if v.is_integer() else v for f in fields if (v := getattr(self, f)) is not None}


OPTIONS = KeygenOptions


def toml_entry(
    name: str, digest_hex: str, role: str, namespaces: list[str], limits: dict[str, float] | None = None
) -> str:
    """One ``[[keys]]`` table, valid TOML for any Unicode name (a TOML writer, not JSON: JSON
    escapes a non-BMP character as a surrogate pair, which TOML refuses). It starts with a blank
    line, so appending it to a file that lacks a final newline still parses."""
    entry = {"name": name, "sha256": digest_hex, "role": role, "namespaces": namespaces, **(limits or {})}
    return "\n" + tomli_w.dumps({"keys": [entry]})


def run(args: argparse.Namespace) -> int:
    options = settings_flags.options_or_exit(KeygenOptions, args, "fewshot keygen")
    key = secrets.token_urlsafe(KEY_BYTES)
    digest = key_digest(key).hex()
    sys.stderr.write(f"API key (shown once; the server keeps only its hash):\n{key}\n\n")
    sys.stderr.write(
        "Add the entry on stdout to the --api-keys file, e.g. `fewshot keygen ... >> keys.toml` "
        "(the server picks it up within seconds, or on SIGHUP).\n"
    )
    sys.stdout.write(toml_entry(options.name, digest, options.role, options.namespaces, options.limits()))
    return 0
