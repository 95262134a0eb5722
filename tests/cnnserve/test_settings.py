"""Settings parse from the environment as documented and refuse nonsense."""

from __future__ import annotations

import pydantic
import pytest

from cnnserve.settings import Settings


def test_cuda_graph_buckets_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNSERVE_CUDA_GRAPH_BATCH_SIZES", "[1,2,4,8]")
    assert Settings().cuda_graph_batch_sizes == [1, 2, 4, 8]


def test_performance_defaults_are_the_measured_ones() -> None:
    # docs/benchmarks.md, "Defaults chosen from these figures"; read from the class, so no
    # CNNSERVE_* variable of the environment running the tests leaks in.
    defaults = {
        name: field.get_default(call_default_factory=True)
        for name, field in Settings.model_fields.items()
    }
    assert defaults["adaptive_batch_delay"] is True
    assert defaults["max_batch_delay_ms"] == 2.0
    assert defaults["inference_threads"] == 1
    assert defaults["event_loop"] == "uvloop"
    assert defaults["gateway_processes"] == 1
    assert defaults["cuda_graph_batch_sizes"] == []
    assert defaults["device_preprocess"] is True


@pytest.mark.parametrize(
    ("name", "value"),
    [("gateway_processes", 0), ("inference_threads", -1), ("event_loop", "trio")],
)
def test_impossible_values_are_refused(name: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError, match=name):
        Settings(**{name: value})  # type: ignore[arg-type]


def test_torchserves_worker_timeout_and_the_gateways_call_timeout_are_set_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fields = Settings.model_fields
    # Both default to TorchServe's own 120 s, as when one setting served both.
    assert fields["torchserve_response_timeout_s"].get_default() == 120
    assert fields["torchserve_call_timeout_s"].get_default() == 120.0
    monkeypatch.setenv("CNNSERVE_TORCHSERVE_CALL_TIMEOUT_S", "2.5")
    monkeypatch.setenv("CNNSERVE_TORCHSERVE_RESPONSE_TIMEOUT_S", "300")
    settings = Settings()
    assert settings.torchserve_call_timeout_s == 2.5
    assert settings.torchserve_response_timeout_s == 300
    with pytest.raises(pydantic.ValidationError, match="torchserve_call_timeout_s"):
        Settings(torchserve_call_timeout_s=0)


def test_the_model_repository_settings_parse_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = Settings.model_fields
    assert str(defaults["model_repository"].get_default()) == "model_repository"
    assert defaults["model_control_mode"].get_default() == "none"
    monkeypatch.setenv("CNNSERVE_MODEL_REPOSITORY", "/srv/models")
    monkeypatch.setenv("CNNSERVE_MODEL_CONTROL_MODE", "explicit")
    monkeypatch.setenv("CNNSERVE_LOAD_MODELS", '["convnet", "scenes3"]')
    monkeypatch.setenv("CNNSERVE_REPOSITORY_POLL_INTERVAL_S", "2.5")
    settings = Settings()
    assert str(settings.model_repository) == "/srv/models"
    assert settings.model_control_mode == "explicit"
    assert settings.load_models == ["convnet", "scenes3"]
    assert settings.repository_poll_interval_s == 2.5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"load_models": ["convnet"]}, "load_models applies to model_control_mode explicit only"),
        ({"model_control_mode": "auto"}, "model_control_mode"),
        ({"repository_poll_interval_s": 0}, "repository_poll_interval_s"),
    ],
)
def test_model_control_settings_that_cannot_work_are_refused(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]
