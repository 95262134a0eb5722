"""The metric names the dashboard queries and docs/metrics.md lists are the ones a real
gateway exports.

A module-scoped gateway (in-process, ONNX Runtime, the default repository) answers a few
requests — one of them invalid, so an error outcome exists — and its metrics port is scraped
once. Every PromQL expression of deploy/grafana/cnnserve.json (panel targets and template
variable queries) is parsed with a real PromQL parser (promql-parser, the Rust parser's
bindings); each metric it selects must be a sample name of the scrape, and each label it
matches, groups or joins on must be on that metric's samples, or be one Prometheus adds to
every target (``job``, ``instance``). A renamed metric or label fails here, not on a
dashboard that silently shows "No data".
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.gateway.metrics import GatewayMetrics
from tests.gateway.harness import (
    digit_pixels,
    gateway_settings,
    labels_request_json,
    running_gateway,
)
from tests.gateway.nvml import fake_nvml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "cnnserve.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
#: Labels Prometheus attaches to every sample of a target.
TARGET_LABELS = {"job", "instance"}
#: What Grafana puts in place of its variables before the query reaches Prometheus.
RANGE_VARIABLES = re.compile(r"\$__(rate_)?interval|\$__range")
VARIABLE = re.compile(r"\$\{?\w+\}?")
LABEL_VALUES = re.compile(r"label_values\((?:(?P<selector>.*),\s*)?(?P<label>\w+)\)")

Families = dict[str, Any]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def scrape(model_repository: Path) -> AsyncIterator[str]:
    """The metrics text of a gateway that has answered a batch and rejected a request."""
    async with (
        running_gateway(gateway_settings(model_repository)) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        pixels, _ = digit_pixels([0, 1, 2])
        reply = await http.post("/v2/models/convnet/infer", json=labels_request_json(pixels))
        assert reply.status_code == 200, reply.text
        reply = await http.post("/v2/models/convnet/infer", json={"inputs": []})
        assert reply.status_code == 400, reply.text
        metrics = await http.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    metrics.raise_for_status()
    yield metrics.text


def sample_labels(text: str) -> dict[str, set[str]]:
    """Sample name → the label names its samples carry."""
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    return labels


def walk(node: Any) -> Iterator[tuple[str | None, set[str]]]:
    """(metric name or None, label names) for each selector and each grouping of a parsed
    PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node.name, {m.name for m in node.matchers.matchers if m.name != "__name__"}
        return
    if isinstance(node, promql_parser.MatrixSelector):
        yield from walk(node.vector_selector)
        return
    if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
        yield None, set(node.modifier.labels)
    binary = isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None
    if binary and node.modifier.matching is not None:
        yield None, set(node.modifier.matching.labels)
    for child in ("expr", "param", "lhs", "rhs"):
        value = getattr(node, child, None)
        if value is not None and not isinstance(value, (int, float, str)):
            yield from walk(value)
    for arg in getattr(node, "args", None) or []:
        yield from walk(arg)


def as_prometheus_gets_it(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana does (a range for
    the interval ones; "all" regexes for the template variables)."""
    return VARIABLE.sub(".*", RANGE_VARIABLES.sub("1m", expr))


def dashboard_queries() -> list[tuple[str, str, set[str]]]:
    """(where, PromQL expression, labels the query reads beyond the expression's own) of
    every panel target and query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            queries.append((f"panel {panel['title']!r}", target["expr"], legend))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.fullmatch(variable["query"])
            assert match and match["selector"], f"${variable['name']}: {variable['query']}"
            queries.append((f"variable ${variable['name']}", match["selector"], {match["label"]}))
    return queries


@pytest.mark.asyncio(loop_scope="module")
async def test_every_dashboard_query_reads_exported_metrics_and_labels(scrape: str) -> None:
    exported = sample_labels(scrape)
    queries = dashboard_queries()
    assert len(queries) >= 12
    for where, expr, extra_labels in queries:
        parsed = promql_parser.parse(as_prometheus_gets_it(expr))
        found = list(walk(parsed))
        metrics = {name for name, _ in found if name is not None}
        assert metrics, f"{where}: no metric in {expr}"
        for name in metrics:
            assert name in exported, f"{where}: {name} is not exported ({expr})"
        available = set().union(*(exported[name] for name in metrics)) | TARGET_LABELS
        used = set().union(extra_labels, *(labels for _, labels in found))
        assert used <= available, f"{where}: labels {used - available} not on {metrics}"


def test_the_parser_sees_what_a_query_names() -> None:
    """The walk finds selectors, groupings and joins at any depth (else the check above
    would pass by seeing nothing)."""
    expr = (
        "histogram_quantile(0.9, sum by (le, model) "
        '(rate(a_bucket{version=~"$v"}[$__rate_interval]))) / on (instance) group_left max(b)'
    )
    found = list(walk(promql_parser.parse(as_prometheus_gets_it(expr))))
    assert {name for name, _ in found if name} == {"a_bucket", "b"}
    assert set().union(*(labels for _, labels in found)) == {"le", "model", "version", "instance"}


def documented() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table: name → (type, labels)."""
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| (\w+) \| ([^|]*) \| .+ \|", line)
        if match:
            labels = set(re.findall(r"`(\w+)`", match[3]))
            rows[match[1]] = (match[2], labels)
    return rows


def exported_families(text: str) -> dict[str, tuple[str, set[str]]]:
    """A scrape's families as docs/metrics.md names them (counters with ``_total``, as
    queried), less prometheus_client's ``*_created`` series."""
    families = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = (family.type, {k for s in family.samples for k in s.labels})
    return families


def test_metrics_doc_lists_every_exported_metric_as_exported(
    scrape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/metrics.md's table is what the gateway exports: every metric, its type and its
    labels; the GPU rows as a scrape on a (stand-in) NVML host shows them."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([("NVIDIA L4", 5, 1, 2)]))
    gpu = {
        name: family
        for name, family in exported_families(GatewayMetrics().render().decode()).items()
        if name.startswith("cnnserve_gpu_")
    }
    assert len(gpu) == 3
    assert documented() == exported_families(scrape) | gpu
