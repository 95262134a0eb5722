"""The web page for people: ``GET /`` and its script, style sheet and icon under ``/ui/``.

The page (``web/`` beside this module, shipped as package data) is plain HTML, CSS and
JavaScript, served by the gateway itself: no build step, nothing from another site. It calls
the gateway's own routes — the repository index and model metadata for the models and their
versions, ``/predict/{model}`` for answers, ``/predict/{model}/features`` for feature maps,
``/demo/scene.png`` for scenes — with the API key the person enters, which the page keeps in
the tab's ``sessionStorage`` only. The page itself is public (:func:`.auth.is_page`): it holds
no data and runs no inference.

The files are read once, when the app is made: a request names one of them or gets 404, so no
request reaches the file system.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Response
from starlette.exceptions import HTTPException

#: The page's files. The module's own path is resolved first: an editable install links each
#: file of the package from elsewhere, and the folder must be the one beside the real module.
WEB_DIR = Path(__file__).resolve().parent / "web"
#: What ``/`` answers.
PAGE = "index.html"
#: Media type of each kind of file the page is made of.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: Browsers ask again each time (the files are small) and so never keep a script of an older
#: gateway beside a newer page.
CACHE_CONTROL = "no-cache"


@dataclass(frozen=True)
class Asset:
    """One file of the page, as served."""

    body: bytes
    media_type: str

    def response(self) -> Response:
        """The file, with its media type and caching rule."""
        return Response(
            self.body, media_type=self.media_type, headers={"cache-control": CACHE_CONTROL}
        )


def read_assets() -> dict[str, Asset]:
    """Every file of the page, by name."""
    return {
        path.name: Asset(path.read_bytes(), MEDIA_TYPES[path.suffix])
        for path in sorted(WEB_DIR.iterdir())
        if path.suffix in MEDIA_TYPES
    }


def web_router() -> APIRouter:
    """``GET /`` (the page) and ``GET /ui/{name}`` (its files); left out of the OpenAPI
    description, which describes the API programs call."""
    files = read_assets()
    page = files[PAGE]
    unknown = f"no such file in the web page; its files: {', '.join(files)}"
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def web_page() -> Response:
        return page.response()

    @router.get("/ui/{name}")
    async def web_asset(name: str) -> Response:
        asset = files.get(name)
        if asset is None:
            raise HTTPException(404, unknown)
        return asset.response()

    return router
