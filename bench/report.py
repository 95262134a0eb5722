"""Turn suite rows into docs/benchmarks.md: the machine, the issue's targets as ratios, the
full table, and two plots (throughput vs concurrency; p99 latency vs throughput)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One of the issue's performance targets, computed as a ratio of figures from one run."""

    name: str
    goal: str
    compute: Callable[[list[Row]], tuple[float, str] | None]


def _find(rows: list[Row], **where: Any) -> Row | None:
    for row in rows:
        if all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def _batching_gain(rows: list[Row]) -> tuple[float, str] | None:
    on = _find(rows, backend="onnxruntime", model="convnet", items=1, concurrency=64, batching=True)
    off = _find(
        rows, backend="onnxruntime", model="convnet", items=1, concurrency=64, batching=False
    )
    if not on or not off:
        return None
    ratio = on["requests_per_s"] / off["requests_per_s"]
    return ratio, f"{on['requests_per_s']:.0f} vs {off['requests_per_s']:.0f} req/s"


def _echo_share(rows: list[Row]) -> tuple[float, str] | None:
    on = _find(rows, backend="onnxruntime", model="convnet", items=1, concurrency=64, batching=True)
    if not on:
        return None
    ratio = on["requests_per_s"] / on["echo_requests_per_s"]
    return ratio, f"{on['requests_per_s']:.0f} vs echo {on['echo_requests_per_s']:.0f} req/s"


def _big_request_share(rows: list[Row]) -> tuple[float, str] | None:
    candidates = [
        r
        for r in rows
        if r["backend"] == "onnxruntime"
        and r["model"] == "convnet"
        and r["items"] == 32
        and r["batching"]
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / best["model_alone_images_per_s"]
    return ratio, (
        f"{best['images_per_s']:.0f} vs model alone {best['model_alone_images_per_s']:.0f} img/s "
        f"at batch {best['model_alone_batch']} (c={best['concurrency']})"
    )


def _torchserve_gain(rows: list[Row]) -> tuple[float, str] | None:
    gateway = _find(
        rows, backend="torchserve", model="convnet", items=1, concurrency=64, batching=True
    )
    if not gateway or "torchserve_rest_requests_per_s" not in gateway:
        return None
    ratio = gateway["requests_per_s"] / gateway["torchserve_rest_requests_per_s"]
    return (
        ratio,
        f"{gateway['requests_per_s']:.0f} vs TorchServe REST "
        f"{gateway['torchserve_rest_requests_per_s']:.0f} req/s",
    )


def _overhead_at_c1(rows: list[Row]) -> tuple[float, str] | None:
    row = _find(rows, backend="onnxruntime", model="convnet", items=1, concurrency=1, batching=True)
    if not row:
        return None
    added = row["p50_ms"] - row["model_alone_p50_ms"]
    return added, f"p50 {row['p50_ms']:.2f} ms vs model alone {row['model_alone_p50_ms']:.2f} ms"


TARGETS = (
    Target("batching on ÷ off, 1-image ConvNet, c=64 (ORT)", "≥ 5×", _batching_gain),
    Target("gateway+ORT ÷ bare gRPC echo, 1-image, c=64", "≥ 0.60", _echo_share),
    Target("32-image requests ÷ model alone at batch 32 (ORT)", "≥ 0.80", _big_request_share),
    Target("gateway→TorchServe ÷ TorchServe REST (own batching), c=64", "≥ 3×", _torchserve_gain),
    Target("p50 added over the model alone at c=1 (ms)", "≤ 0.5 ms", _overhead_at_c1),
)


def _met(goal: str, value: float) -> str:
    number = float(goal.split()[1].rstrip("×"))
    ok = value <= number if goal.startswith("≤") else value >= number
    return "met" if ok else "**not met**"


def render(rows: list[Row], machine: str, command: str, plots: list[str]) -> str:
    """The whole Markdown report."""
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {machine}.",
        "",
        f"Produced by `{command}`; raw rows in `docs/bench/results.jsonl`. Every ratio compares",
        "figures measured in this same run. Single-image requests carry one FP32 `[1,3,H,W]`",
        "tensor as raw contents; the gateway answers its default outputs.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | verdict | figures |",
        "| --- | --- | --- | --- | --- |",
    ]
    for target in TARGETS:
        got = target.compute(rows)
        if got is None:
            lines.append(
                f"| {target.name} | {target.goal} | — | not measured | scenario not in this run |"
            )
            continue
        value, detail = got
        verdict = _met(target.goal, value)
        lines.append(f"| {target.name} | {target.goal} | {value:.2f} | {verdict} | {detail} |")
    lines += [
        "",
        "## All scenarios",
        "",
        "| backend | model | side | img/req | conc. | batching | req/s | img/s | p50 ms | p90 ms "
        "| p99 ms | mean batch | errors | echo req/s | model alone img/s (batch) "
        "| RSS MB start→end |",
        "|" + " --- |" * 16,
    ]
    for r in rows:
        errors = ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['backend']} | {r['model']} | {r['side']} | {r['items']} | {r['concurrency']} | "
            f"{'on' if r['batching'] else 'off'} | {r['requests_per_s']:.0f} | "
            f"{r['images_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | "
            f"{r['mean_batch_size']:.1f} | {errors} | "
            f"{r.get('echo_requests_per_s', float('nan')):.0f} | "
            f"{r['model_alone_images_per_s']:.0f} ({r['model_alone_batch']}) | "
            f"{r['gateway_rss_start_mb']:.0f}→{r['gateway_rss_end_mb']:.0f} |"
        )
    lines.append("")
    for plot in plots:
        lines += [f"![{plot}](bench/{plot})", ""]
    return "\n".join(lines)


def plot(rows: list[Row], out_dir: Path) -> list[str]:
    """Write the two PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in rows if r["model"] == "convnet" and r["items"] == 1]
    series: dict[str, list[Row]] = {}
    for r in single:
        series.setdefault(f"{r['backend']} batching {'on' if r['batching'] else 'off'}", []).append(
            r
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        points.sort(key=lambda r: r["concurrency"])
        ax.plot(
            [p["concurrency"] for p in points],
            [p["requests_per_s"] for p in points],
            marker="o",
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("requests/s (1-image ConvNet)")
    ax.set_title("Throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        points.sort(key=lambda r: r["requests_per_s"])
        ax.plot(
            [p["requests_per_s"] for p in points],
            [p["p99_ms"] for p in points],
            marker="o",
            label=name,
        )
    ax.set_xlabel("requests/s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("p99 latency vs throughput (1-image ConvNet)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=110)
    plt.close(fig)
    return ["throughput.png", "latency.png"]
