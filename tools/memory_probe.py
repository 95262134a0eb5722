"""What the audit's image payloads, and the largest requests the memory budget accepts, cost a
real gateway: its peak RSS growth, CPU seconds and the answers.

Starts ``cnnserve serve --backend torchserve`` at the default settings in front of the stand-in
TorchServe the tests use (tests/gateway/null_torchserve.py: zeros of each model's output shape,
so the figures are the gateway's own, as in a deployment where the model runs in TorchServe's
pods), then sends each payload and reports its peak RSS (VmHWM, restarted per payload through
``/proc/<pid>/clear_refs``), CPU seconds and statuses. Run it inside a memory cgroup: the
gateway of older commits dies of the audit's last payload.

    .venv/bin/python tools/memory_probe.py            # every payload
    .venv/bin/python tools/memory_probe.py --audit    # the audit's payloads only

Older code: a package tree of another commit, first on the path (the stand-in and the tests'
process helper still come from this checkout)::

    mkdir -p /tmp/old /tmp/oldpkg && git archive 04acb1f | tar -x -C /tmp/old
    cp -r /tmp/old/src/cnnserve /tmp/oldpkg/
    for d in models export handlers training gateway torchserve_engine protocol client bench
    do cp -r /tmp/old/$d /tmp/oldpkg/cnnserve/; done
    PYTHONPATH=/tmp/oldpkg .venv/bin/python tools/memory_probe.py --audit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' stand-in TorchServe and process helper

from cnnserve.export.repository import ensure_default_repository  # noqa: E402
from cnnserve.protocol import open_inference_pb2 as pb  # noqa: E402
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc  # noqa: E402
from tests.gateway.null_torchserve import null_torchserve  # noqa: E402
from tests.support import GatewayProcess, gateway_process  # noqa: E402

MIB = 1 << 20
CHANNEL = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _transparent(side: int) -> bytes:
    """Transparent but for an opaque bar: 70 KB at 4096²."""
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    image.paste((255, 255, 255, 255), (side * 3 // 8, side // 4, side * 5 // 8, side * 3 // 4))
    return _png(image)


def _request(
    model: str, images: list[bytes], outputs: tuple[str, ...] = ()
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(images), 1])
    tensor.contents.bytes_contents.extend(images)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _peak_rss(pid: int) -> int:
    """VmHWM in bytes; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _call(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> str:
    try:
        await stub.ModelInfer(request, timeout=300)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {(exc.details() or '')[:120]}"
    return "OK"


async def _payload(
    gateway: GatewayProcess, name: str, requests: list[pb.ModelInferRequest]
) -> bool:
    """Send ``requests`` at once and print what they cost; whether the gateway survived."""
    pid = gateway.process.pid
    process = psutil.Process(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = process.memory_info().rss
    cpu_before = sum(process.cpu_times()[:2])
    seen = {"peak": 0, "cpu": cpu_before}

    async def watch() -> None:
        while True:
            seen["peak"] = max(seen["peak"], _peak_rss(pid))
            with contextlib.suppress(psutil.Error):
                seen["cpu"] = sum(process.cpu_times()[:2])
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    async with grpc.aio.insecure_channel(gateway.grpc_target, options=CHANNEL) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        outcomes = await asyncio.gather(*(_call(stub, r) for r in requests))
    await asyncio.sleep(0.2)
    watcher.cancel()
    wire = sum(r.ByteSize() for r in requests) / MIB
    print(f"{name}: {len(requests)} request(s), {wire:.2f} MiB sent")
    alive = gateway.process.poll() is None
    peak = _peak_rss(pid) if alive else seen["peak"]
    state = "" if alive else f"; the gateway DIED (exit {gateway.process.returncode})"
    print(
        f"    peak RSS {peak / MIB:.0f} MiB (+{(peak - before) / MIB:.0f} MiB over "
        f"{before / MIB:.0f}), {seen['cpu'] - cpu_before:.2f} CPU s, "
        f"{time.monotonic() - started:.1f} s{state}"
    )
    for outcome in sorted(set(outcomes)):
        print(f"    {outcomes.count(outcome)} × {outcome}")
    return alive


async def _run(gateway: GatewayProcess, audit_only: bool) -> None:
    fcn = _png(Image.new("RGB", (512, 512), (40, 40, 40)))
    small = [
        _request("convnet", [_transparent(64)]),
        _request("fcn", [_png(Image.new("RGB", (64, 64)))]),
    ]
    payloads = [
        ("warm-up: a digit and a 64² FCN image", small),
        ("one transparent 4096² PNG to the ConvNet", [_request("convnet", [_transparent(4096)])]),
        (
            "16 transparent 4096² PNGs to the ConvNet",
            [_request("convnet", [_transparent(4096)] * 16)],
        ),
        ("256 identical 512² FCN PNGs in one request", [_request("fcn", [fcn] * 256)]),
    ]
    if not audit_only:
        worst = _request("fcn", [fcn] * 6, ("scores",))
        payloads += [
            (
                "256 transparent 1024² PNGs to the ConvNet",
                [_request("convnet", [_transparent(1024)] * 256)],
            ),
            ("in-flight budget full: 6 × 512² FCN with scores, 4 at once", [worst] * 4),
            ("the next bigger request: 7 × 512² FCN", [_request("fcn", [fcn] * 7, ("scores",))]),
            ("6 × 512² FCN with scores, 8 at once", [worst] * 8),
        ]
    for name, requests in payloads:
        if not await _payload(gateway, name, requests):
            return


def main() -> None:
    """Start the stand-in and the gateway, send the payloads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audit", action="store_true", help="the audit's payloads only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="memory_probe-"))
    ensure_default_repository(work / "repository")
    with (
        null_torchserve() as target,
        gateway_process(
            "torchserve",
            work / "gateway.log",
            model_repository=work / "repository",
            torchserve_grpc_target=target,
            torchserve_token_auth=False,
            torchserve_registration=False,
            model_store_dir=work / "store",
        ) as gateway,
    ):
        asyncio.run(_run(gateway, args.audit))


if __name__ == "__main__":
    main()
