"""``fewshot keygen``: a new random API key, printed once, and the TOML entry for the key file.

The server keeps only the key's sha256, so the key cannot be shown again: store it now.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

from .access import ANY_NAMESPACE, Role, key_digest

KEY_BYTES = 32  # 256 random bits, URL-safe base64 (43 characters)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="shows up in logs and metrics (never the key)")
    parser.add_argument(
        "--role", required=True, choices=[r.value for r in Role],
        help="read: embed, classify, list, get; write: also add and delete",
    )  # fmt: skip
    parser.add_argument(
        "--namespace", dest="namespaces", action="append", required=True, metavar="NS",
        help=f"a namespace the key may use (repeat for several; '{ANY_NAMESPACE}': all)",
    )  # fmt: skip


def toml_entry(name: str, digest_hex: str, role: str, namespaces: list[str]) -> str:
    # JSON strings are valid TOML basic strings, so names with quotes stay well-formed.
    return (
        "[[keys]]\n"
        f"name = {json.dumps(name)}\n"
        f'sha256 = "{digest_hex}"\n'
        f"role = {json.dumps(role)}\n"
        f"namespaces = [{', '.join(json.dumps(ns) for ns in namespaces)}]\n"
    )


def run(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(KEY_BYTES)
    digest = key_digest(key).hex()
    print(f"API key (shown once; the server keeps only its hash):\n{key}\n")
    print("Add this entry to the --api-keys file (the server picks it up within seconds, or on SIGHUP):\n")
    sys.stdout.write(toml_entry(args.name, digest, args.role, args.namespaces))
    return 0
