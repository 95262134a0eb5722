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


#: What a row is unless it says otherwise (rows of older runs lack the newer keys).
ROW_DEFAULTS = {"variant": "", "payload": "tensor", "transport": "grpc", "client": "loadgen"}
SHARED_BATCHER = "2 frontends, shared batcher"
INDEPENDENT = "2 independent gateways"


def _field(row: Row, key: str) -> Any:
    return row.get(key, ROW_DEFAULTS.get(key))


def _find(rows: list[Row], **where: Any) -> Row | None:
    """The first row matching ``where``; unless given, the default variant with tensors over
    gRPC, measured by the project's load generator."""
    where = {**ROW_DEFAULTS, **where}
    for row in rows:
        if all(_field(row, k) == v for k, v in where.items()):
            return row
    return None


def _ort_c64(rows: list[Row], **where: Any) -> Row | None:
    return _find(rows, backend="onnxruntime", model="convnet", items=1, concurrency=64,
                 batching=True, **where)  # fmt: skip


def _torchserve_alone(rows: list[Row]) -> Row | None:
    """TorchServe REST alone at c=64 with its best worker count (the fastest row)."""
    candidates = [
        r
        for r in rows
        if r["backend"] == TORCHSERVE_REST and r["concurrency"] == 64 and r["payload"] == "png"
    ]
    return max(candidates, key=lambda r: r["requests_per_s"], default=None)


def _side(row: Row) -> str:
    """One side of a ratio: throughput, p50/p99, mean formed batch, RSS, CPU per request."""
    parts = [
        f"{row['requests_per_s']:.0f} req/s",
        f"p50 {row['p50_ms']:.1f} / p99 {row['p99_ms']:.1f} ms",
    ]
    if row.get("mean_batch_size") is not None:
        parts.append(f"batch {row['mean_batch_size']:.1f}")
    rss = []
    if "gateway_rss_end_mb" in row:
        rss.append(f"gateway {row['gateway_rss_end_mb']:.0f}")
    if "torchserve_rss_mb" in row:
        rss.append(f"TorchServe {row['torchserve_rss_mb']:.0f}")
    if rss:
        parts.append("RSS " + " + ".join(rss) + " MB")
    cpu = _cpu(row)
    if cpu:
        parts.append(f"CPU {cpu} ms/request")
    return " · ".join(parts)


def _cpu(row: Row) -> str:
    """CPU time per request of the gateway and of TorchServe (``gateway 0.61 + TorchServe
    0.80``), as far as the row has them; empty when it has none."""
    names = (("gateway", "gateway"), ("torchserve", "TorchServe"))
    return " + ".join(
        f"{shown} {row[f'{key}_cpu_ms_per_request']:.2f}"
        for key, shown in names
        if row.get(f"{key}_cpu_ms_per_request") is not None
    )


def _ratio(
    top: Row | None, bottom: Row | None, top_name: str, bottom_name: str
) -> tuple[float, str] | None:
    """``top ÷ bottom`` in requests/s, with both sides' figures."""
    if not top or not bottom or not bottom["requests_per_s"]:
        return None
    ratio = top["requests_per_s"] / bottom["requests_per_s"]
    return ratio, f"{top_name}: {_side(top)}; {bottom_name}: {_side(bottom)}"


def _torchserve_gain(rows: list[Row]) -> tuple[float, str] | None:
    gateway = _find(rows, backend="torchserve", model="convnet", items=1, concurrency=64,
                    batching=True, payload="png")  # fmt: skip
    alone = _torchserve_alone(rows)
    return _ratio(gateway, alone, "gateway → TorchServe", _alone_name(alone))


def _alone_name(alone: Row | None) -> str:
    if alone is None:
        return ""
    workers = alone.get("torchserve_workers", 1)
    return (
        f"TorchServe alone ({workers} worker{'s' if workers > 1 else ''} per model, the better "
        f"count; batchSize {alone['torchserve_batch_size']}, "
        f"{alone['torchserve_max_batch_delay_ms']} ms)"
    )


def _png_share(rows: list[Row]) -> tuple[float, str] | None:
    return _ratio(_ort_c64(rows, payload="png"), _ort_c64(rows), "PNG", "FP32 tensor")


def _rest_share(rows: list[Row]) -> tuple[float, str] | None:
    return _ratio(_ort_c64(rows, transport="rest"), _ort_c64(rows), "REST binary", "gRPC")


def _predict_gain(rows: list[Row]) -> tuple[float, str] | None:
    where = {"model": "convnet", "items": 1, "concurrency": 64, "batching": True,
             "payload": "png", "transport": "predict"}  # fmt: skip
    # Like for like: TorchServe behind the gateway; the ORT gateway where TorchServe is absent.
    friendly = _find(rows, backend="torchserve", **where) or _find(
        rows, backend="onnxruntime", **where
    )
    alone = _torchserve_alone(rows)
    name = f"/predict ({friendly['backend']})" if friendly else ""
    return _ratio(friendly, alone, name, _alone_name(alone))


