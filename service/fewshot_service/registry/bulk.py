"""Bulk writes of many classes at once (``POST /v1/examples:bulk``, ``fewshot import``): which
uploads a class already holds (by content hash), and the adds of many classes pipelined.

Each class is added by the same script as a single add (add_examples.lua), so each class is
all-or-none and its cap holds; the request as a whole is not atomic. The script records each
example's content hash with it, and the delete scripts drop the entries of what they delete, so
an entry names an example that exists; it also names the namespace epoch, so an entry left from
before Redis lost its data never matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis

from .keys import encode, redis_errors, script_code, text
from .registry import Registry
from .store import check_embeddings, script_error


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ClassUpload:
    """One class's part of a bulk request, after dedupe: embeddings [n, D], stored images (or
    None) and the content hashes of the files, all parallel."""

    label: str
    embeddings: np.ndarray
    images: Sequence[bytes] | None
    hashes: list[str]


@dataclass
class ClassOutcome:
    label: str
    count: int = 0  # the class's examples after the add
    added_example_ids: list[str] = field(default_factory=list)
    error: str | None = None  # the class's add was refused (e.g. over its cap); nothing added


def known_hashes(
    registry: Registry, namespace: str, wanted: dict[str, list[str]]
) -> dict[str, dict[str, str]]:
    """label -> {content hash -> example id} for those of ``wanted`` (label -> hashes) that the
    class holds now. One round trip of two commands when none of the labels exists yet (a fresh
    import: no per-class reads), else up to two more, pipelined, whatever the number of classes."""
    keys = registry.keys(namespace)
    labels = [label for label, hashes in wanted.items() if hashes]
    if not labels:
        return {}
    with redis_errors(registry.client):
        pipe = registry.client.pipeline(transaction=False)
        pipe.hget(keys.state, "epoch")
        pipe.hmget(keys.counts, [encode(label) for label in labels])
        epoch, counts = pipe.execute()
        existing = [label for label, count in zip(labels, counts) if count is not None]
        if epoch is None or not existing:
            return {}
        pipe = registry.client.pipeline(transaction=False)
        for label in existing:
            pipe.hmget(keys.hashes(label), wanted[label])
        replies = pipe.execute()
        prefix = text(epoch) + ":"
        candidates: list[tuple[str, str, str]] = []  # (label, hash, example id)
        for label, values in zip(existing, replies):
            for digest, value in zip(wanted[label], values):
                if value is not None and text(value).startswith(prefix):
                    candidates.append((label, digest, text(value)[len(prefix) :]))
        if not candidates:
            return {}
        # Entries written before the add script recorded them (a separate, later write) may name
        # an example deleted in between: only an example that exists is a match.
        pipe = registry.client.pipeline(transaction=False)
        for label, _digest, example_id in candidates:
            pipe.hexists(keys.images(label), example_id)
        present = pipe.execute()
    found: dict[str, dict[str, str]] = {}
    for (label, digest, example_id), exists in zip(candidates, present):
        if exists:
            found.setdefault(label, {})[digest] = example_id
    return found


def class_counts(registry: Registry, namespace: str, labels: Sequence[str]) -> dict[str, int]:
    """label -> its example count, for those of ``labels`` that exist: one round trip."""
    if not labels:
        return {}
    with redis_errors(registry.client):
        values = registry.client.hmget(registry.keys(namespace).counts, [encode(label) for label in labels])
    return {label: int(value) for label, value in zip(labels, values) if value is not None}


def add_classes_with_hashes(
    registry: Registry, namespace: str, uploads: Sequence[ClassUpload], model_id: str
) -> list[ClassOutcome]:
    """Add every class of ``uploads`` with its content hashes (one script each, pipelined in one
    round trip; on a Cluster one round trip a class, as redis-py's cluster pipeline refuses
    scripts). A class the script refuses gets its ``error``; the others are added all the same."""
    registry.ensure_layout(namespace)
    replies = registry.writes.run_adds(
        registry.keys(namespace),
        model_id,
        [(u.label, check_embeddings(u.embeddings), u.images, u.hashes) for u in uploads],
    )
    outcomes: list[ClassOutcome] = []
    for upload, reply in zip(uploads, replies):
        if isinstance(reply, redis.exceptions.ResponseError):
            error = script_error(reply, namespace, upload.label, model_id, adding=len(upload.hashes))
            if script_code(reply) != "TOO_MANY_EXAMPLES":
                raise error  # the namespace's model, or Redis refusing: not one class's problem
            outcomes.append(ClassOutcome(upload.label, error=str(error)))
            continue
        _generation, count, *added = reply  # type: ignore[misc]
        outcomes.append(ClassOutcome(upload.label, int(count), [text(i) for i in added]))
    return outcomes
