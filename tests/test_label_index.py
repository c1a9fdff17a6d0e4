"""The label index (a sorted set of a namespace's labels) and the content hashes of bulk import,
against a real private Valkey/Redis and a real 3-master Redis Cluster: every path that creates or
deletes a class keeps the index equal to the classes, pages read only the index (never the whole
namespace), an older namespace gets its index built once, and deleting an example, a class or a
namespace drops their content hashes in the same script."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from redis.cluster import RedisCluster

from fewshot_service.registry.backup import export_namespace, import_namespace
from fewshot_service.registry.bulk import ClassUpload, add_classes_with_hashes, content_hash, known_hashes
from fewshot_service.registry.keys import encode
from fewshot_service.registry.redis_client import RedisClient, connect_redis
from fewshot_service.registry.registry import Registry

DIM = 8
MODEL = "m"


@pytest.fixture(params=["server", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(backend: str, redis_url: str, request: pytest.FixtureRequest) -> Iterator[RedisClient]:
    url = request.getfixturevalue("cluster_url") if backend == "cluster" else redis_url
    opened = connect_redis(url, cluster=backend == "cluster")
    yield opened
    opened.close()


@pytest.fixture
def registry(client: RedisClient) -> Registry:
    return Registry(client)


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def indexed(registry: Registry, namespace: str) -> list[str]:
    raw = registry.client.zrange(registry.keys(namespace).labels, 0, -1)
    return [bytes.fromhex(f.decode()).decode() for f in raw]


def assert_index_matches(registry: Registry, namespace: str) -> None:
    """The index holds exactly the classes (the counts hash), and paging it lists them all."""
    classes = registry.list_classes(namespace)
    assert indexed(registry, namespace) == [c.label for c in classes]
    seen, after = [], None
    while True:
        page, after = registry.class_page(namespace, after, 3)
        seen += page
        if after is None:
            break
    assert seen == classes


def namespace_keys(client: RedisClient, namespace: str) -> set[str]:
    pattern = f"fewshot:{{ns:{encode(namespace)}}}:*"
    if isinstance(client, RedisCluster):
        found = client.scan_iter(match=pattern, target_nodes=RedisCluster.PRIMARIES)
    else:
        found = client.scan_iter(match=pattern)
    return {k.decode() for k in found}


def upload(label: str, images: list[bytes], seed: int) -> ClassUpload:
    return ClassUpload(label, vectors(len(images), seed), images, [content_hash(b) for b in images])


def test_every_path_that_creates_or_deletes_a_class_keeps_the_index(
    registry: Registry, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    labels = ["é", "a", "a b", "日本", "😀", "Z", "ab", "a/b"] + [f"n{i:02d}" for i in range(12)]
    registry.add_classes("ns", {label: vectors(2, i) for i, label in enumerate(labels[:10])}, MODEL)
    assert_index_matches(registry, "ns")
    for step in range(60):  # random adds and deletes of examples and classes
        label = labels[int(rng.integers(len(labels)))]
        action = rng.integers(4)
        present = {c.label: c for c in registry.list_classes("ns")}
        if action == 0 or label not in present:
            registry.add_examples("ns", label, vectors(1, 100 + step), MODEL, [b"img"])
        elif action == 1:
            registry.delete_class("ns", label)
        else:  # often the class's last example: the class goes with it
            example = registry.get_class("ns", label).example_ids[0]
            registry.delete_example("ns", label, example)
        assert_index_matches(registry, "ns")
    add_classes_with_hashes(registry, "ns", [upload("bulk", [b"x", b"y"], 1)], MODEL)
    assert_index_matches(registry, "ns")

    export_namespace(registry, "ns", tmp_path / "ns.zip")
    import_namespace(registry, tmp_path / "ns.zip", "copy")
    assert indexed(registry, "copy") == indexed(registry, "ns")
    assert_index_matches(registry, "copy")
    registry.add_examples("copy", "after import", vectors(1, 1), MODEL)
    assert_index_matches(registry, "copy")

    registry.delete_namespace("ns")
    assert indexed(registry, "ns") == [] and namespace_keys(registry.client, "ns") == set()
    registry.add_examples("ns", "again", vectors(1, 2), MODEL)  # a new namespace: indexed from the start
    assert_index_matches(registry, "ns")


def test_a_page_reads_the_index_not_the_namespace(registry: Registry, client: RedisClient) -> None:
    registry.add_classes("big", {f"c{i:04d}": vectors(1, i) for i in range(3000)}, MODEL)
    registry.class_page("big", None, 1)  # the layout check, once per replica
    calls = command_counter(client)
    page, after = registry.class_page("big", "c1499", 50)
    assert [s.label for s in page] == [f"c{i:04d}" for i in range(1500, 1550)] and after == "c1549"
    used = calls()
    assert used == {"zrangebylex": 1, "hmget": 1}  # no HKEYS/HGETALL of the namespace
    # A prefix is a range of the index too; with a cursor it starts after the cursor.
    page, after = registry.class_page("big", None, 5, prefix="c12")
    assert [s.label for s in page] == ["c1200", "c1201", "c1202", "c1203", "c1204"] and after == "c1204"
    page, after = registry.class_page("big", "c1297", 5, prefix="c12")
    assert [s.label for s in page] == ["c1298", "c1299"] and after is None
    assert registry.class_page("big", "d", 5, prefix="c12") == ([], None)
    assert registry.class_page("big", None, 5, prefix="x") == ([], None)


def test_a_search_walks_the_index_from_the_cursor_until_the_page_is_full(registry: Registry) -> None:
    labels = [f"item {i}" for i in range(2500)] + ["Zebra/striped", "zebra 2"]
    registry.add_classes("s", {label: vectors(1, i) for i, label in enumerate(labels)}, MODEL)
    for needle in ("zebra", "item 1", "9", "nothing"):

        def matches(label: str, needle: str = needle) -> bool:
            return needle in label.casefold()

        expected = sorted(label for label in labels if matches(label))
        seen, after = [], None
        while True:
            page, after = registry.class_page("s", after, 60, matches=matches)
            assert len(page) <= 60 and (after is None or len(page) == 60)
            seen += [s.label for s in page]
            if after is None:
                break
        assert seen == expected


def test_a_namespace_from_before_the_index_gets_it_built_once(
    registry: Registry, client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    labels = [f"old {i}" for i in range(40)]
    registry.add_classes("old", {label: vectors(1, i) for i, label in enumerate(labels)}, MODEL)
    keys = registry.keys("old")
    client.delete(keys.labels)  # as the scripts before the index left it
    client.hdel(keys.state, "label_index")
    fresh = Registry(client)  # a replica that has not seen it
    with caplog.at_level(logging.INFO, logger="fewshot_service.registry.migration"):
        page, after = fresh.class_page("old", None, 10)
    assert [s.label for s in page] == sorted(labels)[:10] and after == sorted(labels)[9]
    assert "40 labels indexed" in caplog.text
    assert client.hget(keys.state, "label_index") == b"1"
    assert_index_matches(fresh, "old")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fewshot_service.registry.migration"):
        Registry(client).class_page("old", None, 10)  # another replica: already indexed
    assert "indexed" not in caplog.text


def test_deletes_drop_the_content_hashes_of_what_they_delete(registry: Registry, client: RedisClient) -> None:
    files = {"cat": [b"c1", b"c2", b"c3"], "dog": [b"d1", b"d2"]}
    outcomes = add_classes_with_hashes(
        registry, "h", [upload(label, images, i) for i, (label, images) in enumerate(files.items())], MODEL
    )
    ids = {o.label: o.added_example_ids for o in outcomes}
    keys = registry.keys("h")
    wanted = {label: [content_hash(b) for b in images] for label, images in files.items()}
    assert set(known_hashes(registry, "h", wanted)["cat"]) == set(wanted["cat"])

    registry.delete_example("h", "cat", ids["cat"][1])  # its entry goes; the others stay
    assert set(client.hkeys(keys.hashes("cat"))) == {wanted["cat"][0].encode(), wanted["cat"][2].encode()}
    assert set(known_hashes(registry, "h", wanted)["cat"]) == {wanted["cat"][0], wanted["cat"][2]}

    registry.delete_example("h", "cat", ids["cat"][0])
    registry.delete_example("h", "cat", ids["cat"][2])  # the last: the class and its hashes go
    assert client.exists(keys.hashes("cat")) == 0

    registry.delete_class("h", "dog")
    assert client.exists(keys.hashes("dog")) == 0
    assert known_hashes(registry, "h", wanted) == {}

    add_classes_with_hashes(registry, "h", [upload("bird", [b"b1"], 9)], MODEL)
    assert client.exists(keys.hashes("bird")) == 1
    registry.delete_namespace("h")
    assert namespace_keys(client, "h") == set()  # no content hash (nor anything else) left behind


def test_a_bulk_add_reads_no_class_of_a_fresh_import_and_records_hashes_with_the_examples(
    registry: Registry, client: RedisClient
) -> None:
    """Filling a catalog: the dedupe asks Redis two commands whatever the number of new classes,
    and each class's content hashes go in with its examples (its add script), not afterwards.
    (Valkey's command counts include the commands scripts call, so only reads are counted.)"""
    files = {f"c{i}": [f"{i}a".encode(), f"{i}b".encode()] for i in range(30)}
    wanted = {label: [content_hash(b) for b in images] for label, images in files.items()}
    add_classes_with_hashes(registry, "fill", [upload("c0", files["c0"], 0)], MODEL)  # layout checked
    calls = command_counter(client)
    assert set(known_hashes(registry, "fill", wanted)) == {"c0"}
    assert calls() == {"hget": 1, "hmget": 2, "hexists": 2}  # epoch, counts; c0's hashes and ids
    calls = command_counter(client)
    new = {label: images for label, images in files.items() if label != "c0"}
    assert known_hashes(registry, "fill", {label: wanted[label] for label in new}) == {}
    assert calls() == {"hget": 1, "hmget": 1}  # none of them exists: no per-class read
    calls = command_counter(client)
    outcomes = add_classes_with_hashes(
        registry, "fill", [upload(label, images, i) for i, (label, images) in enumerate(new.items())], MODEL
    )
    assert calls()["evalsha"] == len(new)  # the hashes: written by these scripts, nothing after
    epoch = client.hget(registry.keys("fill").state, "epoch").decode()
    for outcome in outcomes:
        entries = client.hgetall(registry.keys("fill").hashes(outcome.label))
        assert entries == {
            digest.encode(): f"{epoch}:{example_id}".encode()
            for digest, example_id in zip(wanted[outcome.label], outcome.added_example_ids)
        }
    held = known_hashes(registry, "fill", wanted)
    assert {label: set(h) for label, h in held.items()} == {label: set(w) for label, w in wanted.items()}


def command_counter(client: RedisClient) -> Callable[[], dict[str, int]]:
    """Calls per command from now on, summed over every master of a cluster."""

    def totals() -> dict[str, int]:
        if isinstance(client, RedisCluster):
            per_node = list(client.info("commandstats", target_nodes=RedisCluster.PRIMARIES).values())
        else:
            per_node = [client.info("commandstats")]
        out: dict[str, int] = {}
        for stats in per_node:
            for name, stat in stats.items():
                command = name.removeprefix("cmdstat_")
                out[command] = out.get(command, 0) + int(stat["calls"])
        return out

    before = totals()

    def since() -> dict[str, int]:
        after = totals()
        used = {name: n - before.get(name, 0) for name, n in after.items()}
        used.pop("info", None)
        return {name: n for name, n in used.items() if n}

    return since


def test_the_migration_from_the_layout_before_per_model_keys_indexes_the_labels(
    registry: Registry, client: RedisClient
) -> None:
    """What the scripts before per-model keys left (as in test_model_roll): migrated on first
    touch, its labels indexed in the same script."""
    import uuid

    base = f"fewshot:{{ns:{encode('legacy')}}}"
    labels = ["b", "a", "ü", "c d"]
    client.hset(f"{base}:model", mapping={"model_id": MODEL, "dim": DIM})
    for i, label in enumerate(labels, start=1):
        row = vectors(1, i)[0]
        client.hset(f"{base}:ex:{encode(label)}", str(i), row.tobytes())
        client.hset(f"{base}:counts", encode(label), 1)
        client.hset(f"{base}:prototypes", encode(label), (row / np.linalg.norm(row)).astype("<f4").tobytes())
    client.hset(
        f"{base}:state",
        mapping={"epoch": uuid.uuid4().hex, "generation": 4, "next_example_id": 4, "logged": 4},
    )
    page, after = registry.class_page("legacy", None, 3)
    assert [s.label for s in page] == sorted(labels)[:3] and after == sorted(labels)[2]
    assert client.hget(registry.keys("legacy").state, "layout") == b"2"  # migrated, then paged
    assert_index_matches(registry, "legacy")
