"""deploy/grafana and deploy/prometheus watch what the server really exports: every metric and label
their PromQL names is on a live server's /metrics, the rules pass promtool (syntax and unit tests),
and the dashboard is importable anywhere (datasource variable, a query in every panel)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fewshot_client import FewShotClient
from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import REPO_ROOT, stack_settings

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "fewshot-dashboard.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "fewshot-alerts.yml"
ALERT_TESTS = REPO_ROOT / "deploy" / "prometheus" / "fewshot-alerts.test.yml"

# Labels Prometheus adds to every scraped series, and the series it makes itself per target.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC_SERIES = {"up": TARGET_LABELS}
# Grafana's variables, replaced by values of their kind so that the expressions parse as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$job": "fewshot", "$instance": ".*"}
KEY = "monitoring-key-1"
Exposed = dict[str, "set[str] | None"]  # sample name -> its label names; None: declared, no series
# Counters the files use whose events a short test cannot bring about reliably (every gRPC call
# slot taken; a caller gone mid-decode): /metrics declares them (HELP/TYPE) with no series yet, so
# their names are checked and their labels cannot be. Keep this list short.
DECLARED_ONLY = {
    "fewshot_grpc_busy_refusals_total",
    "fewshot_cancelled_requests_total",
    "fewshot_rate_limited_total",  # refusals of a rate-limited key: this server has no limits set
}


# --- PromQL: which series and labels an expression needs ----------------------------------------


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


class Needs:
    """What one expression needs of the exposition: metric names, and per use of a label
    (matcher, ``by``, ``on``, ``group_left``) the metrics it must be found on."""

    def __init__(self, exposed: Exposed) -> None:
        self.exposed = exposed
        self.missing: list[str] = []

    def labels(self, node: object) -> frozenset[str] | None:
        """The label names the result of ``node`` carries (None: a scalar or a string)."""
        kind = type(node).__name__
        if kind == "VectorSelector":
            name = node.name  # type: ignore[attr-defined]
            if name not in self.exposed:
                self.missing.append(f"metric {name}")
                return TARGET_LABELS
            if self.exposed[name] is None:  # declared, no series: labels unknown
                if name not in DECLARED_ONLY:
                    self.missing.append(f"series of {name} (make the test's requests create them)")
                return None
            have = frozenset(self.exposed[name]) | TARGET_LABELS
            for matcher in node.matchers.matchers:  # type: ignore[attr-defined]
                self._need({matcher.name}, have, f"{{{matcher.name}=...}} on {name}")
            return have
        if kind == "MatrixSelector":
            return self.labels(node.vector_selector)  # type: ignore[attr-defined]
        if kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
            return self.labels(node.expr)  # type: ignore[attr-defined]
        if kind == "Call":
            func = node.func.name  # type: ignore[attr-defined]
            vectors = [x for x in (self.labels(a) for a in node.args) if x is not None]  # type: ignore[attr-defined]
            inner = vectors[0] if vectors else None
            if func == "histogram_quantile" and inner is not None:
                self._need({"le"}, inner, "le of histogram_quantile (a _bucket series)")
                return inner - {"le"}
            return inner
        if kind == "AggregateExpr":
            inner = self.labels(node.expr)  # type: ignore[attr-defined]
            if node.param is not None:  # type: ignore[attr-defined]
                self.labels(node.param)  # type: ignore[attr-defined]
            modifier = node.modifier  # type: ignore[attr-defined]
            if modifier is None or inner is None:
                return frozenset()
            named = frozenset(modifier.labels)
            if "Without" in str(modifier.type):
                return inner - named
            self._need(named, inner, f"by ({', '.join(sorted(named))})")
            return named
        if kind == "BinaryExpr":
            lhs, rhs = self.labels(node.lhs), self.labels(node.rhs)  # type: ignore[attr-defined]
            if lhs is None or rhs is None:
                return lhs if rhs is None else rhs
            modifier = node.modifier  # type: ignore[attr-defined]
            matching = modifier.matching if modifier is not None else None
            if matching is not None and matching.labels and "Include" in str(matching.type):  # on (...)
                on = frozenset(matching.labels)
                self._need(on, lhs, f"on ({', '.join(sorted(on))}), left side")
                self._need(on, rhs, f"on ({', '.join(sorted(on))}), right side")
            if modifier is not None and modifier.card is not None and modifier.group_labels:
                extra = frozenset(modifier.group_labels)
                left = "OneToMany" not in str(
                    modifier.card
                )  # group_left: the extra labels come from the right
                self._need(extra, rhs if left else lhs, f"group labels {sorted(extra)}")
                return (lhs if left else rhs) | extra
            return lhs
        return None  # NumberLiteral, StringLiteral

    def _need(self, wanted: set[str] | frozenset[str], have: frozenset[str], where: str) -> None:
        for label in sorted(set(wanted) - have):
            self.missing.append(f"label {label!r} ({where})")


def missing_in(expr: str, exposed: Exposed) -> list[str]:
    needs = Needs(exposed)
    needs.labels(promql_parser.parse(expr))
    return needs.missing


# --- the files ----------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """Every panel, those inside collapsed rows included; rows themselves are no panels."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def dashboard_expressions() -> list[str]:
    exprs = [grafana_to_promql(t["expr"]) for p in dashboard_panels() for t in p["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # label_values(selector, label): the selector must exist
            definition = grafana_to_promql(variable["definition"])
            selector, _, label = definition.removeprefix("label_values(").removesuffix(")").rpartition(",")
            exprs.append(f"count by ({label.strip()}) ({selector})")
    return exprs


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# --- a live server's exposition -----------------------------------------------------------------


@pytest.fixture(scope="module")
def exposed(tiny_model_path: Path, private_redis, tmp_path_factory: pytest.TempPathFactory) -> Exposed:
    """Sample name -> label names on /metrics of a keyed server after requests of every kind."""
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    key_file.write_text(f'[[keys]]\nname = "ops"\nsha256 = "{digest}"\nrole = "write"\nnamespaces = ["*"]\n')
    settings = stack_settings(
        tiny_model_path, private_redis.url, redis_key_prefix="monitoring", api_keys=key_file
    )
    red, green = samples.solid_png((200, 30, 30)), samples.solid_png((30, 200, 30))
    with ServerStack(settings) as stack:
        url = f"http://127.0.0.1:{stack.http_port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            assert (
                http.post(
                    "/v1/classes/red/examples", files=[("files", ("r.png", red, "image/png"))]
                ).status_code
                == 201
            )
            assert (
                http.post(
                    "/v1/classes/green/examples", files=[("files", ("g.png", green, "image/png"))]
                ).status_code
                == 201
            )
            assert http.post("/v1/embed", files=[("files", ("r.png", red, "image/png"))]).status_code == 200
            assert (
                http.post("/v1/classify", files=[("files", ("g.png", green, "image/png"))]).status_code == 200
            )
            assert http.get("/v1/classes").status_code == 200
            assert http.get("/readyz").status_code == 200
            refused = http.post("/v1/embed", files=[("files", ("x.gif", b"GIF89a" + bytes(64), "image/gif"))])
            assert refused.status_code in (415, 422), refused.text  # a refused upload
            assert httpx.get(f"{url}/v1/classes", timeout=60).status_code == 401  # no key
            with FewShotClient(f"127.0.0.1:{stack.grpc_port}", api_key=KEY) as client:
                assert client.embed([red]).shape[0] == 1
                assert client.classify([red])[0][0].label == "red"
                with pytest.raises(grpc.RpcError) as bad:
                    client.embed([b"not an image"])
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:  # bytes no protobuf parses
                embed = channel.unary_unary("/fewshot.v1.FewShot/Embed")
                with pytest.raises(grpc.RpcError) as undecodable:
                    embed(b"\xff\xff\xff", metadata=[("authorization", f"Bearer {KEY}")], timeout=60)
                assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            text = http.get("/metrics").text
    labels: Exposed = {}
    for family in text_string_to_metric_families(text):
        if not family.samples:  # declared, no series yet: the parser drops a counter's _total
            labels[family.name + ("_total" if family.type == "counter" else "")] = None
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)  # type: ignore[union-attr]
    return {**labels, **SYNTHETIC_SERIES}


