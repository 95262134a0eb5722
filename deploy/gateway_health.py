"""The gateway image's HEALTHCHECK (deploy/Dockerfile, target ``gateway``): exit 0 while the
gateway in this container is ready, 1 otherwise, one line on stderr saying why.

It reads the gateway's own settings (the same ``CNNSERVE_*`` variables), so it follows them:

- plaintext: ``GET http://127.0.0.1:<http_port>/v2/health/ready`` (every model loaded and
  its backend answering); health needs no API key;
- TLS (``tls_cert_file``): the same over HTTPS. The certificate is not verified: the check
  asks this container's own gateway whether it is ready, not who it is, and the certificate
  names the service's public name, not 127.0.0.1;
- mutual TLS (``tls_client_ca_file`` too): no client certificate is at hand here, so the
  handshake on the HTTP port would be refused. The check asks the metrics port instead, which
  stays plaintext and answers the same ``/v2/health/ready`` (docs/deployment.md, "TLS and the
  health checks").
"""

from __future__ import annotations

import ssl
import sys
import urllib.request

from cnnserve.settings import Settings

#: Seconds the one request may take; the image's HEALTHCHECK allows 5.
TIMEOUT_S = 4.0


def health_url(settings: Settings) -> tuple[str, ssl.SSLContext | None]:
    """The URL the check fetches for ``settings``, and the TLS context it needs (or None)."""
    if settings.tls_client_ca_file is not None:
        return f"http://127.0.0.1:{settings.metrics_port}/v2/health/ready", None
    if settings.tls_enabled:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return f"https://127.0.0.1:{settings.http_port}/v2/health/ready", context
    return f"http://127.0.0.1:{settings.http_port}/v2/health/ready", None


def main() -> int:
    """Fetch the health URL once: 0 on 200, else 1 with the reason on stderr."""
    url, context = health_url(Settings())
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as reply:
            status = reply.status
    except (OSError, ValueError) as exc:
        print(f"not healthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"not healthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
