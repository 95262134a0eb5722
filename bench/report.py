"""Turn suite rows into docs/benchmarks.md: the machine, the performance targets
(:data:`TARGETS`) as ratios, the tables (every scenario, the batching-delay trade-off,
TorchServe with and without the gateway), plots, and the hand-written notes kept beside the
figures in ``docs/bench/notes/``, appended verbatim in file-name order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]

TORCHSERVE_REST = "torchserve_rest"
DEFAULT_VARIANT = "adaptive 2 ms (default)"


@dataclass(frozen=True)
class Target:
    """One of cnnserve's performance targets, computed as a ratio of figures from one run."""

    name: str
    goal: str
    compute: Callable[[list[Row]], tuple[float, str] | None]


def _find(rows: list[Row], **where: Any) -> Row | None:
    """The first row matching ``where``; unless given, the default variant with tensors."""
    where = {"variant": "", "payload": "tensor", **where}
    for row in rows:
        if all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def _convnet_c64(rows: list[Row], batching: bool) -> Row | None:
    return _find(
        rows, backend="onnxruntime", model="convnet", items=1, concurrency=64, batching=batching
    )


def _batching_gain(rows: list[Row]) -> tuple[float, str] | None:
    on, off = _convnet_c64(rows, True), _convnet_c64(rows, False)
    if not on or not off:
        return None
    ratio = on["requests_per_s"] / off["requests_per_s"]
    return ratio, (
        f"{on['requests_per_s']:.0f} vs {off['requests_per_s']:.0f} req/s "
        f"(mean batch {on['mean_batch_size']:.1f} vs {off['mean_batch_size']:.1f})"
    )


def _echo_share(rows: list[Row]) -> tuple[float, str] | None:
    on = _convnet_c64(rows, True)
    if not on or "echo_requests_per_s" not in on:
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
        and r.get("variant", "") == ""
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
    rest = _find(rows, backend=TORCHSERVE_REST, concurrency=64, payload="png")
    where = {"backend": "torchserve", "model": "convnet", "items": 1, "concurrency": 64}
    # Like for like when measured: the gateway decoding the same PNG digits.
    gateway = _find(rows, **where, batching=True, payload="png") or _find(
        rows, **where, batching=True
    )
    if not gateway or not rest:
        return None
    ratio = gateway["requests_per_s"] / rest["requests_per_s"]
    return ratio, (
        f"{gateway['requests_per_s']:.0f} req/s ({gateway['payload']}) vs TorchServe REST "
        f"{rest['requests_per_s']:.0f} req/s (PNG, batchSize {rest['torchserve_batch_size']}, "
        f"maxBatchDelay {rest['torchserve_max_batch_delay_ms']} ms)"
    )


def _overhead_at_c1(rows: list[Row]) -> tuple[float, str] | None:
    row = _find(rows, backend="onnxruntime", model="convnet", items=1, concurrency=1, batching=True)
    if not row:
        return None
    added = row["p50_ms"] - row["model_alone_p50_ms"]
    detail = f"p50 {row['p50_ms']:.2f} ms vs model alone {row['model_alone_p50_ms']:.2f} ms"
    if "echo_p50_ms" in row:
        detail += (
            f"; the bare gRPC echo's own p50 is {row['echo_p50_ms']:.2f} ms, so the gateway "
            f"adds {added - row['echo_p50_ms']:.2f} ms over echo + model"
        )
    return added, detail


TARGETS = (
    Target("batching on ÷ off, 1-image ConvNet, c=64 (ORT)", "≥ 5×", _batching_gain),
    Target("gateway+ORT ÷ bare gRPC echo, 1-image, c=64", "≥ 0.60", _echo_share),
    Target("32-image requests ÷ model alone at batch 32 (ORT)", "≥ 0.80", _big_request_share),
    Target("gateway→TorchServe ÷ TorchServe REST (own batching), c=64", "≥ 3×", _torchserve_gain),
    Target("p50 added over the model alone at c=1 (ms)", "≤ 0.5 ms", _overhead_at_c1),
)


@dataclass(frozen=True)
class Measured:
    """A target's figure from one run, whether it meets the goal, and the figures behind it."""

    value: float
    met: bool
    detail: str


def _meets(goal: str, value: float) -> bool:
    number = float(goal.split()[1].rstrip("×"))
    return value <= number if goal.startswith("≤") else value >= number


