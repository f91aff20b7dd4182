"""Checking any image for the marks generated images carry: C2PA credentials, XMP metadata, the watermark."""

from dataclasses import asdict

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from schemas import VerifyResponse
from sd_server.api.dependencies import CurrentUser, DecodingDep, ServicesDep
from sd_server.api.errors import body_validation_error, error_responses
from sd_server.api.routes.generation import VALIDATION_ERROR
from sd_server.errors import InvalidPhotoError, PayloadTooLargeError
from sd_server.storage.source_images import decode_base64

provenance_router = APIRouter(tags=["provenance"])


class VerifyRequest(BaseModel):
    """An image to verify, base64 (bare or a data: URL); or send it as the multipart file `image`."""

    image: str = Field(..., description="The image file (PNG, JPEG, WebP...) as base64.")


def verify_body() -> dict[str, object]:
    """The OpenAPI request body of /provenance/verify: the file as a multipart form, or base64 in JSON."""
    form = {"type": "object", "required": ["image"], "properties": {"image": {"type": "string", "format": "binary", "description": "The image file."}}}
    json_body = {"schema": VerifyRequest.model_json_schema()}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}, "application/json": json_body}}}


@provenance_router.post(
    "/provenance/verify",
    openapi_extra=verify_body(),
    responses={422: VALIDATION_ERROR, **error_responses(InvalidPhotoError, PayloadTooLargeError)},
)
async def verify(http_request: Request, services: ServicesDep, decoding: DecodingDep, principal: CurrentUser) -> VerifyResponse:
    """What marks an image carries, whoever made it: its C2PA credentials (is the signature valid, who signed, the
    digital source type), its XMP digital source type, and this service's invisible watermark (also after JPEG,
    resizing or a crop). Send the file as the multipart field `image` (`curl -F image=@picture.png`), or JSON
    `{"image": "<base64>"}`."""
    name, data = await uploaded_image(http_request)
    verification = await decoding.run(services.provenance.verify, data, name)
    return VerifyResponse.model_validate({**asdict(verification), "generated": verification.generated})


async def uploaded_image(http_request: Request) -> tuple[str, bytes]:
    """The file name and bytes of the image: the form's `image` file, or the JSON body's base64 `image`; 422 at
    `image` when there is none."""
    if http_request.headers.get("content-type", "").startswith("multipart/form-data"):
        upload = (await http_request.form()).get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidPhotoError("image: send the picture as the multipart file field `image`", field="image")
        data = await upload.read()
        if not data:
            raise InvalidPhotoError("image: the file is empty", field="image")
        return upload.filename or "image", data
    try:
        body = VerifyRequest.model_validate_json(await http_request.body())
    except ValidationError as error:
        raise body_validation_error(error) from error
    return "image", decode_base64("image", body.image)
