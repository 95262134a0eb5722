"""TorchServe's config.properties and log4j2.xml, as written from cnnserve's settings."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from cnnserve.settings import Settings
from cnnserve.torchserve_engine.config import LOG_FILES, config_properties, log4j2_xml

ARCHIVES = ["convnet.1.mar", "fcn.1.mar"]


def properties(settings: Settings, store: Path) -> dict[str, str]:
    text = config_properties(settings, store, ARCHIVES)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_defaults_are_safe(tmp_path: Path) -> None:
    props = properties(Settings(), tmp_path)
    assert props["inference_address"] == "http://127.0.0.1:8080"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["metrics_address"] == "http://127.0.0.1:8082"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("7070", "7071")
    assert props["disable_token_authorization"] == "false"
    # Registration is on (the gateway registers versions), for archives in the store only:
    # no URL matches allowed_urls, so TorchServe downloads nothing.
    assert props["enable_model_api"] == "true"
    assert re.fullmatch(props["allowed_urls"], "https://example.com/evil.mar") is None
    assert re.fullmatch(props["allowed_urls"], "file:///tmp/evil.mar") is None
    assert props["enable_envvars_config"] == "false"
    assert props["load_models"] == "convnet.1.mar,fcn.1.mar"
    assert props["model_store"] == str(tmp_path.resolve())
    # An FCN batch of 32 images of 512×512 answers 128 MiB of scores; TorchServe allows 6.5 MB.
    assert int(props["max_request_size"]) >= 32 * 4 * 512 * 512 * 4
    assert int(props["max_response_size"]) >= 32 * 4 * 512 * 512 * 4


def test_settings_flow_into_the_file(tmp_path: Path) -> None:
    settings = Settings(
        torchserve_host="0.0.0.0",
        torchserve_inference_port=9180,
        torchserve_grpc_inference_port=9170,
        torchserve_token_auth=False,
        torchserve_workers_per_model=2,
        torchserve_initial_worker_port=9500,
        torchserve_max_message_bytes=100 * 2**20,
        torchserve_token_expiration_min=30,
        torchserve_response_timeout_s=45,
        torchserve_call_timeout_s=7.5,
    )
    props = properties(settings, tmp_path)
    assert props["inference_address"] == "http://0.0.0.0:9180"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert (props["grpc_inference_address"], props["grpc_inference_port"]) == ("0.0.0.0", "9170")
    # Management stays on loopback whatever the host: never reachable from outside.
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "true"
    assert props["default_workers_per_model"] == "2"
    assert props["initial_worker_port"] == "9500"
    assert props["max_request_size"] == props["max_response_size"] == str(100 * 2**20)
    assert props["token_expiration_min"] == "30.0"
    # TorchServe's worker timeout; the gateway's own call timeout is no TorchServe setting.
    assert props["default_response_timeout"] == "45"
    assert "7.5" not in props.values()


def test_an_empty_store_registers_nothing_at_start(tmp_path: Path) -> None:
    text = config_properties(Settings(), tmp_path, [])
    assert "load_models=\n" in text


def test_ipv6_hosts_are_bracketed_in_urls(tmp_path: Path) -> None:
    props = properties(Settings(torchserve_host="::1"), tmp_path)
    assert props["inference_address"] == "http://[::1]:8080"
    assert props["grpc_inference_address"] == "::1"


def test_log_configuration_writes_each_line_once(tmp_path: Path) -> None:
    root = ET.fromstring(log4j2_xml(tmp_path))
    appenders = {element.get("name"): element for element in root.iter("RollingFile")}
    for name in LOG_FILES:
        assert appenders[name].get("fileName") == str(tmp_path / f"{name}.log")
    loggers = root.find("Loggers")
    assert loggers is not None
    named = loggers.findall("Logger")
    # A logger with its own appender must not also pass its lines up to the root's appenders
    # (TorchServe's default does, so ts_log gets every server line twice).
    for logger in named:
        if logger.findall("AppenderRef"):
            assert logger.get("additivity") == "false", logger.get("name")
    assert not any(logger.get("name") == "org.pytorch.serve" for logger in named)
    root_refs = {ref.get("ref"): ref.get("level") for ref in loggers.iterfind("Root/AppenderRef")}
    assert root_refs == {"ts_log": None, "console": "warn"}
