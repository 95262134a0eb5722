"""TLS for the gateway's gRPC and HTTP listeners, from the ``tls_*`` settings.

One certificate and key serve both ports. With ``tls_client_ca_file`` set the handshake
requires a client certificate signed by that CA (mutual TLS); a client without one, or with
one from another CA, never reaches the application. The metrics port stays plaintext: it
carries no inference API and Prometheus scrapes it from inside the deployment.
"""

from __future__ import annotations

import ssl
from typing import Any

import grpc

from cnnserve.settings import Settings


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``; ``None`` when TLS is off."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def uvicorn_ssl_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for :class:`uvicorn.Config`; empty when TLS is off."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
    }
    if settings.tls_client_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.tls_client_ca_file)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def describe(settings: Settings) -> str:
    """``plaintext``, ``TLS`` or ``mutual TLS``, for the start-up log line."""
    if not settings.tls_enabled:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file is not None else "TLS"