def _echo_share(rows: list[Row]) -> tuple[float, str] | None:
    on = _ort_c64(rows)
    if not on or not on.get("echo_requests_per_s"):
        return None
    ratio = on["requests_per_s"] / on["echo_requests_per_s"]
    return ratio, f"gateway: {_side(on)}; echo: {on['echo_requests_per_s']:.0f} req/s"


def _big_request_share(rows: list[Row]) -> tuple[float, str] | None:
    candidates = [
        r
        for r in rows
        if r["backend"] == "onnxruntime"
        and r["model"] == "convnet"
        and r["items"] == 32
        and r["batching"]
        and all(_field(r, k) == v for k, v in ROW_DEFAULTS.items())
        and "model_alone_images_per_s" in r
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / best["model_alone_images_per_s"]
    return ratio, (
        f"{best['images_per_s']:.0f} vs model alone {best['model_alone_images_per_s']:.0f} img/s "
        f"at batch {best['model_alone_batch']} (c={best['concurrency']}); gateway: {_side(best)}"
    )


def _frontends_batch(rows: list[Row]) -> tuple[float, str] | None:
    one, shared = _ort_c64(rows), _ort_c64(rows, variant=SHARED_BATCHER)
    if not one or not shared or not one.get("mean_batch_size"):
        return None
    ratio = shared["mean_batch_size"] / one["mean_batch_size"]
    detail = f"1 process: {_side(one)}; {SHARED_BATCHER}: {_side(shared)}"
    independent = _ort_c64(rows, variant=INDEPENDENT)
    if independent:
        detail += f"; {INDEPENDENT}: {_side(independent)}"
    return ratio, detail


TARGETS = (
    Target(
        "gateway → TorchServe, 1 PNG/request, c=64 ÷ TorchServe REST alone (batchSize 32, "
        "5 ms, same PNGs, best worker count)",
        "≥ 3.0",
        _torchserve_gain,
    ),
    Target(
        "gateway (onnxruntime), 1 PNG/request ÷ 1 FP32 tensor/request, c=64", "≥ 0.8", _png_share
    ),
    Target(
        "OIP REST with the binary tensor extension ÷ OIP gRPC, 1 tensor/request, c=64 (ORT)",
        "≥ 0.7",
        _rest_share,
    ),
    Target(
        "friendly `POST /predict/convnet` (PNG body) ÷ TorchServe REST alone, c=64",
        "≥ 1.0",
        _predict_gain,
    ),
    Target(
        "gateway (onnxruntime), 1 tensor/request, c=64 ÷ bare grpc.aio echo of the same payload",
        "≥ 0.85",
        _echo_share,
    ),
    Target(
        "gateway (onnxruntime), 32-tensor requests ÷ model alone at batch 32",
        "≥ 0.9",
        _big_request_share,
    ),
    Target(
        "1 → 2 frontend processes: mean formed batch with the shared batcher ÷ 1 process, c=64 "
        "(kept)",
        "≥ 0.9",
        _frontends_batch,
    ),
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
        workers = row.get("variant") or "1 worker"
        return f"TorchServe's own, {workers}"
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
        "BYTES `image` input (payload `png`), over OIP gRPC, over OIP REST with the binary",
        "tensor extension (`REST binary`), or as the PNG body of `POST /predict/convnet`; the",
        "gateway answers its default outputs. Batching **off** = `max_batch_size` equal to the",
        "items per request and a delay of 0, so the batcher never merges two requests.",
        "Baselines: the model alone at the batch size the batcher formed (measured right after",
        "each scenario), a bare `grpc.aio` echo of the same payload at the same concurrency,",
        "and TorchServe called directly over REST with its own batching (batchSize 32, 5 ms),",
        "fed the same PNG digits, with 1 and with 2 workers per model: its better figure is the",
        "baseline. Each side of a ratio is given as req/s · p50 / p99 · mean formed batch · RSS",
        "· CPU per request: each server's processes' CPU time over the run (warm-up included)",
        "divided by the requests served meanwhile (gateway: every process it started, decode",
        "processes included; TorchServe: its JVM and workers).",
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
    lines += [
        "",
        *_delay_table(rows),
        *_torchserve_table(rows),
        *_load_generator_table(rows),
        *_all_table(rows),
    ]
    for plot in plots:
        lines += [f"![{plot}](bench/{plot})", ""]
    for note in notes:
        lines += [note.rstrip(), ""]
    return "\n".join(lines)


def _all_table(rows: list[Row]) -> list[str]:
    lines = [
        "## All scenarios",
        "",
        "| backend | model | side | img/req | payload | transport | conc. | batching | req/s "
        "| img/s | p50 ms | p90 ms | p99 ms | mean batch | errors | echo req/s "
        "| model alone img/s (batch) | RSS MB (gateway start→end; TorchServe) |",
        "|" + " --- |" * 18,
    ]
    for r in sorted(rows, key=_table_order):
        if _field(r, "client") != "loadgen":
            continue
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
            f"{_transport(r)} | {r['concurrency']} | {_variant(r)} | {r['requests_per_s']:.0f} | "
            f"{r['images_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {_num(r.get('mean_batch_size'), 1)} | {errors} | "
            f"{_num(r.get('echo_requests_per_s'))} | {alone} | {'; '.join(rss) or '—'} |"
        )
    return [*lines, ""]


TRANSPORT_NAMES = {"grpc": "gRPC", "rest": "REST binary", "predict": "/predict"}


def _transport(row: Row) -> str:
    if row["backend"] == TORCHSERVE_REST:
        return "TorchServe REST"
    transport = str(_field(row, "transport"))
    return TRANSPORT_NAMES.get(transport, transport)


BACKEND_ORDER = ("onnxruntime", "torchscript", "torchserve", TORCHSERVE_REST)


def _table_order(r: Row) -> tuple[Any, ...]:
    """Rows are measured interleaved (side by side); the table groups them by configuration."""
    backend = BACKEND_ORDER.index(r["backend"]) if r["backend"] in BACKEND_ORDER else 99
    return (backend, r["model"], r["side"], r["items"], r["payload"], _field(r, "transport"),
            not r["batching"], r.get("variant", ""), r["concurrency"])  # fmt: skip


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
        and _field(r, "transport") == "grpc"
        and _field(r, "client") == "loadgen"
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
    chosen.sort(key=_table_order)
    if not chosen:
        return []
    lines = [
        "## TorchServe with and without the gateway",
        "",
        "| path | payload | transport | conc. | batching | req/s | p50 ms | p99 ms "
        "| mean batch (gateway) | errors | TorchServe RSS MB | CPU ms/request |",
        "|" + " --- |" * 12,
    ]
    for r in chosen:
        alone = r["backend"] == TORCHSERVE_REST
        path = "TorchServe REST alone" if alone else "gateway → TorchServe"
        errors = ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {path} | {r['payload']} | {_transport(r)} | {r['concurrency']} | {_variant(r)} | "
            f"{r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{_num(r.get('mean_batch_size'), 1)} | {errors} | "
            f"{_num(r.get('torchserve_rss_mb'))} | {_cpu(r) or '—'} |"
        )
    return [*lines, ""]


