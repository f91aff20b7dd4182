"""Style presets: everyone lists them; admins create, replace and delete those kept in the database."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Response

from schemas import StyleRequest, StyleResponse
from sd_server.api.dependencies import AdminUser, CurrentUser, StylesDep
from sd_server.api.errors import error_responses
from sd_server.domain.styles import Style
from sd_server.errors import ConflictError, ForbiddenError, NotFoundError

styles_router = APIRouter(prefix="/styles", tags=["styles"])
StyleName = Annotated[str, Path(min_length=1, max_length=100, description="The preset's name, as requests name it in `styles`.")]


def style_response(style: Style) -> StyleResponse:
    """A preset as the API shows it."""
    return StyleResponse(name=style.name, prompt=style.prompt, negative_prompt=style.negative_prompt, origin=style.origin)


@styles_router.get("")
async def list_styles(styles: StylesDep, principal: CurrentUser) -> list[StyleResponse]:
    """Every preset, from SD_STYLES_FILE and the API; name them in a request's `styles`."""
    return [style_response(style) for style in await asyncio.to_thread(styles.all)]


@styles_router.get("/{name}", responses=error_responses(NotFoundError))
async def get_style(name: StyleName, styles: StylesDep, principal: CurrentUser) -> StyleResponse:
    """One preset."""
    return style_response(await asyncio.to_thread(styles.get, name))


@styles_router.put("/{name}", responses={201: {"model": StyleResponse, "description": "Created"}, **error_responses(ForbiddenError)})
async def put_style(name: StyleName, body: StyleRequest, styles: StylesDep, admin: AdminUser, response: Response) -> StyleResponse:
    """Create or replace a preset (admin); it wins over one of the same name in SD_STYLES_FILE. 201 when new."""
    style, created = await asyncio.to_thread(styles.put, name, body.prompt, body.negative_prompt)
    response.status_code = 201 if created else 200
    return style_response(style)


@styles_router.delete("/{name}", status_code=204, responses=error_responses(ForbiddenError, NotFoundError, ConflictError))
async def delete_style(name: StyleName, styles: StylesDep, admin: AdminUser) -> Response:
    """Delete a preset set through the API (admin); 409 for one only SD_STYLES_FILE defines."""
    await asyncio.to_thread(styles.delete, name)
    return Response(status_code=204)
