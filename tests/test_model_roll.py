"""Model rolls at the registry level: per-model embeddings beside stored images, backfill from them
(on demand and in background passes under a Redis lease), deletion races, the --no-store-images
opt-out, dropping a model, and namespaces written in the layout before per-model keys.

Real parts: a private Redis server and a real 3-master Redis Cluster (every script must touch
only keys in its namespace's slot), and two real exported ONNX models as the two model ids.
The servers end to end are in test_model_roll_e2e.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from redis.cluster import RedisCluster

from fewshot_common.embedder import Embedder
from fewshot_service.core.backfill import Backfiller, FillResult
from fewshot_service.registry.model_store import ModelStore
from fewshot_service.registry.redis_client import RedisClient, connect_redis
from fewshot_service.registry.registry import ModelIncompleteError, Registry

import image_samples as samples

NS = "roll/🐱"
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 30, 220)}


def shots(colour: str, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    rgb = COLOURS[colour]
    return [
        samples.solid_png(tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in rgb))
        for _ in range(n)
    ]


def unit_mean(vectors: np.ndarray) -> np.ndarray:
    v = vectors.astype(np.float64)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(axis=0)


@pytest.fixture(params=["server", "cluster"])
def client(request: pytest.FixtureRequest) -> Iterator[RedisClient]:
    url = request.getfixturevalue("cluster_url" if request.param == "cluster" else "redis_url")
    opened = connect_redis(url, cluster=request.param == "cluster")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def model_a(tiny_model_path: Path) -> Embedder:
    return Embedder(tiny_model_path, intra_op_threads=1)


@pytest.fixture(scope="module")
def model_b(other_model_path: Path) -> Embedder:
    return Embedder(other_model_path, intra_op_threads=1)


@pytest.fixture
def registry(client: RedisClient) -> Registry:
    return Registry(client, key_prefix="roll")


def backfiller(registry: Registry, model: Embedder, **options: int) -> Backfiller:
    """A replica of ``model``: its own registry client view, embedding with the real model."""
    return Backfiller(
        ModelStore(registry), model.model_id, lambda images, _cancel: model.embed_images(images), **options
    )


def add(
    registry: Registry, model: Embedder, label: str, images: list[bytes], store: bool = True
) -> list[str]:
    info = registry.add_examples(
        NS, label, model.embed_images(images), model.model_id, images if store else None
    )
    return info.added_example_ids


def all_keys(client: RedisClient) -> set[str]:
    keys = client.scan_iter(match="roll:*", count=1000)
    return {k.decode() if isinstance(k, bytes) else k for k in keys}


def test_a_second_model_is_backfilled_from_stored_images_and_both_keep_their_prototypes(
    registry: Registry, model_a: Embedder, model_b: Embedder
) -> None:
    reds, greens = shots("red", 6, 1), shots("green", 5, 2)
    add(registry, model_a, "red", reds)
    add(registry, model_a, "green", greens)
    before_a = registry.prototypes(NS, model_a.model_id).matrix.copy()
    with pytest.raises(
        ModelIncompleteError, match=f"0 of 11 examples embedded for model '{model_b.model_id}'"
    ):
        registry.prototypes(NS, model_b.model_id)

    replica_b = backfiller(registry, model_b, batch_size=4)
    assert replica_b.backfill(NS) == FillResult(filled=11, without_image=0)
    protos_b = registry.prototypes(NS, model_b.model_id)
    assert protos_b.labels == ["green", "red"]
    np.testing.assert_allclose(protos_b.matrix[1], unit_mean(model_b.embed_images(reds)), atol=1e-5)
    np.testing.assert_allclose(registry.prototypes(NS, model_a.model_id).matrix, before_a, atol=1e-6)
    [listed] = registry.list_namespaces()
    assert (listed.class_count, listed.example_count) == (2, 11)
    assert {(m.model_id, m.embedded, m.complete) for m in listed.models} == {
        (model_a.model_id, 11, True),
        (model_b.model_id, 11, True),
    }
    # A second pass finds nothing to do; an example added on B is then missing only for A,
    # and A's replica fills it on demand.
    assert replica_b.backfill(NS) == FillResult(0, 0)
    add(registry, model_b, "blue", shots("blue", 2, 3))
    replica_a = backfiller(registry, model_a)
    assert replica_a.fill_on_demand(NS) == FillResult(filled=2, without_image=0)
    assert registry.prototypes(NS, model_a.model_id).labels == ["blue", "green", "red"]
    assert registry.prototypes(NS, model_b.model_id).labels == ["blue", "green", "red"]


def test_on_demand_fill_is_for_a_few_examples_only(
    registry: Registry, model_a: Embedder, model_b: Embedder
) -> None:
    add(registry, model_a, "red", shots("red", 5, 4))
    assert backfiller(registry, model_b, on_demand_limit=4).fill_on_demand(NS) is None  # 5 > 4
    assert registry.status(NS, model_b.model_id).embedded == 0
    assert backfiller(registry, model_b, on_demand_limit=5).fill_on_demand(NS) == FillResult(5, 0)


def test_the_backfill_lease_is_exclusive_renewable_only_by_its_holder_and_expires(
    registry: Registry, model_a: Embedder, model_b: Embedder
) -> None:
    add(registry, model_a, "red", shots("red", 3, 5))
    store, model = ModelStore(registry), model_b.model_id
    assert store.try_lease(NS, model, "replica-1", 200)
    assert not store.try_lease(NS, model, "replica-2", 200)
    # Another replica of the same model finds the lease held: it does nothing.
    assert backfiller(registry, model_b).backfill(NS) is None
    assert registry.status(NS, model).embedded == 0
    # Another model's lease is another key.
    assert store.try_lease(NS, model_a.model_id, "replica-3", 200)
    assert not store.renew_lease(NS, model, "replica-2", 200)
    assert not store.release_lease(NS, model, "replica-2")
    assert store.lease_holder(NS, model) == "replica-1"
    time.sleep(0.3)  # replica-1 died: its lease expires and another replica takes over
    assert store.lease_holder(NS, model) is None
    assert backfiller(registry, model_b).backfill(NS) == FillResult(3, 0)
    assert store.lease_holder(NS, model) is None  # released at the end
    assert not store.renew_lease(NS, model, "replica-1", 200)  # the old holder cannot extend it


def test_a_pass_stops_when_its_lease_is_taken_over(
    registry: Registry, model_a: Embedder, model_b: Embedder
) -> None:
    add(registry, model_a, "red", shots("red", 6, 6))
    store = ModelStore(registry)
    replica = backfiller(registry, model_b, batch_size=2)
    real_fill = store.fill

    def fill_then_lose_the_lease(*args: object) -> int:
        written = real_fill(*args)  # type: ignore[arg-type]
        # What an expired lease taken by another replica looks like to this one.
        registry.client.set(registry.keys(NS).model(model_b.model_id).lease, "someone-else")
        return written

    replica.store.fill = fill_then_lose_the_lease  # type: ignore[method-assign]
    assert replica.backfill(NS) == FillResult(2, 0)  # one batch, then it noticed and stopped
    assert store.lease_holder(NS, model_b.model_id) == "someone-else"  # not released by it


def test_fills_skip_examples_deleted_meanwhile_and_other_epochs(
    registry: Registry, model_a: Embedder, model_b: Embedder, client: RedisClient
) -> None:
    images = shots("red", 3, 7)
    ids = add(registry, model_a, "red", images)
    store = ModelStore(registry)
    missing = store.missing(NS, model_b.model_id)
    assert [e.example_id for e in missing.examples] == ids
    vectors = model_b.embed_images(images)
    registry.delete_example(NS, "red", ids[0])  # deleted between the read and the write
    assert store.fill(NS, model_b.model_id, missing.epoch, missing.examples, vectors) == 2
    np.testing.assert_allclose(
        registry.prototypes(NS, model_b.model_id).matrix[0], unit_mean(vectors[1:]), atol=1e-5
    )
    # A second write of the same examples (another request filled them first) changes nothing.
    assert store.fill(NS, model_b.model_id, missing.epoch, missing.examples, vectors) == 0
    assert registry.status(NS, model_b.model_id).embedded == 2

    # The namespace deleted and started again: the same ids are other examples now.
    registry.delete_namespace(NS)
    again = add(registry, model_a, "red", images)
    assert again == ids  # ids restart with the new epoch
    assert store.fill(NS, model_b.model_id, missing.epoch, missing.examples, vectors) == 0
    assert registry.status(NS, model_b.model_id).embedded == 0


def test_deleting_examples_classes_and_the_namespace_removes_every_model_s_keys(
    registry: Registry, model_a: Embedder, model_b: Embedder, client: RedisClient
) -> None:
    add(registry, model_a, "keep", shots("green", 1, 8))
    untouched = all_keys(client)
    NSX = "other"
    ids = registry.add_examples(
        NSX, "red", model_a.embed_images(shots("red", 3, 9)), model_a.model_id, shots("red", 3, 9)
    ).added_example_ids
    registry.add_examples(
        NSX, "green", model_b.embed_images(shots("green", 2, 10)), model_b.model_id, shots("green", 2, 10)
    )
    assert backfiller(registry, model_b).backfill(NSX) == FillResult(3, 0)
    # An example embedded by both models goes from both, its class's sums staying exact.
    registry.delete_example(NSX, "red", ids[0])
    for model in (model_a, model_b):
        snapshot = registry.example_snapshot(NSX, model_id=model.model_id, only_labels=["red"])
        np.testing.assert_allclose(
            snapshot.means[snapshot.labels.index("red")],
            unit_mean(model.embed_images(shots("red", 3, 9))[1:]),
            atol=1e-5,
        )
    assert registry.status(NSX, model_a.model_id).embedded == 2  # green is B's only: A lacks it
    registry.delete_class(NSX, "red")
    assert not any(
        f":img:{b'red'.hex()}" in k or k.endswith(f":ex:{b'red'.hex()}")
        for k in all_keys(client)
    )
    assert registry.status(NSX, model_b.model_id).embedded == 2
    deleted = registry.delete_namespace(NSX)
    assert (deleted.class_count, deleted.example_count) == (1, 2)
    assert all_keys(client) == untouched


def test_without_stored_images_another_model_can_only_report_them(
    registry: Registry, model_a: Embedder, model_b: Embedder
) -> None:
    add(registry, model_a, "red", shots("red", 3, 11), store=False)
    add(registry, model_a, "green", shots("green", 2, 12))
    replica = backfiller(registry, model_b)
    assert replica.backfill(NS) == FillResult(filled=2, without_image=3)
    record = replica.store.last_record(NS, model_b.model_id)
    assert record is not None and record.without_image == 3
    with pytest.raises(ModelIncompleteError, match="2 of 5"):
        registry.prototypes(NS, model_b.model_id)
    assert registry.prototypes(NS, model_a.model_id).labels == ["green", "red"]  # A as before


def test_dropping_a_model_forgets_only_its_embeddings(
    registry: Registry, model_a: Embedder, model_b: Embedder, client: RedisClient
) -> None:
    add(registry, model_a, "red", shots("red", 3, 13))
    before = all_keys(client)
    assert backfiller(registry, model_b).backfill(NS) == FillResult(3, 0)
    reader = Registry(client, key_prefix="roll")
    reader.prototypes(NS, model_a.model_id)  # a replica of A caches its matrix
    generation = registry.generation(NS)

    assert ModelStore(registry).drop(NS, model_b.model_id) == 3
    assert all_keys(client) == before  # B's keys gone (its backfill record too), A's intact
    assert [m.model_id for m in registry.list_namespaces()[0].models] == [model_a.model_id]
    assert registry.generation(NS) > generation  # every replica reloads once
    assert reader.prototypes(NS, model_a.model_id).labels == ["red"]
    assert reader.sync_stats.counts() == {"full": 2, "patch": 0}
    assert ModelStore(registry).drop(NS, model_b.model_id) == 0  # nothing left to drop
    # B can come back: its embeddings are computed again from the stored images.
    assert backfiller(registry, model_b).backfill(NS) == FillResult(3, 0)


def test_a_stopped_backfill_ends_after_its_batch_and_releases_its_lease(
    registry: Registry, model_a: Embedder, model_b: Embedder
) -> None:
    add(registry, model_a, "red", shots("red", 6, 18))
    batches: list[int] = []

    def embed_then_shut_down(images: list[bytes], _cancel: object) -> np.ndarray:
        batches.append(len(images))
        replica.stop(wait=False)  # what the server's shutdown does while a batch runs
        return model_b.embed_images(images)

    replica = Backfiller(ModelStore(registry), model_b.model_id, embed_then_shut_down, batch_size=2)
    assert replica.backfill(NS) == FillResult(2, 0)  # the batch in progress is written, no more
    assert batches == [2]
    assert replica.store.lease_holder(NS, model_b.model_id) is None
    replica.request(NS)  # a stopped backfiller takes no more work
    assert not replica.pending(NS)


# -- the layout before per-model keys ------------------------------------------------------------


def write_legacy_namespace(
    client: RedisClient, namespace: str, model_id: str, classes: dict[str, np.ndarray]
) -> None:
    """What the scripts before per-model keys left in Redis (see git history of registry.py)."""
    base = f"roll:{{ns:{namespace.encode().hex()}}}"
    dim = next(iter(classes.values())).shape[1]
    client.hset(f"{base}:model", mapping={"model_id": model_id, "dim": dim})
    next_id = 0
    for label, vectors in classes.items():
        field = label.encode().hex()
        for row in vectors:
            next_id += 1
            client.hset(f"{base}:ex:{field}", str(next_id), row.astype("<f4").tobytes())
        client.hset(f"{base}:counts", field, len(vectors))
        client.hset(f"{base}:prototypes", field, unit_mean(vectors).astype("<f4").tobytes())
    client.hset(
        f"{base}:state",
        mapping={
            "epoch": uuid.uuid4().hex,
            "generation": len(classes),
            "next_example_id": next_id,
            "logged": len(classes),
        },
    )


def test_a_namespace_of_the_old_layout_keeps_classifying_on_its_model_and_is_migrated_once(
    registry: Registry, model_a: Embedder, model_b: Embedder, client: RedisClient
) -> None:
    reds, greens = model_a.embed_images(shots("red", 3, 14)), model_a.embed_images(shots("green", 2, 15))
    write_legacy_namespace(client, NS, model_a.model_id, {"red": reds, "green": greens})
    protos = registry.prototypes(NS, model_a.model_id)  # first touch: migrated, nothing lost
    assert protos.labels == ["green", "red"]
    np.testing.assert_allclose(protos.matrix[1], unit_mean(reds), atol=1e-5)
    assert not {k for k in all_keys(client) if k.endswith((":model", "}:prototypes", "}:sums"))}
    assert registry.get_class(NS, "red").example_ids == ["1", "2", "3"]
    [listed] = registry.list_namespaces()
    assert [(m.model_id, m.embedded, m.complete) for m in listed.models] == [(model_a.model_id, 5, True)]
    # Another model cannot embed them (no images were ever stored): it says so.
    assert backfiller(registry, model_b).backfill(NS) == FillResult(0, 5)
    # Writes work on the migrated namespace; the running sums carry on exactly.
    new = add(registry, model_a, "red", shots("red", 1, 16))
    assert new == ["6"]
    registry.delete_example(NS, "red", "1")
    expected = unit_mean(np.concatenate([reds[1:], model_a.embed_images(shots("red", 1, 16))]))
    np.testing.assert_allclose(registry.prototypes(NS, model_a.model_id).matrix[1], expected, atol=1e-5)
    assert backfiller(registry, model_b).fill_on_demand(NS) == FillResult(1, 4)  # the new one has an image


def test_every_operation_migrates_an_old_namespace_first(
    registry: Registry, model_a: Embedder, client: RedisClient
) -> None:
    operations: list[Callable[[Registry], object]] = [
        lambda r: r.delete_class(NS, "red"),
        lambda r: r.delete_example(NS, "red", "1"),
        lambda r: r.add_examples(NS, "red", model_a.embed_images(shots("red", 1, 1)), model_a.model_id),
        lambda r: r.delete_namespace(NS),
        lambda r: r.list_namespaces(),
        lambda r: r.get_class(NS, "red"),
    ]
    for operation in operations:
        client.flushall() if not isinstance(client, RedisCluster) else client.flushall(
            target_nodes=RedisCluster.PRIMARIES
        )
        write_legacy_namespace(
            client, NS, model_a.model_id, {"red": model_a.embed_images(shots("red", 2, 17))}
        )
        operation(Registry(client, key_prefix="roll"))  # a fresh replica: nothing cached
        assert not [k for k in all_keys(client) if k.endswith(":model") or "}:ex:" in k]
