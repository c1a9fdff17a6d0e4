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


def toml_entry(name: str, digest_hex: str, role: str, namespaces: list[str]) -> str:
    """One ``[[keys]]`` table, valid TOML for any Unicode name (a TOML writer, not JSON: JSON
    escapes a non-BMP character as a surrogate pair, which TOML refuses). It starts with a blank
    line, so appending it to a file that lacks a final newline still parses."""
    entry = {"name": name, "sha256": digest_hex, "role": role, "namespaces": namespaces}
    return "\n" + tomli_w.dumps({"keys": [entry]})


def run(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(KEY_BYTES)
    digest = key_digest(key).hex()
    sys.stderr.write(f"API key (shown once; the server keeps only its hash):\n{key}\n\n")
    sys.stderr.write(
        "Add the entry on stdout to the --api-keys file, e.g. `fewshot keygen ... >> keys.toml` "
        "(the server picks it up within seconds, or on SIGHUP).\n"
    )
    sys.stdout.write(toml_entry(args.name, digest, args.role, args.namespaces))
    return 0
