"""``fewshot keygen``: a new random API key, printed once, and the TOML entry for the key file.

The server keeps only the key's sha256, so the key cannot be shown again: store it now. The TOML
entry is all that goes to stdout (the key and the prose go to stderr), so
``fewshot keygen ... >> keys.toml`` appends a valid entry and never the key itself.
"""

from __future__ import annotations

import argparse
import secrets
import sys

import tomli_w

from ..transport.access import ANY_NAMESPACE, Role, key_digest

KEY_BYTES = 32  # 256 random bits, URL-safe base64 (43 characters)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="shows up in logs and metrics (never the key)")
    parser.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in Role],
        help="read: embed, classify, list, get; write: also add and delete",
    )
    parser.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        required=True,
        metavar="NS",
        help=f"a namespace the key may use (repeat for several; '{ANY_NAMESPACE}': all)",
    )
    # Rate limits (per replica, docs/security.md); left out: unlimited.
    for kind, unit in (("requests", "requests"), ("images", "images")):
        parser.add_argument(
            f"--{kind}-per-s",
            type=_positive,
            metavar="RATE",
            help=f"at most RATE {unit} per second (default: unlimited)",
        )
        parser.add_argument(
            f"--{kind}-burst",
            type=_positive,
            metavar="N",
            help=f"{unit} that may come at once (default: one second's worth)",
        )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _limits(args: argparse.Namespace) -> dict[str, float]:
    """The limit fields of the entry, only those given (an int when whole: `2`, not `2.0`)."""
    fields = ("requests_per_s", "requests_burst", "images_per_s", "images_burst")
    return {f: int(v) if v.is_integer() else v for f in fields if (v := getattr(args, f, None)) is not None}


def toml_entry(
    name: str, digest_hex: str, role: str, namespaces: list[str], limits: dict[str, float] | None = None
) -> str:
    """One ``[[keys]]`` table, valid TOML for any Unicode name (a TOML writer, not JSON: JSON
    escapes a non-BMP character as a surrogate pair, which TOML refuses). It starts with a blank
    line, so appending it to a file that lacks a final newline still parses."""
    entry = {"name": name, "sha256": digest_hex, "role": role, "namespaces": namespaces, **(limits or {})}
    return "\n" + tomli_w.dumps({"keys": [entry]})


def run(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(KEY_BYTES)
    digest = key_digest(key).hex()
    sys.stderr.write(f"API key (shown once; the server keeps only its hash):\n{key}\n\n")
    sys.stderr.write(
        "Add the entry on stdout to the --api-keys file, e.g. `fewshot keygen ... >> keys.toml` "
        "(the server picks it up within seconds, or on SIGHUP).\n"
    )
    sys.stdout.write(toml_entry(args.name, digest, args.role, args.namespaces, _limits(args)))
    return 0
