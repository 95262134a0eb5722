"""The logging set-up (cnnserve.logs), in fresh interpreters as ``cnnserve serve`` makes it,
and a real multi-process ``cnnserve serve`` writing JSON lines from every process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cnnserve.settings import Settings
from tests.support import gateway_process, wait_until

#: A program logging what a gateway's lines hold: plain, an access-style record with
#: fields, a message with a newline and non-ASCII text, an exception, and a DEBUG line.
PROGRAM = """
import logging, sys
from cnnserve.logs import setup_logging
setup_logging(sys.argv[1], sys.argv[2], worker=sys.argv[3] == "worker")
log = logging.getLogger("cnnserve.gateway.server")
log.info("gateway on %s", "127.0.0.1")
logging.getLogger("cnnserve.access").info(
    "id-1 http 200", extra={"request_id": "id-1", "status": "200", "items": 2,
    "latency_ms": 1.5, "queue_ms": None}
)
log.warning("two\\nlines, één")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("batch failed")
log.debug("details")
for library in ("onnxscript.rewriter", "uvicorn.error"):
    logging.getLogger(library).info("library chatter")
    logging.getLogger(library).warning("library warning")
"""
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def run(level: str, log_format: str, role: str = "main") -> list[str]:
    """The stderr lines of :data:`PROGRAM` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, level, log_format, role],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stderr.splitlines()


def test_text_keeps_todays_lines() -> None:
    lines = run("INFO", "text")
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(
        rf"{stamp} INFO cnnserve\.gateway\.server: gateway on 127\.0\.0\.1", lines[0]
    )
    assert re.fullmatch(rf"{stamp} INFO cnnserve\.access: id-1 http 200", lines[1])
    assert "Traceback (most recent call last):" in lines  # text keeps tracebacks as they were
    assert not any("details" in line for line in lines)  # DEBUG is below INFO


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_libraries_info_lines_are_quiet_but_their_warnings_show(log_format: str) -> None:
    lines = run("INFO", log_format)
    assert not any("library chatter" in line for line in lines)
    assert sum("library warning" in line for line in lines) == 2


def test_debug_shows_the_libraries_info_lines() -> None:
    assert sum("library chatter" in line for line in run("DEBUG", "text")) == 2


def test_text_worker_lines_name_the_pid() -> None:
    first = run("INFO", "text", "worker")[0]
    assert re.fullmatch(
        r"\S+ \S+ INFO cnnserve\.gateway\.server\[\d+\]: gateway on 127\.0\.0\.1", first
    )


def test_json_is_one_object_per_line_with_request_fields_and_exceptions() -> None:
    lines = run("DEBUG", "json")
    entries = [json.loads(line) for line in lines]  # every line parses on its own
    levels = ["INFO", "INFO", "WARNING", "ERROR", "DEBUG"] + ["INFO", "WARNING"] * 2
    assert [e["level"] for e in entries] == levels
    for entry in entries:
        assert RFC3339_UTC.fullmatch(entry["time"])
        assert "pid" not in entry
    started, access, warning, failure, debug = entries[:5]
    assert started == {
        "time": started["time"],
        "level": "INFO",
        "logger": "cnnserve.gateway.server",
        "message": "gateway on 127.0.0.1",
    }
    # The record's fields, those set (queue_ms was None: left out).
    assert {k: access[k] for k in ("request_id", "status", "items", "latency_ms")} == {
        "request_id": "id-1",
        "status": "200",
        "items": 2,
        "latency_ms": 1.5,
    }
    assert "queue_ms" not in access
    assert warning["message"] == "two\nlines, één"
    assert failure["message"] == "batch failed"
    assert failure["exception"].startswith("Traceback (most recent call last):")
    assert failure["exception"].endswith("ZeroDivisionError: division by zero")
    assert debug["message"] == "details"


def test_json_worker_lines_carry_the_pid() -> None:
    entry = json.loads(run("INFO", "json", "worker")[0])
    assert isinstance(entry["pid"], int)


@pytest.mark.parametrize("value", ["debug", "Warning", "ERROR"])
def test_log_level_setting_takes_any_case(value: str) -> None:
    assert Settings(log_level=value).log_level == value.upper()


def test_bad_log_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="log_level"):
        Settings(log_level="LOUD")
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


def test_serve_and_every_process_it_spawns_write_json(
    model_repository: Path, tmp_path: Path
) -> None:
    """Two frontends and the batching process behind a supervisor: each writes JSON lines,
    with its pid; an HTTP request's access record comes from the frontend that served it."""
    with gateway_process(
        "onnxruntime",
        tmp_path / "gateway.log",
        model_repository=model_repository,
        gateway_processes=2,
        device="cpu",
        log_format="json",
        access_log=True,
    ) as gateway:
        reply = httpx.get(
            f"http://{gateway.http_target}/v2/models/convnet",
            headers={"x-request-id": "json-serve"},
            timeout=30,
        )
        assert reply.status_code == 200
        wait_until(lambda: "json-serve" in gateway.output(), 10.0, "the access record")
        time.sleep(0.1)  # the rest of that line
        text = gateway.output()
    lines = [line for line in text.splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, not_json
    entries = [json.loads(line) for line in lines]
    (access,) = [e for e in entries if e.get("request_id") == "json-serve"]
    assert access["logger"] == "cnnserve.access"
    assert (access["status"], access["transport"]) == ("200", "http")
    workers = {e["pid"] for e in entries if "pid" in e}
    # Two frontends and the batching process; the supervisor's own lines carry no pid.
    assert len(workers) >= 3, workers
    assert any("pid" not in e for e in entries)
