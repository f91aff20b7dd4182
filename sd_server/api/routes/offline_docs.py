"""ReDoc and the favicon without network: ReDoc's packaged script with its one remote image (the Redocly logo of its
side menu, fetched from a CDN) pointed at the packaged favicon, and /favicon.ico for browsers that ask for it."""

import asyncio
from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS = Path(fastapi_offline.__file__).parent / "static"  # served at /docs-assets (the app's static_url)
REMOTE_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
offline_docs_router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=1)
def redoc_script() -> str:
    """ReDoc's standalone script, its remote logo replaced by the local favicon (read once)."""
    return (ASSETS / "redoc.standalone.js").read_text(encoding="utf-8").replace(REMOTE_LOGO, "/docs-assets/favicon.png")


@offline_docs_router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """The API reference in ReDoc, every asset from this server."""
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}/openapi.json",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}/docs-redoc/redoc.standalone.js",
        with_google_fonts=False,
        redoc_favicon_url=f"{root}/docs-assets/favicon.png",
    )


@offline_docs_router.get("/docs-redoc/redoc.standalone.js")
async def redoc_js() -> Response:
    """ReDoc's script, without its remote image."""
    return Response(await asyncio.to_thread(redoc_script), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})


@offline_docs_router.get("/favicon.ico")
async def favicon() -> FileResponse:
    """The packaged favicon, for browsers that ask every site for one."""
    return FileResponse(ASSETS / "favicon.png", media_type="image/png")