def _load_generator_table(rows: list[Row]) -> list[str]:
    """perf_analyzer's rows beside the project's load generator's for the same point and
    gateway (same configuration, measured one after the other)."""
    measured = [r for r in rows if _field(r, "client") == "perf_analyzer"]
    if not measured:
        return []
    lines = [
        "## Two load generators, one gateway",
        "",
        "1-image (FP32 tensor) and 32-image requests to the ORT gateway over gRPC; each cell is",
        "req/s · p50 ms · p99 ms · mean formed batch.",
        "",
        "| img/req | conc. | cnnserve.bench.loadgen | Triton perf_analyzer |",
        "| --- | --- | --- | --- |",
    ]
    for pa in sorted(measured, key=lambda r: (r["items"], r["concurrency"])):
        ours = _find(rows, backend=pa["backend"], model=pa["model"], side=pa["side"],
                     items=pa["items"], concurrency=pa["concurrency"], batching=True)  # fmt: skip
        if pa.get("perf_analyzer_ok"):
            theirs = _cell(pa, pa.get("perf_analyzer_mean_batch_size"))
        else:
            theirs = f"not measured: {pa.get('perf_analyzer_reason', '')}".replace("|", "/")
        ours_cell = _cell(ours, ours.get("mean_batch_size")) if ours else "—"
        lines.append(f"| {pa['items']} | {pa['concurrency']} | {ours_cell} | {theirs} |")
    return [*lines, ""]


def _cell(row: Row, batch: float | None) -> str:
    return (
        f"{row['requests_per_s']:.0f} · {row['p50_ms']:.2f} · {row['p99_ms']:.2f} · "
        f"{_num(batch, 1)}"
    )


def _concurrencies(rows: list[Row]) -> list[int]:
    return sorted({r["concurrency"] for r in rows})


def _series(rows: list[Row]) -> dict[str, list[Row]]:
    """1-image ConvNet rows of the default variant, one series per backend and batching."""
    series: dict[str, list[Row]] = {}
    for r in rows:
        if r["model"] != "convnet" or r["items"] != 1:
            continue
        if r["backend"] == TORCHSERVE_REST:
            name = f"TorchServe REST alone (png, {_field(r, 'variant') or '1 worker'})"
        elif r.get("variant", "") or any(
            _field(r, k) != ROW_DEFAULTS[k] for k in ("transport", "client")
        ):
            continue
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
            and r.get("echo_requests_per_s")
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
