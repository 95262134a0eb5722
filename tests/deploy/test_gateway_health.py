"""deploy/gateway_health.py, the gateway image's HEALTHCHECK, run as the image runs it
(``python gateway_health.py``, configured by the gateway's own ``CNNSERVE_*`` variables)
against real ``cnnserve serve`` processes: plaintext, TLS with a self-signed certificate, and
mutual TLS. Each time the check run with another mode's variables fails, so a check that did
not follow the gateway's settings would fail here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.gateway.certs import CertificateAuthority
from tests.support import free_ports, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
HEALTH = ROOT / "deploy" / "gateway_health.py"
#: How long a gateway on the demo models may take to become ready here.
READY_TIMEOUT_S = 120.0


def health(variables: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The health check with ``variables`` and none of this process's ``CNNSERVE_*``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    return subprocess.run(
        [sys.executable, str(HEALTH)],
        env={**environ, **variables},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextmanager
def serving(model_repository: Path, log: Path, **tls: Path) -> Iterator[dict[str, str]]:
    """``cnnserve serve`` (onnxruntime) on free ports with the ``tls_*`` settings ``tls``; its
    ``CNNSERVE_*`` variables, which the health check gets too, as in the container."""
    grpc_port, http_port, metrics_port = free_ports(3)
    variables = {
        "CNNSERVE_BACKEND": "onnxruntime",
        "CNNSERVE_HOST": "127.0.0.1",
        "CNNSERVE_GRPC_PORT": str(grpc_port),
        "CNNSERVE_HTTP_PORT": str(http_port),
        "CNNSERVE_METRICS_PORT": str(metrics_port),
        "CNNSERVE_MODEL_REPOSITORY": str(model_repository),
        **{f"CNNSERVE_{name.upper()}": str(path) for name, path in tls.items()},
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cnnserve", "serve"],
            env={**environ, **variables},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield variables
    finally:
        stop_process(process, 60)


def healthy_soon(variables: dict[str, str], log: Path) -> None:
    """The check passes within READY_TIMEOUT_S (the gateway loads its models first)."""

    def passes() -> bool:
        assert log.exists()
        return health(variables).returncode == 0

    wait_until(passes, READY_TIMEOUT_S, f"the health check to pass ({log})", interval_s=1.0)


def fails(variables: dict[str, str]) -> str:
    """The check fails: its one line on stderr."""
    result = health(variables)
    assert result.returncode == 1, result
    assert result.stderr.startswith("not healthy: "), result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


def test_plaintext_gateway(model_repository: Path, tmp_path: Path) -> None:
    """Plaintext: /v2/health/ready over HTTP; the TLS check would find no TLS there."""
    with serving(model_repository, tmp_path / "gateway.log") as variables:
        healthy_soon(variables, tmp_path / "gateway.log")
        certificate = {"CNNSERVE_TLS_CERT_FILE": "/nonexistent.crt"}
        certificate["CNNSERVE_TLS_KEY_FILE"] = "/nonexistent.key"
        assert "https://" in fails({**variables, **certificate})


def test_tls_gateway_with_a_self_signed_certificate(
    model_repository: Path, tmp_path: Path, ca: CertificateAuthority
) -> None:
    """TLS with a certificate that nothing trusts (the CA's own, self-signed): the check asks
    over HTTPS without verifying it; a plaintext check gets no answer it can read."""
    tls = {"tls_cert_file": ca.pem.cert, "tls_key_file": ca.pem.key}
    with serving(model_repository, tmp_path / "gateway.log", **tls) as variables:
        healthy_soon(variables, tmp_path / "gateway.log")
        plaintext = {k: v for k, v in variables.items() if not k.startswith("CNNSERVE_TLS_")}
        assert "http://" in fails(plaintext)


def test_mutual_tls_gateway_is_checked_on_the_metrics_port(
    model_repository: Path, tmp_path: Path, ca: CertificateAuthority
) -> None:
    """Mutual TLS: the check has no client certificate, so the HTTPS port refuses it in the
    handshake; it asks the plaintext metrics port's /v2/health/ready instead (the gateway's
    real readiness, not only that it runs), and passes."""
    server = ca.issue("server", server=True)
    tls = {"tls_cert_file": server.cert, "tls_key_file": server.key}
    log = tmp_path / "gateway.log"
    with serving(model_repository, log, **tls, tls_client_ca_file=ca.pem.cert) as variables:
        healthy_soon(variables, log)
        without_client_ca = {
            k: v for k, v in variables.items() if k != "CNNSERVE_TLS_CLIENT_CA_FILE"
        }
        assert "https://" in fails(without_client_ca)
