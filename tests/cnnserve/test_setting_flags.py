"""Every setting is a flag of ``serve`` and ``config``; ``config`` says where each value came
from; unknown ``CNNSERVE_*`` variables are warned about; a refused value is one line naming
its flag or variable, in every command that reads the settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

from cnnserve.cli import app
from cnnserve.setting_flags import ALIASES, OTHER_VARIABLES, flag, secret_names, variable
from cnnserve.settings import Settings
from tests.images import digit_png

REPO = Path(__file__).resolve().parents[2]


def _options(command: str) -> dict[str, TyperOption]:
    """The options of ``cnnserve <command>``, by each of their names."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    params = group.commands[command].params
    return {
        name: param
        for param in params
        if isinstance(param, TyperOption)
        for name in (*param.opts, *param.secondary_opts)
    }


@pytest.fixture(autouse=True)
def no_cnnserve_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``CNNSERVE_*`` variable of the environment running the tests (``CliRunner``'s
    ``env`` only adds variables)."""
    for key in list(os.environ):
        if key.startswith("CNNSERVE_"):
            monkeypatch.delenv(key)


def _run(*args: str, **env: str) -> tuple[int, str, str]:
    """``cnnserve *args`` with the ``CNNSERVE_*`` variables ``env``."""
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("command", ["serve", "config"])
def test_every_setting_but_the_secrets_is_a_flag(command: str) -> None:
    options = _options(command)
    secrets = set(secret_names())
    assert secrets == {"api_key"}
    for name, field in Settings.model_fields.items():
        if name in secrets:
            assert flag(name) not in options
            continue
        option = options[flag(name)]
        assert option.help and (field.description or "")[:20] in option.help
        assert variable(name) in option.help
        if field.annotation is bool:
            assert option.secondary_opts == [f"--no-{flag(name)[2:]}"]
        for alias in ALIASES.get(name, ()):
            assert options[alias] is option


def test_list_settings_repeat_and_choices_are_listed() -> None:
    options = _options("serve")
    assert options["--load-model"].multiple
    assert options["--cuda-graph-batch-sizes"].multiple
    code, out, _ = _run("serve", "--help", COLUMNS="200")
    assert code == 0
    assert "<torchserve|onnxruntime|torchscript>" in out
    assert "(default 8001; env CNNSERVE_GRPC_PORT)" in out
    # Rich markup would have swallowed the bracketed part of these.
    assert "[1,2,4,8,16,32]" in out


@pytest.mark.parametrize("command", [["serve"], ["predict"], ["config"], []])
def test_help_shows_no_type_beside_on_off_flags(command: list[str]) -> None:
    code, out, _ = _run(*command, "--help", COLUMNS="200")
    assert code == 0
    assert "<bool>" not in out
    assert "--help" in out


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    code, out, _ = _run("--version")
    assert (code, out) == (0, f"cnnserve {version('cnnserve')}\n")


def test_completion_is_offered_and_completes_commands_and_setting_flags() -> None:
    code, out, _ = _run("--help", COLUMNS="200")
    assert code == 0
    assert "--install-completion" in out and "--show-completion" in out
    # What the installed bash completion script asks the installed command.
    script = str(Path(sys.executable).with_name("cnnserve"))
    for words, expected in (("cnnserve ser", "serve"), ("cnnserve serve --grpc-p", "--grpc-port")):
        proc = subprocess.run(
            [script],
            env={**os.environ, "_CNNSERVE_COMPLETE": "complete_bash", "COMP_WORDS": words,
                 "COMP_CWORD": str(len(words.split()) - 1)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.stdout.split() == [expected], proc.stderr


def test_config_names_the_source_of_each_value() -> None:
    code, out, err = _run(
        "config", "--json", "--grpc-port", "9001", "--tls-cert", "c.pem", "--tls-key", "k.pem",
        "--no-adaptive-batch-delay",
        CNNSERVE_HTTP_PORT="9000", CNNSERVE_API_KEY="s3cret", CNNSERVE_LOAD_MODELS='["fcn"]',
        CNNSERVE_MODEL_CONTROL_MODE="explicit",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""
    shown = json.loads(out)
    assert set(shown) == set(Settings.model_fields)
    assert shown["grpc_port"] == {"value": 9001, "source": "flag", "from": "--grpc-port"}
    assert shown["tls_cert_file"]["source"] == "flag"
    assert shown["adaptive_batch_delay"] == {
        "value": False,
        "source": "flag",
        "from": "--adaptive-batch-delay",
    }
    assert shown["http_port"] == {
        "value": 9000,
        "source": "environment",
        "from": "CNNSERVE_HTTP_PORT",
    }
    assert shown["load_models"]["value"] == ["fcn"]
    assert shown["metrics_port"] == {"value": 8002, "source": "default"}
    assert shown["api_key"] == {"value": "set", "source": "environment", "from": "CNNSERVE_API_KEY"}
    assert "s3cret" not in out


def test_config_prints_one_line_per_setting() -> None:
    code, out, _ = _run("config", "--metrics-port", "9102", CNNSERVE_MAX_BATCH_SIZE="16")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(Settings.model_fields)
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}
    assert rows["metrics_port"] == "9102  (flag --metrics-port)"
    assert rows["max_batch_size"] == "16  (environment CNNSERVE_MAX_BATCH_SIZE)"
    assert rows["host"] == "127.0.0.1  (default)"
    assert rows["api_key"] == "unset  (default)"


def test_unknown_variables_are_warned_about_with_the_closest_setting() -> None:
    code, _, err = _run(
        "config", CNNSERVE_MAX_BATCH="8", CNNSERVE_ZZZ="1", CNNSERVE_CLIENT_API_KEY="k"
    )
    assert code == 0
    assert err.splitlines() == [
        "warning: CNNSERVE_MAX_BATCH matches no cnnserve setting and is ignored "
        "(did you mean CNNSERVE_MAX_BATCH_SIZE?)",
        "warning: CNNSERVE_ZZZ matches no cnnserve setting and is ignored",
    ]


def test_every_variable_the_project_names_is_a_setting_or_known() -> None:
    """The variables read outside the settings are listed, so they are never warned about;
    a new one found here belongs in OTHER_VARIABLES or Settings."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    code = [
        REPO / name
        for name in tracked
        if re.search(r"\.(py|sh|ya?ml|toml|json)$|Makefile|Dockerfile", name)
        and (REPO / name).is_file()
        and REPO / name != Path(__file__)  # this file names unknown ones on purpose
    ]
    pattern = r"(?<![A-Z0-9_])CNNSERVE_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_<*])"
    named = {found for path in code for found in re.findall(pattern, path.read_text())}
    settings = {variable(name) for name in Settings.model_fields}
    assert named - settings - {"CNNSERVE_"} <= set(OTHER_VARIABLES)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["config"],
            {"CNNSERVE_HTTP_PORT": "eighty"},
            "error: CNNSERVE_HTTP_PORT: Input should be a valid integer, unable to parse "
            "string as an integer",
        ),
        (
            ["config", "--max-batch-size", "0"],
            {},
            "error: --max-batch-size: Input should be greater than or equal to 1",
        ),
        (
            ["config", "--tls-cert", "c.pem"],
            {},
            "error: tls_cert_file and tls_key_file must be set together",
        ),
        (
            ["serve", "--backend", "onnxruntime"],
            {"CNNSERVE_EVENT_LOOP": "trio"},
            "error: CNNSERVE_EVENT_LOOP: Input should be 'uvloop' or 'asyncio'",
        ),
        (
            ["torchserve", "status"],
            {"CNNSERVE_HTTP_PORT": "eighty"},
            "error: CNNSERVE_HTTP_PORT: Input should be a valid integer",
        ),
        (
            ["archive"],
            {"CNNSERVE_DRAIN_GRACE_S": "-1"},
            "error: CNNSERVE_DRAIN_GRACE_S: Input should be greater than or equal to 0",
        ),
    ],
)
def test_a_refused_setting_is_one_line_naming_its_flag_or_variable(
    args: list[str], env: dict[str, str], message: str
) -> None:
    code, out, err = _run(*args, **env)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(message)
    assert out == ""


def test_predict_with_a_malformed_port_variable_is_one_line(tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(0)[0])
    proc = subprocess.run(
        [sys.executable, "-m", "cnnserve", "predict", "--http", str(image)],
        env={**os.environ, "CNNSERVE_HTTP_PORT": "80a"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: CNNSERVE_HTTP_PORT: Input should be a valid integer, unable to parse string "
        "as an integer\n"
    )