def measure(rows: list[Row]) -> dict[str, Measured | None]:
    """Every target's figure by target name; ``None`` where its scenario is not in ``rows``."""
    measured: dict[str, Measured | None] = {}
    for target in TARGETS:
        got = target.compute(rows)
        if got is not None:
            value, detail = got
            measured[target.name] = Measured(value, _meets(target.goal, value), detail)
        else:
            measured[target.name] = None
    return measured


def _num(value: Any, digits: int = 0) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _variant(row: Row) -> str:
    if row["backend"] == TORCHSERVE_REST:
        return "TorchServe's own"
    if not row["batching"]:
        return "off"
    return row.get("variant") or DEFAULT_VARIANT


def render(
    rows: list[Row], machine: str, command: str, plots: list[str], notes: Sequence[str] = ()
) -> str:
    """The whole Markdown report; ``notes`` are Markdown sections appended verbatim."""
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {machine}.",
        "",
        f"Produced by `{command}`; raw rows in `docs/bench/results.jsonl` (one JSON object",
        "per scenario). Every ratio compares figures measured in this same run. Requests carry",
        "one FP32 `[N,3,H,W]` tensor as raw contents (payload `tensor`) or N PNG digits in the",
        "BYTES `image` input (payload `png`); the gateway answers its default outputs.",
        "Batching **off** = `max_batch_size` equal to the items per request and a delay of 0,",
        "so the batcher never merges two requests. Baselines: the model alone at the batch",
        "size the batcher formed (measured right after each scenario), a bare `grpc.aio` echo",
        "of the same payload at the same concurrency, and TorchServe called directly over",
        "REST with its own batching.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | verdict | figures |",
        "| --- | --- | --- | --- | --- |",
    ]
    measured = measure(rows)
    for target in TARGETS:
        figure = measured[target.name]
        if figure is None:
            lines.append(
                f"| {target.name} | {target.goal} | — | not measured | scenario not in this run |"
            )
            continue
        verdict = "met" if figure.met else "**not met**"
        lines.append(
            f"| {target.name} | {target.goal} | {figure.value:.2f} | {verdict} | {figure.detail} |"
        )
    if notes:
        lines += ["", "The notes after the tables say what limits each target, with profiles."]
    lines += ["", *_delay_table(rows), *_torchserve_table(rows), *_all_table(rows)]
    for plot in plots:
        lines += [f"![{plot}](bench/{plot})", ""]
    for note in notes:
        lines += [note.rstrip(), ""]
    return "\n".join(lines)


def _all_table(rows: list[Row]) -> list[str]:
    lines = [
        "## All scenarios",
        "",
        "| backend | model | side | img/req | payload | conc. | batching | req/s | img/s "
        "| p50 ms | p90 ms | p99 ms | mean batch | errors | echo req/s | model alone img/s "
        "(batch) | RSS MB (gateway start→end; TorchServe) |",
        "|" + " --- |" * 17,
    ]
    for r in sorted(rows, key=_table_order):
        errors = ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        alone = (
            f"{r['model_alone_images_per_s']:.0f} ({r['model_alone_batch']})"
            if "model_alone_images_per_s" in r
            else "—"
        )
        rss = []
        if "gateway_rss_start_mb" in r:
            rss.append(f"{r['gateway_rss_start_mb']:.0f}→{r['gateway_rss_end_mb']:.0f}")
        if "torchserve_rss_mb" in r:
            rss.append(f"TS {r['torchserve_rss_mb']:.0f}")
        lines.append(
            f"| {r['backend']} | {r['model']} | {r['side']} | {r['items']} | {r['payload']} | "
            f"{r['concurrency']} | {_variant(r)} | {r['requests_per_s']:.0f} | "
            f"{r['images_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {_num(r.get('mean_batch_size'), 1)} | {errors} | "
            f"{_num(r.get('echo_requests_per_s'))} | {alone} | {'; '.join(rss) or '—'} |"
        )
    return [*lines, ""]


BACKEND_ORDER = ("onnxruntime", "torchscript", "torchserve", TORCHSERVE_REST)


def _table_order(r: Row) -> tuple[Any, ...]:
    """Rows are measured interleaved (side by side); the table groups them by configuration."""
    backend = BACKEND_ORDER.index(r["backend"]) if r["backend"] in BACKEND_ORDER else 99
    return (backend, r["model"], r["side"], r["items"], r["payload"], not r["batching"],
            r.get("variant", ""), r["concurrency"])  # fmt: skip


