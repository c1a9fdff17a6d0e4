"""Every test has exactly one kind (unit, redis, live, browser), so `pytest -m unit` is a quick loop
that needs no Redis, no server and no browser (tests/conftest.py sets the kinds)."""

from __future__ import annotations

import pytest

from conftest import TEST_KINDS


def _kinds(item: pytest.Item) -> list[str]:
    return [kind for kind in TEST_KINDS if item.get_closest_marker(kind) is not None]


def test_every_collected_test_has_exactly_one_kind(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    assert all(len(_kinds(item)) == 1 for item in items), [
        item.nodeid for item in items if len(_kinds(item)) != 1
    ]
    by_id = {item.nodeid.split("[")[0]: _kinds(item)[0] for item in items}
    anchors = {  # one test of each kind, where this run collected it
        "tests/test_playground.py::test_playground_shows_an_api_error_clearly": "browser",
        "tests/test_e2e.py::test_redis_down_is_503_and_unavailable_then_recovers_by_itself": "live",
        "tests/test_registry.py::test_add_get_list_and_prototype_is_mean_of_normalised": "redis",
        "tests/test_classifier.py::test_scores_are_cosine_to_the_renormalised_prototype": "unit",
    }
    for node, kind in anchors.items():
        if node in by_id:
            assert by_id[node] == kind, (node, by_id[node])
    # A unit test must not reach Redis: none of them asks for a Redis fixture.
    redis_fixtures = {"private_redis", "redis_url", "redis_client", "redis_cluster", "cluster_url"}
    assert not [
        item.nodeid
        for item in items
        if _kinds(item) == ["unit"] and redis_fixtures & set(getattr(item, "fixturenames", ()))
    ]
