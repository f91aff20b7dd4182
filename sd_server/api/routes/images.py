"""GET /images/{name}: a stored image of the caller's, as a file or a redirect to its presigned URL."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Response
from fastapi.responses import FileResponse, RedirectResponse

from sd_server.api.dependencies import CurrentUser, JobsDep, StorageDep
from sd_server.api.errors import error_responses
from sd_server.errors import NotFoundError
from sd_server.storage.images import ImageStorage, LocalStorage

images_router = APIRouter(tags=["images"])


@images_router.get(
    "/images/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The stored PNG (local storage)."},
        307: {"description": "Redirect to a presigned URL (S3 storage)."},
        **error_responses(NotFoundError),
    },
)
async def get_image(
    name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]+\.png$")], jobs: JobsDep, storage: StorageDep, principal: CurrentUser
) -> Response:
    """A stored image of the caller's, by the name in a job's result: the file, or a redirect to its presigned URL."""
    owner = await asyncio.to_thread(jobs.owner_of_image, name)
    if owner is None or not principal.can_access(owner) or not await asyncio.to_thread(storage.exists, name):
        raise NotFoundError(f"no image '{name}'")
    return stored_image(storage, name)


def stored_image(storage: ImageStorage, key: str) -> Response:
    """A stored PNG as the answer: the file (local storage), or a redirect to its presigned URL (S3)."""
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.root / key, media_type="image/png")
    return RedirectResponse(storage.url(key), status_code=307)
