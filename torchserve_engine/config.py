"""TorchServe's server configuration, written from cnnserve's :class:`Settings`.

Two files, both regenerated on every start so they never drift from the settings:

- ``config.properties`` — the inference and metrics listeners on ``settings.torchserve_host``
  (127.0.0.1 unless configured), the management APIs (REST and gRPC) on the loopback
  interface only, whatever the host: they are never reachable from another machine or
  container. Token authorization on unless ``torchserve_token_auth`` is off; the model
  registration API on (the gateway registers and unregisters versions through it) but only
  for archives already in the model store, never from a URL; size limits raised to fit an FCN
  batch, metrics for Prometheus;
- ``log4j2.xml`` — each log line once, in files under the run directory, with only warnings
  on the console (TorchServe's default writes every server line twice into ``ts_log``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from cnnserve.settings import Settings


def _host(host: str) -> str:
    """A host as it appears in a URL (IPv6 literals need brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def loopback_for(host: str) -> str:
    """The loopback address of ``host``'s family: where the management APIs listen."""
    return "::1" if ":" in host else "127.0.0.1"


def management_address(settings: Settings) -> str:
    """The management REST API's URL: on the loopback interface, never ``torchserve_host``."""
    loopback = _host(loopback_for(settings.torchserve_host))
    return f"http://{loopback}:{settings.torchserve_management_port}"


#: ``allowed_urls``: a pattern no URL matches (an empty negative lookahead never succeeds), so
#: TorchServe downloads nothing and registers only archives named in its model store.
NO_URL = "(?!)"


def config_properties(settings: Settings, model_store: Path, archives: Sequence[str]) -> str:
    """The text of ``config.properties`` serving ``model_store``, registering ``archives``
    (file names in it; possibly none) at start."""
    host = _host(settings.torchserve_host)
    limit = settings.torchserve_max_message_bytes
    properties = {
        "inference_address": f"http://{host}:{settings.torchserve_inference_port}",
        # Management (scale workers, describe, ...) only from inside the machine/container.
        "management_address": management_address(settings),
        "metrics_address": f"http://{host}:{settings.torchserve_metrics_port}",
        "grpc_inference_address": settings.torchserve_host,
        "grpc_inference_port": settings.torchserve_grpc_inference_port,
        "grpc_management_address": loopback_for(settings.torchserve_host),
        "grpc_management_port": settings.torchserve_grpc_management_port,
        "model_store": model_store.resolve(),
        # Explicit archives, not "all": the store also holds the hidden run directory.
        "load_models": ",".join(archives),
        "default_workers_per_model": settings.torchserve_workers_per_model,
        "initial_worker_port": settings.torchserve_initial_worker_port,
        "disable_token_authorization": str(not settings.torchserve_token_auth).lower(),
        "token_expiration_min": settings.torchserve_token_expiration_min,
        # Registration runs a handler's code, so it needs the management key, listens on
        # loopback only, and takes archives from the model store alone (allowed_urls).
        "enable_model_api": "true",
        "allowed_urls": NO_URL,
        "enable_envvars_config": "false",
        "install_py_dep_per_model": "false",
        "max_request_size": limit,
        "max_response_size": limit,
        "default_response_timeout": settings.torchserve_response_timeout_s,
        "metrics_mode": "prometheus",
    }
    lines = ["# Written by cnnserve from its settings on every start; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in properties.items()]
    return "\n".join(lines) + "\n"


_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by cnnserve: each line once, files under the run directory, warnings on stdout. -->
<Configuration>
  <Appenders>
    <Console name="console" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{{ISO8601}} [%-5p] %c - %m%n"/>
    </Console>
{files}
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="info" additivity="false">
      <AppenderRef ref="access_log"/>
    </Logger>
    <Logger name="MODEL_LOG" level="info" additivity="false">
      <AppenderRef ref="model_log"/>
    </Logger>
    <Logger name="MODEL_METRICS" level="info" additivity="false">
      <AppenderRef ref="metrics_log"/>
    </Logger>
    <Logger name="TS_METRICS" level="info" additivity="false">
      <AppenderRef ref="metrics_log"/>
    </Logger>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Root level="info">
      <AppenderRef ref="ts_log"/>
      <AppenderRef ref="console" level="warn"/>
    </Root>
  </Loggers>
</Configuration>
"""

_ROLLING_FILE = """    <RollingFile name="{name}" fileName={file} filePattern={pattern}>
      <PatternLayout pattern="%d{{ISO8601}} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>"""

#: The log files TorchServe writes under the run directory's ``logs/``.
LOG_FILES = ("ts_log", "model_log", "access_log", "metrics_log")


def log4j2_xml(log_dir: Path) -> str:
    """A log4j2 configuration writing TorchServe's logs once each into ``log_dir``."""
    files = "\n".join(
        _ROLLING_FILE.format(
            name=name,
            file=quoteattr(str(log_dir / f"{name}.log")),
            pattern=quoteattr(str(log_dir / f"{name}.%i.log")),
        )
        for name in LOG_FILES
    )
    return _LOG4J2.format(files=files)
