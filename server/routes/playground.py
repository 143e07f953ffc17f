"""GET / and /playground/{name}: the browser playground, a page that talks to this server's own API.

The page and its assets are the files of server/playground/, read once when the app is made: plain HTML, CSS
and JavaScript with no build step and no external URL. They hold no data, so a server with API keys serves them
without one (server/gate.py); every API call the page makes carries the key the user types in it.

Each answer carries `Cache-Control: no-cache` and an ETag of its bytes: the browser asks again every time and
gets a 304 while the file is the same, so a new release shows up at the next load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import NotFound

FOLDER = Path(__file__).resolve().parent.parent / "playground"
PAGE = "index.html"
ASSET_PREFIX = "/playground/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def read(cls, path: Path) -> Asset:
        body = path.read_bytes()
        return cls(body, CONTENT_TYPES[path.suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, request: Request) -> Response:
        headers = {"Cache-Control": "no-cache", "ETag": self.etag, "X-Content-Type-Options": "nosniff"}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.content_type, headers=headers)


def asset_names(folder: Path = FOLDER) -> list[str]:
    """The files served under /playground/: those of the folder with a known content type but the page itself
    (served at /, where its relative links resolve), nothing below the folder."""
    files = (path for path in folder.iterdir() if path.is_file() and path.name != PAGE)
    return sorted(path.name for path in files if path.suffix in CONTENT_TYPES)


def playground_paths() -> set[str]:
    """Every path the playground answers: the page at / and each asset under /playground/."""
    return {"/", *(ASSET_PREFIX + name for name in asset_names())}


def playground_router() -> APIRouter:
    """The routes of the page and its assets, read from disk now; a name that is not one of the files is 404."""
    page_file = Asset.read(FOLDER / PAGE)
    assets = {name: Asset.read(FOLDER / name) for name in asset_names()}
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"])
    def page(request: Request) -> Response:
        return page_file.response(request)

    @router.api_route(ASSET_PREFIX + "{name}", methods=["GET", "HEAD"])
    def asset(name: str, request: Request) -> Response:
        if name not in assets:
            raise NotFound(f"the playground has no file {name!r}")
        return assets[name].response(request)

    return router