def test_every_metric_and_label_of_the_dashboard_is_on_metrics(exposed: Exposed) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 30
    missing = {expr: m for expr in expressions if (m := missing_in(expr, exposed))}
    assert missing == {}


def test_every_metric_and_label_of_the_alert_rules_is_on_metrics(exposed: Exposed) -> None:
    missing = {rule["alert"]: m for rule in alert_rules() if (m := missing_in(rule["expr"], exposed))}
    assert missing == {}


def test_the_check_finds_a_misspelt_metric_or_label(exposed: Exposed) -> None:
    """The two tests above can fail: a name that is not exported, or a label a series lacks."""
    assert missing_in('rate(fewshot_http_request_total{job="x"}[5m])', exposed) == [
        "metric fewshot_http_request_total"
    ]
    assert missing_in("sum by (route) (rate(fewshot_grpc_requests_total[5m]))", exposed) == [
        "label 'route' (by (route))"
    ]
    assert missing_in('fewshot_images_total{stage="x"}', exposed) == [
        "label 'stage' ({stage=...} on fewshot_images_total)"
    ]
    # histogram_quantile needs the _bucket series (le), not the histogram's base name.
    assert missing_in(
        "histogram_quantile(0.99, sum by (le) (rate(fewshot_queue_seconds_count[5m])))", exposed
    ) == ["label 'le' (by (le))"]
    assert missing_in(
        "histogram_quantile(0.99, sum by (instance) (rate(fewshot_queue_seconds_bucket[5m])))", exposed
    ) == ["label 'le' (le of histogram_quantile (a _bucket series))"]
    assert missing_in("histogram_quantile(0.99, rate(fewshot_queue_seconds[5m]))", exposed) == [
        "metric fewshot_queue_seconds",
        "label 'le' (le of histogram_quantile (a _bucket series))",
    ]
    # A counter the test's requests left without series is reported, unless it is listed.
    assert missing_in("fewshot_grpc_busy_refusals_total", {"fewshot_grpc_busy_refusals_total": None}) == []
    assert missing_in("fewshot_auth_decisions_total", {"fewshot_auth_decisions_total": None}) == [
        "series of fewshot_auth_decisions_total (make the test's requests create them)"
    ]
    assert (
        missing_in("histogram_quantile(0.99, sum by (le) (rate(fewshot_queue_seconds_bucket[5m])))", exposed)
        == []
    )


