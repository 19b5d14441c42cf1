"""Who is calling: `Authorization: Bearer KEY` selects the tenant (a FastAPI dependency)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from kvlib.config import DEFAULT_TENANT
from kvlib.serve.errors import ApiError


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool = False
    read_only: bool = False  # anonymous callers: may ask, never store or ingest
    key_id: str | None = None


ANONYMOUS = Caller(tenant=DEFAULT_TENANT, read_only=True)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def caller(request: Request) -> Caller:
    """The request's tenant; 401 in OpenAI's shape for a missing or unknown key."""
    token = bearer_token(request)
    settings, keys = request.app.state.settings, request.app.state.keys
    if token is None:
        if settings.allow_anonymous:
            return ANONYMOUS
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY' (create one with `kvlib keys add`)",
                       "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    info = keys.lookup(token)
    if info is None:
        raise ApiError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return Caller(tenant=info.tenant, admin=info.admin, key_id=info.id)
