"""``/docs``: Swagger UI on the gateway's OpenAPI document, every file of it served by the
gateway itself.

FastAPI's own ``/docs`` loads Swagger UI's script and style sheet from a CDN and starts it with
an inline script: without internet it is a blank page, and the Content-Security-Policy the
pages get (:mod:`.security_headers`: scripts from the gateway only) forbids the inline
script. So FastAPI's ``/docs`` and ``/redoc`` are off (:func:`~.http_api.create_http_app`),
and these routes serve instead:

- ``/docs``: the page, ``swagger/index.html``;
- ``/docs/swagger-initializer.js``: ours, starts Swagger UI on the URL the page names;
- ``/docs/swagger-ui-bundle.js``, ``/docs/swagger-ui.css``, ``/docs/favicon-32x32.png``:
  Swagger UI's release files as the ``fastapi-swagger`` package ships them (a dependency of
  the gateway extra, so the images have them too).

Nothing else is under ``/docs/``: those paths are public (:func:`.auth.is_page`). The files
are read when the app is made, as the web page's are (:mod:`.web`): a missing one stops the
gateway at start, saying which, and no request reaches the file system.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import fastapi_swagger.resources as swagger_ui
from fastapi import FastAPI, Response

from . import web

DOCS_PATH = "/docs"
#: Our own files, beside the real module (see :data:`.web.WEB_DIR`).
OWN_FILES = Path(__file__).resolve().parent / "swagger"
#: The files the page loads from Swagger UI's release, by name.
SWAGGER_UI_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
#: The web page's media types and the icon's: with ``nosniff``, a browser runs a script and
#: applies a style sheet only when its ``Content-Type`` says it is one.
MEDIA_TYPES = {**web.MEDIA_TYPES, ".png": "image/png"}


def docs_files() -> dict[str, Path]:
    """URL path → file, for the page and every file it loads."""
    release = Path(str(resources.files(swagger_ui)))
    return {
        DOCS_PATH: OWN_FILES / "index.html",
        f"{DOCS_PATH}/swagger-initializer.js": OWN_FILES / "swagger-initializer.js",
        **{f"{DOCS_PATH}/{name}": release / name for name in SWAGGER_UI_FILES},
    }


def add_docs(app: FastAPI) -> None:
    """Add ``/docs`` and its files to ``app``, left out of the OpenAPI document."""
    for path, file in docs_files().items():
        asset = web.Asset(file.read_bytes(), MEDIA_TYPES[file.suffix])
        app.add_api_route(path, _serve(asset), methods=["GET"], include_in_schema=False)


def _serve(asset: web.Asset) -> Callable[[], Awaitable[Response]]:
    async def endpoint() -> Response:
        return asset.response()

    return endpoint