def test_only_the_listed_counters_lack_series_after_the_requests(exposed: Exposed) -> None:
    """Every other series the files name exists with its labels: the label checks covered them.
    (Earlier tests in the same process may have made series of the listed ones: the registry is global.)"""
    assert {name for name, labels in exposed.items() if labels is None} <= DECLARED_ONLY


def test_process_metrics_the_files_use_come_from_the_default_collector(exposed: Exposed) -> None:
    # prometheus-client's process collector exists on Linux only (it reads /proc): the image is Linux.
    used = {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    }
    assert used <= exposed.keys()


# --- promtool -------------------------------------------------------------------------------------


def promtool() -> str:
    """promtool's path. .ci/run installs Debian's prometheus package and sets
    FEWSHOT_REQUIRE_PROMTOOL, so there a missing promtool fails the test; elsewhere it skips."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("FEWSHOT_REQUIRE_PROMTOOL") or os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs it (apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); CI runs this check")
    return found


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERT_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_severity_a_duration_and_both_annotations() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) >= 9
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["for"], rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert "redis://" not in json.dumps(rule), rule["alert"]  # no address in what pages people


# --- the dashboard ----------------------------------------------------------------------------------


def test_dashboard_queries_the_datasource_variable_in_every_panel() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    variable_ref = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = dashboard_panels()
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"] == variable_ref, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == variable_ref and target["expr"].strip(), panel["title"]
    # No datasource of somebody's instance: every uid in the file is the variable.
    uids = set(_values_of("uid", board)) - {board["uid"]}
    assert uids == {"${DS_PROMETHEUS}"}


def _values_of(key: str, node: object) -> Iterator[object]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values_of(key, v)
    elif isinstance(node, list):
        for item in node:
            yield from _values_of(key, item)


def test_dashboard_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        here = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not here & cells, panel["title"]
        cells |= here
