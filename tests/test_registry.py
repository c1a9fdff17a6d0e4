"""The Redis registry against a real private Valkey/Redis server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from fewshot_common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from fewshot_service.registry.redis_client import RedisClient, connect_redis
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import ModelIncompleteError, Registry

DIM = 16
MODEL = "vit_test-000000000001"
TRICKY_LABELS = [
    "a/b/c",
    "*",
    "a*b?[c]",
    "ns:label:with:colons",
    "{braces}",
    "}",
    "{",
    "}{evil}{",
    "two words  and spaces ",
    "🐱 cat",
    "ünïcödé",
    "x" * 128,
    "🦄" * 128,
]


def unit_mean(vectors: np.ndarray) -> np.ndarray:
    v = vectors.astype(np.float64)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(axis=0)


def rand(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


# Every test below that uses Redis runs twice: on one server and on a real 3-master Redis Cluster.


@pytest.fixture(params=["server", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def redis_url(backend: str, redis_url: str, request: pytest.FixtureRequest) -> str:
    """Overrides conftest's: the private server's URL, or a node of the private cluster."""
    return request.getfixturevalue("cluster_url") if backend == "cluster" else redis_url


@pytest.fixture
def connect(backend: str) -> Iterator[Callable[[str], RedisClient]]:
    """Opens clients as the server does (``--redis-cluster`` on the cluster); closes them after."""
    opened: list[RedisClient] = []

    def open_client(url: str) -> RedisClient:
        opened.append(connect_redis(url, cluster=backend == "cluster"))
        return opened[-1]

    yield open_client
    for client in opened:
        client.close()


@pytest.fixture
def redis_client(redis_url: str, connect: Callable[[str], RedisClient]) -> RedisClient:
    return connect(redis_url)


def reset_command_stats(client: RedisClient) -> None:
    if isinstance(client, RedisCluster):
        client.config_resetstat(target_nodes=RedisCluster.PRIMARIES)
    else:
        client.config_resetstat()


def command_calls(client: RedisClient) -> dict[str, int]:
    """Calls per command since CONFIG RESETSTAT, summed over every master of a cluster."""
    if isinstance(client, RedisCluster):
        per_node = client.info("commandstats", target_nodes=RedisCluster.PRIMARIES).values()
    else:
        per_node = [client.info("commandstats")]
    calls: dict[str, int] = {}
    for stats in per_node:
        for name, stat in stats.items():
            calls[name] = calls.get(name, 0) + int(stat["calls"])
    return calls


@pytest.fixture
def registry(redis_client: RedisClient) -> Registry:
    return Registry(redis_client)


def test_add_get_list_and_prototype_is_mean_of_normalised(registry: Registry) -> None:
    cats, dogs = rand(5, 1) * 7.0, rand(3, 2)
    info = registry.add_examples("default", "cat", cats, MODEL)
    assert (info.label, info.count, len(info.added_example_ids)) == ("cat", 5, 5)
    assert info.example_ids == info.added_example_ids
    registry.add_examples("default", "dog", dogs, MODEL)

    assert [(c.label, c.count) for c in registry.list_classes("default")] == [("cat", 5), ("dog", 3)]
    assert registry.get_class("default", "dog").count == 3
    protos = registry.prototypes("default", MODEL)
    assert protos.labels == ["cat", "dog"]
    assert protos.model_id == MODEL
    assert protos.matrix.dtype == np.float32 and protos.matrix.shape == (2, DIM)
    np.testing.assert_allclose(protos.matrix[0], unit_mean(cats), atol=1e-6)
    np.testing.assert_allclose(protos.matrix[1], unit_mean(dogs), atol=1e-6)


def test_each_example_is_stored_so_removing_one_recomputes_the_prototype(registry: Registry) -> None:
    first, second = rand(3, 3), rand(2, 4)
    registry.add_examples("default", "cat", first, MODEL)
    added = registry.add_examples("default", "cat", second, MODEL)
    assert added.count == 5 and len(added.example_ids) == 5

    remaining = registry.delete_example("default", "cat", added.added_example_ids[0])
    assert remaining is not None and remaining.count == 4
    assert added.added_example_ids[0] not in remaining.example_ids
    expected = unit_mean(np.concatenate([first, second[1:]]))
    np.testing.assert_allclose(registry.prototypes("default").matrix[0], expected, atol=1e-6)


def test_removing_the_last_example_removes_the_class(registry: Registry) -> None:
    info = registry.add_examples("default", "solo", rand(1, 5), MODEL)
    assert registry.delete_example("default", "solo", info.example_ids[0]) is None
    assert registry.list_classes("default") == []
    with pytest.raises(NotFound):
        registry.get_class("default", "solo")


def test_delete_class_and_unknown_class_or_example_are_not_found(registry: Registry) -> None:
    registry.add_examples("default", "cat", rand(2, 6), MODEL)
    registry.add_examples("default", "dog", rand(2, 7), MODEL)
    registry.delete_class("default", "cat")
    assert [c.label for c in registry.list_classes("default")] == ["dog"]
    assert registry.prototypes("default").labels == ["dog"]
    with pytest.raises(NotFound, match="cat"):
        registry.delete_class("default", "cat")
    with pytest.raises(NotFound, match="cat"):
        registry.get_class("default", "cat")
    with pytest.raises(NotFound, match="no example '999'"):
        registry.delete_example("default", "dog", "999")
    with pytest.raises(NotFound, match="no class 'cat'"):
        registry.delete_example("default", "cat", "1")


def test_empty_namespace_has_no_prototypes(registry: Registry) -> None:
    with pytest.raises(FailedPrecondition, match="no classes"):
        registry.prototypes("empty")
    assert registry.list_classes("empty") == []


def test_two_models_share_the_examples_and_keep_their_own_embeddings(registry: Registry) -> None:
    registry.add_examples("shop", "cat", rand(2, 8), MODEL)
    # Another model may add to the same namespace: the example is the namespace's, the
    # embedding that model's; each model's prototypes hold only its own embeddings.
    registry.add_examples("shop", "cat", rand(1, 9, dim=DIM * 2), "other-model")
    assert [(c.label, c.count) for c in registry.list_classes("shop")] == [("cat", 3)]
    with pytest.raises(ModelIncompleteError, match="2 of 3 examples embedded for model 'vit_test"):
        registry.prototypes("shop", MODEL)
    with pytest.raises(ModelIncompleteError, match="1 of 3 examples embedded for model 'other-model'"):
        registry.prototypes("shop", expected_model_id="other-model")
    # The same model id with another width is refused, and stores nothing.
    with pytest.raises(FailedPrecondition, match="dimensional"):
        registry.add_examples("shop", "dog", rand(2, 9, dim=DIM * 3), MODEL)
    assert [(c.label, c.count) for c in registry.list_classes("shop")] == [("cat", 3)]
    [listed] = registry.list_namespaces()
    assert [(m.model_id, m.embedded, m.complete) for m in listed.models] == [
        (MODEL, 2, False),
        ("other-model", 1, False),
    ]
    # Deleting the other model's example makes MODEL's prototypes complete again (its own two).
    other_id = registry.get_class("shop", "cat").example_ids[-1]
    registry.delete_example("shop", "cat", other_id)
    np.testing.assert_allclose(registry.prototypes("shop", MODEL).matrix[0], unit_mean(rand(2, 8)), atol=1e-6)
    # A model left without embeddings in the namespace is forgotten there.
    assert [(m.model_id, m.complete) for m in registry.list_namespaces()[0].models] == [(MODEL, True)]


def test_namespaces_are_independent(registry: Registry) -> None:
    registry.add_examples("a", "cat", rand(2, 10), MODEL)
    registry.add_examples("b", "cat", rand(4, 11), "another-model")
    assert registry.get_class("a", "cat").count == 2
    assert registry.get_class("b", "cat").count == 4
    registry.delete_class("a", "cat")
    assert registry.get_class("b", "cat").count == 4


def test_tricky_labels_round_trip_verbatim_and_stay_in_their_namespace_slot(
    registry: Registry, redis_client: RedisClient
) -> None:
    namespace = "}{ns*:/ 🐱"
    for seed, label in enumerate(TRICKY_LABELS):
        registry.add_examples(namespace, label, rand(2, 100 + seed), MODEL)
    # A label that is a prefix of another, or looks like a pattern, touches only its own class.
    registry.delete_class(namespace, "*")
    expected = sorted(label for label in TRICKY_LABELS if label != "*")
    assert [c.label for c in registry.list_classes(namespace)] == expected
    assert registry.prototypes(namespace).labels == expected
    for label in expected:
        assert registry.get_class(namespace, label).label == label

    keys = [k.decode() for k in redis_client.scan_iter(count=1000)]
    tag = "ns:" + namespace.encode().hex()
    assert keys, "the registry wrote nothing"
    for key in keys:
        # Redis hashes only what lies between the first '{' and the next '}'.
        assert key.startswith(f"fewshot:{{{tag}}}:"), key
        assert key.isascii() and key.count("{") == 1 and key.count("}") == 1, key


@pytest.mark.parametrize(
    "embeddings",
    [
        np.zeros((0, DIM), np.float32),
        np.ones(DIM, np.float32),
        np.zeros((1, DIM), np.float32),
        np.full((1, DIM), np.nan, np.float32),
    ],
    ids=["none", "1d", "zero", "nan"],
)
def test_bad_embeddings_are_invalid_input(registry: Registry, embeddings: np.ndarray) -> None:
    with pytest.raises(InvalidInput):
        registry.add_examples("default", "cat", embeddings, MODEL)
    assert registry.list_classes("default") == []


def test_generation_is_bumped_by_every_change(registry: Registry) -> None:
    seen = [registry.generation("default")]
    info = registry.add_examples("default", "cat", rand(2, 12), MODEL)
    seen.append(registry.generation("default"))
    registry.delete_example("default", "cat", info.example_ids[0])
    seen.append(registry.generation("default"))
    registry.delete_class("default", "cat")
    seen.append(registry.generation("default"))
    assert seen == sorted(set(seen)) and len(seen) == 4


def test_replica_cache_costs_one_round_trip_and_sees_other_replicas_changes(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> None:
    client_a, client_b = connect(redis_url), connect(redis_url)
    replica_a, replica_b = Registry(client_a), Registry(client_b)
    replica_a.add_examples("default", "cat", rand(3, 13), MODEL)
    first = replica_b.prototypes("default", MODEL)

    reset_command_stats(client_a)
    for _ in range(20):
        assert replica_b.prototypes("default", MODEL) is first  # the cached matrix, not a copy
    calls = command_calls(client_a)
    assert "cmdstat_hgetall" not in calls  # no prototype was fetched again
    assert calls["cmdstat_hmget"] == 20  # one generation check per request

    replica_a.add_examples("default", "dog", rand(3, 14), MODEL)  # a change through the other replica
    assert replica_b.prototypes("default", MODEL).labels == ["cat", "dog"]
    replica_a.delete_class("default", "cat")
    assert replica_b.prototypes("default", MODEL).labels == ["dog"]


def test_64_concurrent_adds_through_two_replicas_lose_nothing(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> None:
    replicas = [Registry(connect(redis_url)) for _ in range(2)]
    shots = rand(64, 15) * np.linspace(0.5, 3.0, 64, dtype=np.float32)[:, None]
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(
            pool.map(
                lambda i: replicas[i % 2].add_examples("default", "crowd", shots[i : i + 1], MODEL),
                range(64),
            )
        )
    ids = [i for info in infos for i in info.added_example_ids]
    assert len(set(ids)) == 64
    assert sorted(info.count for info in infos) == list(range(1, 65))  # every add saw its own
    assert registry_count(replicas[0]) == 64
    np.testing.assert_allclose(replicas[1].prototypes("default").matrix[0], unit_mean(shots), atol=1e-6)


def registry_count(registry: Registry) -> int:
    return registry.get_class("default", "crowd").count


def test_redis_down_is_unavailable_and_the_client_recovers_by_itself(tmp_path: Path) -> None:
    server = ManagedRedis(tmp_path / "redis", persistent=True)
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
    registry = Registry(client)
    registry.add_examples("default", "cat", rand(2, 16), MODEL)
    port, password = server.port, redis.connection.parse_url(server.url)["password"]
    server.stop()

    assert registry.ping() is False
    with pytest.raises(Unavailable, match="unreachable"):
        registry.add_examples("default", "dog", rand(2, 17), MODEL)
    with pytest.raises(Unavailable):
        registry.prototypes("default")
    with pytest.raises(Unavailable):
        registry.list_classes("default")

    # Same port, password and data dir: the very same Registry object works again, and the AOF kept "cat"
    # (scripts are re-loaded into the fresh server's empty script cache without our help).
    restarted = ManagedRedis(tmp_path / "redis", port=port, password=password, persistent=True)
    restarted.start()
    try:
        assert registry.ping() is True
        registry.add_examples("default", "dog", rand(2, 17), MODEL)
        assert registry.prototypes("default").labels == ["cat", "dog"]
    finally:
        client.close()
        restarted.stop()


def test_cache_is_not_fooled_when_redis_loses_its_data(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> None:
    client = connect(redis_url)
    writer, reader = Registry(client), Registry(connect(redis_url))
    writer.add_examples("default", "cat", rand(2, 18), MODEL)
    assert reader.prototypes("default").labels == ["cat"]
    client.flushall()  # what a restart of a Redis without persistence looks like
    writer.add_examples("default", "dog", rand(2, 19), MODEL)
    assert writer.generation("default") == 1  # the same generation number as the cached state
    assert reader.prototypes("default").labels == ["dog"]


# -- bounded classes and O(added) adds (issue 14) ------------------------------------------------


def sums_key(registry: Registry, namespace: str = "default") -> str:
    return f"{registry.key_prefix}:{{ns:{namespace.encode().hex()}}}:m:{MODEL.encode().hex()}:sums"


def examples_key(registry: Registry, label: str, namespace: str = "default") -> str:
    return (
        f"{registry.key_prefix}:{{ns:{namespace.encode().hex()}}}:m:{MODEL.encode().hex()}"
        f":ex:{label.encode().hex()}"
    )


def prototype_of(registry: Registry, label: str) -> np.ndarray:
    protos = registry.prototypes("default", MODEL)
    return protos.matrix[protos.labels.index(label)]


def test_an_add_over_the_class_cap_is_refused_and_adds_nothing(redis_client: RedisClient) -> None:
    registry = Registry(redis_client, max_examples_per_class=5)
    registry.add_examples("default", "cat", rand(3, 1), MODEL)
    generation = registry.generation("default")
    with pytest.raises(
        FailedPrecondition,
        match=r"class 'cat' in namespace 'default' holds 3 examples; adding 3 would exceed the "
        r"limit of 5 examples per class",
    ):
        registry.add_examples("default", "cat", rand(3, 2), MODEL)
    assert registry.get_class("default", "cat").count == 3
    assert registry.generation("default") == generation
    np.testing.assert_allclose(prototype_of(registry, "cat"), unit_mean(rand(3, 1)), atol=1e-6)
    # Up to the cap is fine; a new class over it alone is refused and leaves no trace.
    assert registry.add_examples("default", "cat", rand(2, 3), MODEL).count == 5
    with pytest.raises(FailedPrecondition, match="holds 0 examples; adding 6 would exceed"):
        registry.add_examples("default", "dog", rand(6, 4), MODEL)
    assert [c.label for c in registry.list_classes("default")] == ["cat"]


def test_adds_use_the_running_sum_instead_of_rereading_the_class(
    registry: Registry, redis_client: RedisClient
) -> None:
    first, second = rand(4, 5), rand(2, 6)
    registry.add_examples("default", "cat", first, MODEL)
    # Overwrite a stored example behind the scripts' back (same count): an add that re-read
    # every example would pick it up; one that keeps a running sum does not.
    ids = registry.get_class("default", "cat").example_ids
    redis_client.hset(examples_key(registry, "cat"), ids[0], rand(1, 99)[0].astype("<f4").tobytes())
    registry.add_examples("default", "cat", second, MODEL)
    expected = unit_mean(np.concatenate([first, second]))
    np.testing.assert_allclose(prototype_of(registry, "cat"), expected, atol=1e-6)


def test_deletes_update_the_sum_exactly(registry: Registry) -> None:
    vectors = rand(10, 7)
    info = registry.add_examples("default", "cat", vectors, MODEL)
    for example_id in info.added_example_ids[:7]:
        registry.delete_example("default", "cat", example_id)
    np.testing.assert_allclose(prototype_of(registry, "cat"), unit_mean(vectors[7:]), atol=1e-6)
    registry.add_examples("default", "cat", vectors[:2], MODEL)
    expected = unit_mean(np.concatenate([vectors[7:], vectors[:2]]))
    np.testing.assert_allclose(prototype_of(registry, "cat"), expected, atol=1e-6)


def test_classes_written_before_sums_existed_still_work(
    registry: Registry, redis_client: RedisClient
) -> None:
    old, new = rand(5, 8), rand(3, 9)
    info = registry.add_examples("default", "cat", old, MODEL)
    registry.add_examples("default", "dog", rand(2, 10), MODEL)
    redis_client.delete(sums_key(registry))  # as the old scripts left it: no sums at all
    registry.add_examples("default", "cat", new, MODEL)
    np.testing.assert_allclose(
        prototype_of(registry, "cat"), unit_mean(np.concatenate([old, new])), atol=1e-6
    )
    redis_client.delete(sums_key(registry))
    registry.delete_example("default", "cat", info.added_example_ids[0])
    np.testing.assert_allclose(
        prototype_of(registry, "cat"), unit_mean(np.concatenate([old[1:], new])), atol=1e-6
    )
    # A sum that covers another count (an old replica added examples meanwhile) is recomputed.
    redis_client.hset(sums_key(registry), b"cat".hex() + ":n", 1)
    registry.add_examples("default", "cat", new[:1], MODEL)
    np.testing.assert_allclose(
        prototype_of(registry, "cat"), unit_mean(np.concatenate([old[1:], new, new[:1]])), atol=1e-6
    )
    registry.delete_class("default", "cat")
    registry.delete_class("default", "dog")
    assert redis_client.hlen(sums_key(registry)) == 0


# -- incremental sync between replicas (issue 16) -------------------------------------------------


def changes_key(registry: Registry, namespace: str = "default") -> str:
    return f"{registry.key_prefix}:{{ns:{namespace.encode().hex()}}}:changes"


@pytest.fixture
def two_replicas(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> tuple[Registry, Registry, RedisClient]:
    """A writer and a reader replica, each with its own client; the reader's client is returned
    for command counting."""
    reader_client = connect(redis_url)
    return Registry(connect(redis_url)), Registry(reader_client), reader_client


def assert_matches_a_fresh_replica(reader: Registry, redis_client: RedisClient) -> None:
    fresh = Registry(redis_client).prototypes("default", MODEL)
    cached = reader.prototypes("default", MODEL)
    assert cached.labels == fresh.labels
    np.testing.assert_allclose(cached.matrix, fresh.matrix, atol=1e-6)


def test_a_replica_behind_fetches_only_the_changed_classes(
    two_replicas: tuple[Registry, Registry, RedisClient],
) -> None:
    writer, reader, reader_client = two_replicas
    for i in range(30):
        writer.add_examples("default", f"class-{i:02d}", rand(1, 100 + i), MODEL)
    assert len(reader.prototypes("default", MODEL).labels) == 30
    assert reader.sync_stats.counts() == {"full": 1, "patch": 0}

    writer.add_examples("default", "class-31", rand(2, 131), MODEL)  # a new class
    writer.add_examples("default", "class-03", rand(1, 132), MODEL)  # a changed one
    reset_command_stats(reader_client)
    patched = reader.prototypes("default", MODEL)
    calls = command_calls(reader_client)
    # Two round trips: the generation check, then one script for the two changed classes;
    # the 31 prototypes are not fetched again.
    assert calls["cmdstat_hmget"] == 1 + 2  # the check; the script's state + prototypes HMGETs
    assert calls["cmdstat_evalsha"] == 1
    assert "cmdstat_hgetall" not in calls
    assert reader.sync_stats.counts() == {"full": 1, "patch": 1}
    assert len(patched.labels) == 31
    expected = unit_mean(np.concatenate([rand(1, 103), rand(1, 132)]))
    np.testing.assert_allclose(patched.matrix[patched.labels.index("class-03")], expected, atol=1e-6)
    assert_matches_a_fresh_replica(reader, reader_client)


def test_deleted_classes_and_examples_reach_a_replica_incrementally(
    two_replicas: tuple[Registry, Registry, RedisClient],
) -> None:
    writer, reader, reader_client = two_replicas
    cats = writer.add_examples("default", "cat", rand(3, 20), MODEL)
    writer.add_examples("default", "dog", rand(2, 21), MODEL)
    writer.add_examples("default", "emu", rand(2, 22), MODEL)
    assert reader.prototypes("default", MODEL).labels == ["cat", "dog", "emu"]

    writer.delete_class("default", "dog")
    writer.delete_example("default", "cat", cats.added_example_ids[0])
    patched = reader.prototypes("default", MODEL)
    assert patched.labels == ["cat", "emu"]
    np.testing.assert_allclose(patched.matrix[0], unit_mean(rand(3, 20)[1:]), atol=1e-6)
    assert reader.sync_stats.counts() == {"full": 1, "patch": 1}
    assert_matches_a_fresh_replica(reader, reader_client)

    # The last class goes: the namespace is empty again, then a new class comes back.
    writer.delete_class("default", "cat")
    writer.delete_class("default", "emu")
    with pytest.raises(FailedPrecondition, match="no classes yet"):
        reader.prototypes("default", MODEL)
    writer.add_examples("default", "fox", rand(1, 23), MODEL)
    assert reader.prototypes("default", MODEL).labels == ["fox"]
    # The empty namespace was refused from its state alone: nothing to fetch, so no sync.
    assert reader.sync_stats.counts() == {"full": 1, "patch": 2}


def test_a_replica_further_behind_than_the_change_log_reloads_in_full(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> None:
    client = connect(redis_url)
    writer, reader = Registry(client, change_log_size=4), Registry(connect(redis_url))
    writer.add_examples("default", "a", rand(1, 30), MODEL)
    reader.prototypes("default", MODEL)
    for i, label in enumerate("bcd"):
        writer.add_examples("default", label, rand(1, 31 + i), MODEL)
    assert reader.prototypes("default", MODEL).labels == ["a", "b", "c", "d"]
    assert reader.sync_stats.counts() == {"full": 1, "patch": 1}  # 3 changes: the log still reaches back

    for i, label in enumerate("efghij"):  # 6 more changed classes: the log keeps the last 4
        writer.add_examples("default", label, rand(1, 40 + i), MODEL)
    assert client.zcard(changes_key(writer)) == 4
    assert reader.prototypes("default", MODEL).labels == list("abcdefghij")
    assert reader.sync_stats.counts() == {"full": 2, "patch": 1}
    writer.add_examples("default", "a", rand(1, 50), MODEL)  # caught up again: patches resume
    assert_matches_a_fresh_replica(reader, client)
    assert reader.sync_stats.counts() == {"full": 2, "patch": 2}


def test_an_unlogged_write_from_an_older_server_forces_a_full_reload(
    two_replicas: tuple[Registry, Registry, RedisClient],
) -> None:
    writer, reader, reader_client = two_replicas
    writer.add_examples("default", "cat", rand(2, 60), MODEL)
    reader.prototypes("default", MODEL)
    # What a replica running the scripts from before the change log does: bump the generation
    # without logging (here: changing a prototype behind the registry's back).
    base = f"{writer.key_prefix}:{{ns:{b'default'.hex()}}}"
    reader_client.hset(
        f"{base}:m:{MODEL.encode().hex()}:prototypes",
        b"cat".hex(),
        rand(1, 61)[0].astype("<f4").tobytes(),
    )
    reader_client.hincrby(f"{base}:state", "generation", 1)
    np.testing.assert_allclose(reader.prototypes("default", MODEL).matrix[0], rand(1, 61)[0], atol=1e-6)
    assert reader.sync_stats.counts() == {"full": 2, "patch": 0}
    # The next logged write starts the log afresh; a replica behind that point still reloads.
    writer.add_examples("default", "dog", rand(1, 62), MODEL)
    assert reader.prototypes("default", MODEL).labels == ["cat", "dog"]
    assert reader.sync_stats.counts() == {"full": 2, "patch": 1}


def test_a_new_epoch_reloads_in_full_and_a_model_without_embeddings_is_refused(
    two_replicas: tuple[Registry, Registry, RedisClient],
) -> None:
    writer, reader, reader_client = two_replicas
    writer.add_examples("default", "cat", rand(2, 70), MODEL)
    reader.prototypes("default", MODEL)
    reader_client.flushall()  # Redis lost everything; the generation restarts at the same number
    writer.add_examples("default", "dog", rand(2, 71), "vit_other-000000000002")
    with pytest.raises(ModelIncompleteError, match="0 of 2 examples embedded"):
        reader.prototypes("default", MODEL)
    assert reader.sync_stats.counts() == {"full": 1, "patch": 0}  # refused from the state alone
    assert reader.prototypes("default").labels == ["dog"]  # the namespace's only model
    assert reader.sync_stats.counts() == {"full": 2, "patch": 0}


def test_concurrent_readers_and_writers_end_at_the_state_of_a_fresh_replica(
    two_replicas: tuple[Registry, Registry, RedisClient],
) -> None:
    writer, reader, reader_client = two_replicas
    writer.add_examples("default", "seed", rand(1, 80), MODEL)

    def write(i: int) -> None:
        label = f"c{i % 7}"
        if i % 5 == 4:
            try:
                writer.delete_class("default", label)
            except NotFound:
                pass
        else:
            writer.add_examples("default", label, rand(1, 200 + i), MODEL)

    def read(_: int) -> None:
        protos = reader.prototypes("default", MODEL)
        assert "seed" in protos.labels
        assert protos.classifier.top_k(rand(1, 0) / np.linalg.norm(rand(1, 0)), 3)[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: write(i) if i % 2 else read(i), range(120)))
    assert_matches_a_fresh_replica(reader, reader_client)
    assert reader.sync_stats.counts()["patch"] > 0


def test_bulk_add_loads_classes_like_single_adds(
    two_replicas: tuple[Registry, Registry, RedisClient],
) -> None:
    writer, reader, _ = two_replicas
    classes = {f"bulk-{i:03d}": rand(1 + i % 3, 300 + i) for i in range(25)}
    writer.add_classes("default", classes, MODEL, chunk=10)
    protos = reader.prototypes("default", MODEL)
    assert protos.labels == sorted(classes)
    for label, vectors in classes.items():
        np.testing.assert_allclose(protos.matrix[protos.labels.index(label)], unit_mean(vectors), atol=1e-6)
    assert writer.get_class("default", "bulk-002").count == 3
    with pytest.raises(FailedPrecondition, match="dimensional embeddings of model"):
        writer.add_classes("default", {"x": rand(1, 1, dim=DIM + 1)}, MODEL)


def test_a_namespace_restarted_by_a_model_of_another_width_reaches_a_replica(
    two_replicas: tuple[Registry, Registry, RedisClient],
) -> None:
    writer, reader, _ = two_replicas
    writer.add_examples("default", "cat", rand(2, 90), MODEL)
    assert reader.prototypes("default", MODEL).matrix.shape == (1, DIM)
    writer.delete_class("default", "cat")  # empty: another model may start the namespace afresh
    other = "vit_wide-000000000003"
    writer.add_examples("default", "dog", rand(1, 91, dim=DIM * 2), other)
    with pytest.raises(ModelIncompleteError, match="0 of 1 examples embedded"):
        reader.prototypes("default", MODEL)
    assert reader.prototypes("default", other).matrix.shape == (1, DIM * 2)
    assert reader.sync_stats.counts()["full"] == 2


# --- namespaces ------------------------------------------------------------------------------------


def _all_keys(client: RedisClient) -> set[str]:
    return {k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match="*")}


def test_namespaces_are_listed_with_counts_and_model(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> None:
    registry = Registry(connect(redis_url))
    assert registry.list_namespaces() == []
    registry.add_examples("team/a", "cat", rand(3, 1), MODEL)
    registry.add_examples("team/a", "dog", rand(2, 2), MODEL)
    registry.add_examples("*", "cat", rand(1, 3), MODEL)
    registry.add_examples("emptied", "cat", rand(1, 4), MODEL)
    registry.delete_class("emptied", "cat")  # its state stays; it holds no classes: not listed
    # Another key prefix on the same server is another registry: not listed here.
    Registry(connect(redis_url), key_prefix="other*").add_examples("elsewhere", "x", rand(1, 5), MODEL)
    listed = [(n.name, n.class_count, n.example_count, n.model_id) for n in registry.list_namespaces()]
    assert listed == [("*", 1, 1, MODEL), ("team/a", 2, 5, MODEL)]


@pytest.mark.parametrize("prefix", ["fewshot", "other*", "a:{b}:c", "[x]?"])
@pytest.mark.parametrize("namespace", ["team/a", "*", "}:state", "é", "ns:{x}"])
def test_the_key_module_parses_the_namespace_back_from_its_state_key(prefix: str, namespace: str) -> None:
    from fewshot_service.registry.keys import NamespaceKeys, namespace_of_state_key

    key = NamespaceKeys(prefix, namespace).state
    assert namespace_of_state_key(prefix, key) == namespace
    assert namespace_of_state_key(prefix, key.encode()) == namespace  # as SCAN returns it
    with pytest.raises(ValueError):
        namespace_of_state_key(prefix + "x", key)  # another registry's key is not parsed as ours


def test_deleting_a_namespace_removes_every_key_and_only_its_own(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> None:
    client = connect(redis_url)
    writer, reader = Registry(client), Registry(connect(redis_url))
    writer.add_examples("keep", "cat", rand(2, 1), MODEL)
    before = _all_keys(client)
    for label in TRICKY_LABELS[:4]:
        writer.add_examples("gone", label, rand(2, 2), MODEL)
    assert reader.prototypes("gone", MODEL).labels == sorted(TRICKY_LABELS[:4])  # reader caches it

    deleted = writer.delete_namespace("gone")
    assert (deleted.class_count, deleted.example_count) == (4, 8)
    assert _all_keys(client) == before  # every key of "gone", its state too, and nothing else
    with pytest.raises(FailedPrecondition, match="no classes"):
        reader.prototypes("gone", MODEL)  # the other replica dropped its cached copy
    assert reader.prototypes("keep", MODEL).labels == ["cat"]
    with pytest.raises(NotFound):
        writer.delete_namespace("gone")

    # A new start is a new epoch: the reader sees only the new class, with fresh example ids.
    added = writer.add_examples("gone", "new", rand(1, 3), MODEL)
    assert added.added_example_ids == ["1"]
    assert reader.prototypes("gone", MODEL).labels == ["new"]


def test_namespace_deletion_refuses_a_class_list_that_is_out_of_date(
    redis_url: str, connect: Callable[[str], RedisClient]
) -> None:
    # What a class added between delete_namespace's read and its script looks like to the script:
    # it must refuse (the registry then reads again) rather than leave that class's examples behind.
    client = connect(redis_url)
    registry = Registry(client)
    registry.add_examples("ns", "cat", rand(1, 1), MODEL)
    registry.add_examples("ns", "dog", rand(1, 2), MODEL)
    keys, mk = registry.keys("ns"), registry.keys("ns").model(MODEL)
    stale = [
        keys.state,
        keys.counts,
        keys.models,
        keys.changes,
        keys.images("cat"),
        mk.counts,
        mk.prototypes,
        mk.sums,
        mk.lease,
        mk.backfill,
        mk.examples("cat"),
    ]
    with pytest.raises(redis.exceptions.ResponseError, match="CHANGED"):
        registry.store.scripts.delete_namespace(keys=stale, args=[1, b"cat".hex(), MODEL])
    assert [c.label for c in registry.list_classes("ns")] == ["cat", "dog"]  # nothing deleted
    assert registry.delete_namespace("ns").class_count == 2


def test_class_pages_follow_label_order_for_any_unicode_and_read_one_page_of_counts(
    redis_client: RedisClient,
) -> None:
    registry = Registry(redis_client, key_prefix="pages")
    labels = ["b", "a", "A", "é", "e", "z", "ß", "日本", "😀", "a b", "a/b", "ab"] + [
        f"n{i:03d}" for i in range(30)
    ]
    rng = np.random.default_rng(0)
    registry.add_classes("ns", {label: rng.standard_normal((1 + len(label) % 3, 4)) for label in labels}, "m")
    seen, after = [], None
    while True:
        page, after = registry.class_page("ns", after, 5)
        assert len(page) <= 5
        seen += page
        if after is None:
            break
    assert [s.label for s in seen] == sorted(labels)  # Python's order (code points) = the hex fields' order
    assert seen == registry.list_classes("ns")  # counts included
    assert registry.class_page("ns", "😀", 5) == ([], None)
    assert registry.class_page("empty", None, 5) == ([], None)
