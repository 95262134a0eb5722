"""The one logging set-up of ``cnnserve serve`` and every process it spawns.

``log_format=text`` writes the lines cnnserve always wrote
(``<time> <LEVEL> <logger>: <message>``, a worker process's logger name followed by its pid);
``json`` writes one JSON object per line — ``time`` (RFC 3339, UTC), ``level``, ``logger``,
``message``, the request's fields when the record carries them (the access log's do) and an
exception's traceback as one ``exception`` string — so a collector never has to stitch
continuation lines back together.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

#: Today's line, kept exactly: operators' greps and the tests read it.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: A worker of a multi-process gateway names its pid, so interleaved lines can be told apart.
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
#: Libraries whose INFO lines say nothing an operator acts on: the ONNX exporter's passes
#: (dozens of lines while ``cnnserve serve`` makes its default repository) and uvicorn's
#: server start/stop, said once per listener (HTTP and metrics) beside the gateway's own line
#: naming every port. Their warnings and errors still show; ``log_level=DEBUG`` shows all.
QUIET_LIBRARIES = ("onnx_ir", "onnxscript", "uvicorn.error")
#: Record attributes copied into a JSON line when set (the access log's fields, in order).
REQUEST_FIELDS = (
    "request_id",
    "transport",
    "method",
    "model",
    "version",
    "status",
    "items",
    "latency_ms",
    "queue_ms",
    "batch_size",
    "trace_id",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def __init__(self, with_pid: bool = False) -> None:
        super().__init__()
        self._with_pid = with_pid

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line; newlines inside any value are escaped by JSON."""
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._with_pid:
            entry["pid"] = record.process
        fields = record.__dict__
        for name in REQUEST_FIELDS:
            value = fields.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field of an unexpected type is written, never lost with the line.
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", log_format: str = "text", worker: bool = False) -> None:
    """Send every logger's records to stderr at ``level`` in ``log_format`` (text or json);
    ``worker``: a spawned gateway or batching process, whose lines carry its pid. Replaces
    whatever handlers the root logger had, so calling it again (a spawned process, a test)
    never doubles lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(with_pid=worker))
    elif log_format == "text":
        handler.setFormatter(logging.Formatter(WORKER_TEXT_FORMAT if worker else TEXT_FORMAT))
    else:
        raise ValueError(f"log format must be text or json, got {log_format!r}")
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet_level = logging.NOTSET if logging.getLogger().level <= logging.DEBUG else logging.WARNING
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet_level)