def _delay_table(rows: list[Row]) -> list[str]:
    """The batching trade-offs: ORT ConvNet, single tensors, every variant measured (delays,
    several gateway processes)."""
    chosen = [
        r
        for r in rows
        if r["backend"] == "onnxruntime"
        and r["model"] == "convnet"
        and r["items"] == 1
        and r["payload"] == "tensor"
    ]
    found = {_variant(r) for r in chosen}
    if len(found) < 2:
        return []
    # The default first, batching off last, the variants between.
    variants = sorted(found, key=lambda v: (v != DEFAULT_VARIANT, v == "off", v))
    lines = [
        "## Batching delay and gateway processes: the trade-off",
        "",
        "1-image ConvNet over ORT; each cell is req/s · p50 ms · p99 ms · mean batch size.",
        "Variants change one setting from the defaults (adaptive delay of 2 ms, one process).",
        "",
        "| batching | " + " | ".join(f"c={c}" for c in _concurrencies(chosen)) + " |",
        "|" + " --- |" * (1 + len(_concurrencies(chosen))),
    ]
    for variant in variants:
        cells = []
        for c in _concurrencies(chosen):
            row = next(
                (r for r in chosen if _variant(r) == variant and r["concurrency"] == c), None
            )
            cells.append(
                "—"
                if row is None
                else f"{row['requests_per_s']:.0f} · {row['p50_ms']:.2f} · {row['p99_ms']:.1f} · "
                f"{row['mean_batch_size']:.1f}"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _torchserve_table(rows: list[Row]) -> list[str]:
    chosen = [r for r in rows if r["backend"] in ("torchserve", TORCHSERVE_REST)]
    if not chosen:
        return []
    lines = [
        "## TorchServe with and without the gateway",
        "",
        "| path | payload | conc. | batching | req/s | p50 ms | p99 ms | errors "
        "| TorchServe RSS MB |",
        "|" + " --- |" * 9,
    ]
    for r in chosen:
        alone = r["backend"] == TORCHSERVE_REST
        path = "TorchServe REST alone" if alone else "gateway → TorchServe"
        errors = ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {path} | {r['payload']} | {r['concurrency']} | {_variant(r)} | "
            f"{r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {errors} | "
            f"{_num(r.get('torchserve_rss_mb'))} |"
        )
    return [*lines, ""]


def _concurrencies(rows: list[Row]) -> list[int]:
    return sorted({r["concurrency"] for r in rows})


def _series(rows: list[Row]) -> dict[str, list[Row]]:
    """1-image ConvNet rows of the default variant, one series per backend and batching."""
    series: dict[str, list[Row]] = {}
    for r in rows:
        if r["model"] != "convnet" or r["items"] != 1 or r.get("variant", ""):
            continue
        if r["backend"] == TORCHSERVE_REST:
            name = "TorchServe REST alone (png)"
        else:
            mode = "on" if r["batching"] else "off"
            name = f"{r['backend']} batching {mode}" + (" (png)" if r["payload"] == "png" else "")
        series.setdefault(name, []).append(r)
    return series


def plot(rows: list[Row], out_dir: Path) -> list[str]:
    """Write the PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows)
    names: list[str] = []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, points in sorted(series.items()):
        points.sort(key=lambda r: r["concurrency"])
        ax.plot(
            [p["concurrency"] for p in points],
            [p["requests_per_s"] for p in points],
            marker="o",
            label=name,
        )
    echo = sorted(
        {
            (r["concurrency"], r["echo_requests_per_s"])
            for r in rows
            if r["model"] == "convnet"
            and r["items"] == 1
            and r["payload"] == "tensor"
            and "echo_requests_per_s" in r
        }
    )
    if echo:
        ax.plot([c for c, _ in echo], [v for _, v in echo], "k--", label="bare gRPC echo")
    ax.set_xscale("log", base=2)
    names.append(
        _save_plot(
            fig, ax, out_dir / "throughput.png", "concurrent requests",
            "requests/s (1-image ConvNet)", "Throughput vs concurrency",
        )
    )  # fmt: skip

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, points in sorted(series.items()):
        # In order of load, so each curve walks from concurrency 1 upwards.
        points.sort(key=lambda r: r["concurrency"])
        ax.plot(
            [p["requests_per_s"] for p in points],
            [p["p99_ms"] for p in points],
            marker="o",
            label=name,
        )
    ax.set_yscale("log")
    names.append(
        _save_plot(
            fig, ax, out_dir / "latency.png", "requests/s", "p99 latency (ms)",
            "p99 latency vs throughput (1-image ConvNet)",
        )
    )  # fmt: skip
    return names


def _save_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    """Label, grid and legend one plot, write it as PNG, close it; returns the file name."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
