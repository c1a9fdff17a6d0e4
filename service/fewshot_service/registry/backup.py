"""One namespace to a file and back (``fewshot export-namespace`` / ``import-namespace``).

The file is a zip (format ``fewshot-namespace``, version 1; docs/namespace-file.md, field by
field): ``manifest.json`` (labels, example ids, content hashes, models, counts), the stored
images as they are (``images/<class index>/<example id>``), and per model its embeddings, class
prototypes and running sums as ``.npy`` arrays (read with ``allow_pickle=False``). Prototypes and
sums are copied, not recomputed, so the restored namespace classifies bit for bit as the source.

Export reads one consistent state: it reads again while the namespace's generation changes under
it. Import writes every key of the new namespace and its state hash last, so no server lists or
serves it before it is whole; it gets a new epoch, so a replica that cached a namespace of that
name before reloads it.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_common import __version__
from fewshot_common.errors import FailedPrecondition, InvalidInput, Unavailable

from .keys import LAYOUT, decode, encode, redis_errors, text
from .registry import Registry

FORMAT = "fewshot-namespace"
VERSION = 1
_READ_ATTEMPTS = 5
_WRITE_CHUNK = 1000  # commands per pipeline round trip on import


@dataclass(frozen=True)
class Summary:
    namespace: str
    classes: int
    examples: int
    models: list[str]


def _labels(registry: Registry, namespace: str) -> list[str]:
    with redis_errors(registry.client):
        return sorted(decode(f) for f in registry.client.hkeys(registry.keys(namespace).counts))


def _read(registry: Registry, namespace: str) -> dict[str, Any]:
    """Everything of ``namespace`` as of one generation (read again while it changes)."""
    keys = registry.keys(namespace)
    client = registry.client
    registry.ensure_layout(namespace)
    for _attempt in range(_READ_ATTEMPTS):
        with redis_errors(client):
            generation = client.hget(keys.state, "generation")
            labels = _labels(registry, namespace)
            models = {text(m): int(d) for m, d in client.hgetall(keys.models).items()}
            state = {text(k): text(v) for k, v in client.hgetall(keys.state).items()}
            pipe = client.pipeline(transaction=False)
            for label in labels:
                pipe.hgetall(keys.images(label))
                pipe.hgetall(keys.hashes(label))
            for model_id in sorted(models):
                mk = keys.model(model_id)
                pipe.hgetall(mk.counts)
                pipe.hgetall(mk.prototypes)
                pipe.hgetall(mk.sums)
                for label in labels:
                    pipe.hgetall(mk.examples(label))
            replies = pipe.execute()
            if client.hget(keys.state, "generation") == generation:
                return {
                    "labels": labels,
                    "models": models,
                    "state": state,
                    "replies": replies,
                }
    raise Unavailable(f"namespace {namespace!r} kept changing while being read; retry later")


def export_namespace(registry: Registry, namespace: str, output: Path) -> Summary:
    """Write ``namespace`` to ``output`` (a zip); NotFound-like FailedPrecondition when empty."""
    data = _read(registry, namespace)
    labels, models, state = data["labels"], data["models"], data["state"]
    if not labels:
        raise FailedPrecondition(f"namespace {namespace!r} holds no classes: nothing to export")
    replies = iter(data["replies"])
    epoch = state.get("epoch", "")
    classes: list[dict[str, Any]] = []
    images: list[tuple[str, bytes]] = []
    for index, label in enumerate(labels):
        stored = {text(k): bytes(v) for k, v in next(replies).items()}
        hashes = {text(k): text(v) for k, v in next(replies).items()}
        example_ids = sorted(stored, key=int)
        sha = {}
        for digest, value in hashes.items():
            entry_epoch, _, example_id = value.rpartition(":")
            if entry_epoch == epoch and example_id in stored:
                sha[example_id] = digest
        classes.append({"label": label, "example_ids": example_ids, "sha256": sha})
        images += [(f"images/{index}/{i}", blob) for i, blob in stored.items() if blob]
    model_entries: list[dict[str, Any]] = []
    arrays: list[tuple[str, np.ndarray]] = []
    for m, model_id in enumerate(sorted(models)):
        dim = models[model_id]
        counts, prototypes, sums = (next(replies) for _ in range(3))
        rows: list[list[Any]] = []
        vectors: list[bytes] = []
        for index in range(len(labels)):
            embedded = next(replies)
            for example_id in sorted((text(k) for k in embedded), key=int):
                rows.append([index, example_id])
                vectors.append(bytes(embedded[example_id.encode()]))
        class_rows = [i for i, label in enumerate(labels) if encode(label).encode() in prototypes]
        fields = [encode(labels[i]).encode() for i in class_rows]
        arrays += [
            (f"models/{m}/embeddings.npy", _stack(vectors, "<f4", dim)),
            (
                f"models/{m}/prototypes.npy",
                _stack([prototypes[f] for f in fields], "<f4", dim),
            ),
            (
                f"models/{m}/sums.npy",
                _stack([sums.get(f, b"") for f in fields], "<f8", dim),
            ),
        ]
        model_entries.append(
            {
                "model_id": model_id,
                "dim": dim,
                "dir": f"models/{m}",
                "examples": rows,  # [class index, example id] per row of embeddings.npy
                "classes": class_rows,  # class index per row of prototypes.npy and sums.npy
                "class_counts": [int(counts.get(f, 0)) for f in fields],
                "sum_counts": [int(sums.get(f + b":n", 0)) for f in fields],
            }
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fewshot_version": __version__,
        "namespace": namespace,
        "examples": sum(len(c["example_ids"]) for c in classes),
        "next_example_id": int(state.get("next_example_id", 0)),
        "classes": classes,
        "models": model_entries,
    }
    tmp = output.with_name(output.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1))
        for name, blob in images:
            archive.writestr(zipfile.ZipInfo(name), blob, compress_type=zipfile.ZIP_STORED)
        for name, array in arrays:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            archive.writestr(name, buffer.getvalue())
    tmp.replace(output)  # never a half-written file under the asked name
    return Summary(namespace, len(classes), manifest["examples"], sorted(models))


def _stack(blobs: list[bytes], dtype: str, dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), dtype=dtype)
    return np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(blobs), dim)


def read_manifest(archive: zipfile.ZipFile) -> dict[str, Any]:
    try:
        manifest = json.loads(archive.read("manifest.json"))
    except (KeyError, ValueError) as exc:
        raise InvalidInput(f"not a {FORMAT} file: no readable manifest.json ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise InvalidInput(f"not a {FORMAT} file (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise InvalidInput(
            f"{FORMAT} version {manifest.get('version')!r}: this fewshot reads version {VERSION}"
        )
    return manifest


def _load(archive: zipfile.ZipFile, name: str, dtype: str, dim: int) -> np.ndarray:
    array = np.load(io.BytesIO(archive.read(name)), allow_pickle=False)
    if array.dtype != np.dtype(dtype) or array.ndim != 2 or array.shape[1] != dim:
        raise InvalidInput(f"{name}: expected {dtype} rows of {dim}, found {array.dtype} {array.shape}")
    return array


def import_namespace(
    registry: Registry,
    source: Path,
    namespace: str | None = None,
    *,
    replace: bool = False,
) -> Summary:
    """Restore the file ``source`` as ``namespace`` (default: the one it was exported from).
    Refused (FailedPrecondition) when that namespace holds classes, unless ``replace``."""
    with zipfile.ZipFile(source) as archive:
        manifest = read_manifest(archive)
        target = namespace or manifest["namespace"]
        _make_room(registry, target, replace)
        keys = registry.keys(target)
        epoch = uuid.uuid4().hex
        labels = [c["label"] for c in manifest["classes"]]
        writes: list[tuple[str, str, dict[Any, Any]]] = []  # (command, key, mapping)
        for index, entry in enumerate(manifest["classes"]):
            label = entry["label"]
            stored = {}
            for example_id in entry["example_ids"]:
                name = f"images/{index}/{example_id}"
                stored[example_id] = archive.read(name) if name in archive.NameToInfo else b""
            writes.append(("hset", keys.images(label), stored))
            if entry["sha256"]:
                writes.append(
                    (
                        "hset",
                        keys.hashes(label),
                        {d: f"{epoch}:{i}" for i, d in entry["sha256"].items()},
                    )
                )
        counts = {encode(label): len(c["example_ids"]) for label, c in zip(labels, manifest["classes"])}
        writes.append(("hset", keys.counts, counts))
        writes.append(("zadd", keys.labels, dict.fromkeys(counts, 0)))
        state: dict[str, Any] = {
            "epoch": epoch,
            "generation": 1,
            "logged": 1,
            "log_start": 1,
            "layout": LAYOUT,
            "examples": manifest["examples"],
            "next_example_id": manifest["next_example_id"],
            "label_index": 1,
        }
        models: dict[str, int] = {}
        for entry in manifest["models"]:
            model_id, dim, base = entry["model_id"], int(entry["dim"]), entry["dir"]
            mk = keys.model(model_id)
            embeddings = _load(archive, f"{base}/embeddings.npy", "<f4", dim)
            prototypes = _load(archive, f"{base}/prototypes.npy", "<f4", dim)
            sums = _load(archive, f"{base}/sums.npy", "<f8", dim)
            per_class: dict[str, dict[str, bytes]] = {}
            for (class_index, example_id), row in zip(entry["examples"], embeddings):
                per_class.setdefault(labels[class_index], {})[example_id] = row.tobytes()
            for label, mapping in per_class.items():
                writes.append(("hset", mk.examples(label), mapping))
            fields = [encode(labels[i]) for i in entry["classes"]]
            if fields:
                writes.append(
                    (
                        "hset",
                        mk.prototypes,
                        {f: p.tobytes() for f, p in zip(fields, prototypes)},
                    )
                )
                sum_fields: dict[str, Any] = {}
                for f, s, n in zip(fields, sums, entry["sum_counts"]):
                    sum_fields[f], sum_fields[f + ":n"] = s.tobytes(), n
                writes.append(("hset", mk.sums, sum_fields))
                writes.append(("hset", mk.counts, dict(zip(fields, entry["class_counts"]))))
            models[model_id] = dim
            state[f"n:{model_id}"] = len(entry["examples"])
        if models:
            writes.append(("hset", keys.models, models))
        writes.append(("hset", keys.state, state))  # last: the namespace exists from here on
        _write(registry, writes)
    return Summary(target, len(labels), int(manifest["examples"]), sorted(models))


def _make_room(registry: Registry, namespace: str, replace: bool) -> None:
    keys = registry.keys(namespace)
    if _labels(registry, namespace):
        if not replace:
            raise FailedPrecondition(
                f"namespace {namespace!r} holds classes: give another namespace, or --replace to overwrite it"
            )
        registry.delete_namespace(namespace)
    with redis_errors(registry.client):  # what an emptied namespace keeps (its state and log)
        for key in (keys.state, keys.changes, keys.models, keys.labels):
            registry.client.delete(key)


def _write(registry: Registry, writes: list[tuple[str, str, dict[Any, Any]]]) -> None:
    """The writes in order, a chunk of commands per round trip (the state hash is the last)."""
    *body, last = writes
    with redis_errors(registry.client):
        for start in range(0, len(body), _WRITE_CHUNK):
            pipe = registry.client.pipeline(transaction=False)
            for command, key, mapping in body[start : start + _WRITE_CHUNK]:
                if mapping and command == "zadd":
                    pipe.zadd(key, mapping)
                elif mapping:
                    pipe.hset(key, mapping=mapping)
            pipe.execute()
        registry.client.hset(last[1], mapping=last[2])
