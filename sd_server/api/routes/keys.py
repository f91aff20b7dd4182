"""Admin routes that create, list and revoke API keys."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from schemas import KeyCreated, KeyCreateRequest, KeyInfo, WebhookSecret
from sd_server.api.dependencies import AdminUser, ServicesDep, SettingsDep
from sd_server.api.errors import error_responses
from sd_server.domain.jobs import as_utc
from sd_server.errors import ConflictError, ForbiddenError, NotFoundError
from sd_server.persistence.tables import ApiKeyRow
from sd_server.security.keys import KeyStore, principal_of

keys_router = APIRouter(prefix="/keys", tags=["keys"], responses=error_responses(ForbiddenError))


async def get_key_store(services: ServicesDep) -> KeyStore:
    """The key store of the app's authenticator."""
    return services.authenticator.keys


KeysDep = Annotated[KeyStore, Depends(get_key_store)]


@keys_router.post("", status_code=201, responses=error_responses(ConflictError))
async def create_key(body: KeyCreateRequest, admin: AdminUser, keys: KeysDep, settings: SettingsDep) -> KeyCreated:
    """Create a key for a user (or an admin); the key is in this answer only. With no key yet (SD_AUTH=auto), the
    first must be an admin's: the first key turns keys on, and someone must be able to manage them."""
    if settings.auth == "auto" and keys.count == 0 and body.role != "admin":
        raise ConflictError(
            'the first key must be an admin key: it turns keys on, and a user key alone would leave nobody to manage '
            'them; create {"user_id": "admin", "role": "admin"} first, or start with SD_ADMIN_KEY'
        )
    row, key = await asyncio.to_thread(keys.create, body.user_id, body.role, None, body.weight, body.priority)
    principal = principal_of(row)
    return KeyCreated(
        id=row.id, key=key, webhook_secret=row.webhook_secret or "", user_id=row.user_id, role=row.role,
        weight=principal.weight, priority=principal.priority,
    )  # fmt: skip


@keys_router.get("")
async def list_keys(admin: AdminUser, keys: KeysDep) -> list[KeyInfo]:
    """Every key, without the keys themselves."""
    rows = await asyncio.to_thread(keys.list)
    return [key_info(row) for row in rows]


def key_info(row: ApiKeyRow) -> KeyInfo:
    """A stored key as GET /keys lists it."""
    principal = principal_of(row)
    return KeyInfo(
        id=row.id, user_id=row.user_id, role=row.role, prefix=row.prefix, created_at=as_utc(row.created_at),
        weight=principal.weight, priority=principal.priority,
    )  # fmt: skip


@keys_router.post("/{key_id}/webhook-secret", responses=error_responses(NotFoundError))
async def rotate_webhook_secret(key_id: str, admin: AdminUser, keys: KeysDep) -> WebhookSecret:
    """Give a key a new webhook secret, in this answer only; deliveries from now on (retries too) are signed with it."""
    secret = await asyncio.to_thread(keys.rotate_webhook_secret, key_id)
    if secret is None:
        raise NotFoundError(f"no key '{key_id}'")
    return WebhookSecret(id=key_id, webhook_secret=secret)


@keys_router.delete("/{key_id}", status_code=204, responses=error_responses(NotFoundError))
async def revoke_key(key_id: str, admin: AdminUser, keys: KeysDep) -> Response:
    """Revoke a key: requests with it get 401 from now on."""
    if not await asyncio.to_thread(keys.delete, key_id):
        raise NotFoundError(f"no key '{key_id}'")
    return Response(status_code=204)
