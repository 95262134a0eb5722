"""Every setting as a command-line flag, read with the environment, and where each value came
from.

:class:`~cnnserve.settings.Settings` is the one list of settings: :func:`with_setting_flags`
gives a command one option per field (``--grpc-port`` for ``grpc_port``, booleans as
``--x/--no-x``, lists repeatable, a ``Literal`` as its choices, help and default from the
field), so a field added there is a flag of ``cnnserve serve`` and ``cnnserve config`` with no
edit here. Secrets (``SecretStr`` fields) get no flag: a command line shows in the process list,
so they come from the environment alone.

:func:`read_settings` is how every command reads its settings: it warns on stderr about each
``CNNSERVE_*`` variable that names no setting (a typo would otherwise be silently ignored) and
turns a value pydantic refuses into one line naming the flag or variable it came from.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import os
import re
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

if TYPE_CHECKING:
    from cnnserve.settings import Settings

PREFIX = "CNNSERVE_"

#: Names the flags had before they were generated from the settings, kept working.
ALIASES: dict[str, tuple[str, ...]] = {
    "tls_cert_file": ("--tls-cert",),
    "tls_key_file": ("--tls-key",),
    "tls_client_ca_file": ("--tls-client-ca",),
    "load_models": ("--load-model",),
}

#: ``CNNSERVE_*`` variables that are read outside the settings, so never warned about.
OTHER_VARIABLES: dict[str, str] = {
    "CNNSERVE_CLIENT_API_KEY": "the API key `cnnserve predict` sends",
    "CNNSERVE_BIND_ADDRESS": "the host address docker-compose.yml publishes the ports on",
    "CNNSERVE_SCREENSHOTS": "where the web page tests save their screenshots",
    "CNNSERVE_QUICKSTART": "runs the README's quick-start test (make quickstart-test)",
}

#: The help panel the generated flags are listed in.
PANEL = "Settings (each also CNNSERVE_<NAME>)"

Source = Literal["default", "environment", "flag"]


def variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return PREFIX + name.upper()


def flag(name: str) -> str:
    """The flag of setting ``name``."""
    return "--" + name.replace("_", "-")


def _settings_class() -> type[Settings]:
    from cnnserve.settings import Settings

    return Settings


def _is_secret(field: FieldInfo) -> bool:
    return SecretStr in (field.annotation, *get_args(field.annotation))


def secret_names() -> list[str]:
    """The settings that are environment-only."""
    return [n for n, f in _settings_class().model_fields.items() if _is_secret(f)]


def _value_type(annotation: Any) -> Any:
    """The type a flag parses: ``X | None`` → ``X``."""
    if get_origin(annotation) in (Union, types.UnionType):
        (inner,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return inner
    return annotation


def shown(value: Any) -> str:
    """A setting's value as the help and ``cnnserve config`` print it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps([str(v) if isinstance(v, Path) else v for v in value])
    return str(value)


#: What rich, which draws typer's help, reads as a markup tag: ``[tracing]`` in
#: ``cnnserve[tracing]`` would vanish from the help unless escaped.
_MARKUP_TAG = re.compile(r"(\[[a-z#/@][^[]*?])")


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    kind = _value_type(field.annotation)
    declarations = (
        (f"{flag(name)}/--no-{flag(name)[2:]}",)
        if kind is bool
        else (flag(name), *ALIASES.get(name, ()))
    )
    default = shown(field.get_default(call_default_factory=True))
    described = _MARKUP_TAG.sub(r"\\\1", field.description or "")
    help_text = f"{described} (default {default}; env {variable(name)})"
    option = typer.Option(*declarations, help=help_text, show_default=False, rich_help_panel=PANEL)
    # None: not given, so the environment or the field's default decides.
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[kind | None, option],
    )


def setting_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per setting that may be a flag (all but the secrets)."""
    return [
        _parameter(name, field)
        for name, field in _settings_class().model_fields.items()
        if not _is_secret(field)
    ]


def with_setting_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give a typer ``command(flags, ...)`` one option per setting: it is called with
    ``flags``, the settings given on the command line, and its own parameters."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    generated = setting_parameters()
    names = {p.name for p in generated}

    @functools.wraps(command)
    def wrapper(**values: Any) -> None:
        # An unrepeated list option arrives empty: not given.
        flags = {n: values.pop(n) for n in names if values.get(n) not in (None, [], ())}
        for name in names:
            values.pop(name, None)
        command(flags, **values)

    del wrapper.__wrapped__  # typer must see the generated signature, not the command's
    parameters = [*own, *generated]
    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def unknown_variables(environ: Mapping[str, str]) -> Iterator[str]:
    """A warning for each ``CNNSERVE_*`` variable that matches no setting, naming the closest
    setting's variable when one is close."""
    names = list(_settings_class().model_fields)
    known = {variable(name) for name in names}
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(PREFIX) or upper in known or upper in OTHER_VARIABLES:
            continue
        # Compared without the prefix every name shares, which would make any two look close.
        close = difflib.get_close_matches(upper.removeprefix(PREFIX).lower(), names, n=1)
        hint = f" (did you mean {variable(close[0])}?)" if close else ""
        yield f"warning: {key} matches no cnnserve setting and is ignored{hint}"


def source_of(name: str, flags: Mapping[str, Any], environ: Mapping[str, str]) -> Source:
    """Where setting ``name``'s effective value came from."""
    if name in flags:
        return "flag"
    # pydantic-settings matches variable names whatever their case.
    if any(key.upper() == variable(name) for key in environ):
        return "environment"
    return "default"


def _origin(name: str, flags: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """The flag or variable a value of ``name`` came from, for an error message."""
    source = source_of(name, flags, environ)
    return {"flag": flag(name), "environment": variable(name), "default": name}[source]


def error_line(exc: ValidationError, flags: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """A refused settings value as one line: what is wrong, with each flag or variable."""
    fields = _settings_class().model_fields
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        location = [str(part) for part in error["loc"]]
        if location and location[0] in fields:
            name = location[0]
            problems.append(f"{_origin(name, flags, environ)}: {message}")
        else:
            problems.append(message)
    return "; ".join(problems)


def read_settings(flags: Mapping[str, Any] | None = None) -> Settings:
    """The settings from ``flags`` over the environment; each unknown ``CNNSERVE_*`` variable
    warned about on stderr; a refused value is one ``error:`` line and exit status 2."""
    given = dict(flags or {})
    for warning in unknown_variables(os.environ):
        typer.echo(warning, err=True)
    try:
        return _settings_class()(**given)
    except ValidationError as exc:
        typer.echo(f"error: {error_line(exc, given, os.environ)}", err=True)
        raise typer.Exit(2) from None
