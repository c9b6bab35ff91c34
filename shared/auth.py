"""API keys with ordered roles: read < write < admin. Clients send the secret in `X-API-Key`."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader

from shared.errors import Forbidden, Unauthorized
from shared.settings import Settings

log = logging.getLogger(__name__)


class Role(IntEnum):
    read = 1
    write = 2
    admin = 3


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    role: Role
    secret: bytes


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: Role


class ApiKeyConfigError(ValueError):
    pass


def parse_api_keys(raw: str) -> list[ApiKey]:
    """Parse `key_id:role:secret,...`; a malformed entry stops the service at start, never silently."""
    keys: list[ApiKey] = []
    for n, entry in enumerate(e.strip() for e in raw.split(",")):
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[2]:
            raise ApiKeyConfigError(f"API_KEYS entry {n}: expected key_id:role:secret")
        key_id, role, secret = parts
        if role not in Role.__members__:
            raise ApiKeyConfigError(f"API_KEYS entry {n} ({key_id}): role {role!r} is not read, write or admin")
        if len(secret) < 16:
            raise ApiKeyConfigError(f"API_KEYS entry {n} ({key_id}): secret shorter than 16 characters")
        keys.append(ApiKey(key_id, Role[role], secret.encode()))
    return keys


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.disabled = settings.auth_disabled
        self.keys = parse_api_keys(settings.api_keys.get_secret_value())
        if self.disabled:
            if settings.environment == "production":
                raise ApiKeyConfigError("AUTH_DISABLED=true is refused when ENVIRONMENT=production")
            log.warning("AUTH_DISABLED=true: every request is treated as admin; for local runs only")
        elif not self.keys:
            log.warning("API_KEYS is empty: every request will get 401")

    def authenticate(self, presented: str | None) -> Principal:
        if self.disabled:
            return Principal("anonymous", Role.admin)
        if not presented:
            raise Unauthorized("missing X-API-Key header")
        candidate = presented.encode()
        found: ApiKey | None = None
        # Compare against every key, without stopping early, so timing says nothing about which matched.
        for key in self.keys:
            if hmac.compare_digest(candidate, key.secret) and found is None:
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return Principal(found.key_id, found.role)


_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key secret")


class RoleCheck:
    """The dependency `require(role)` adds to a route: authenticates the key and checks its role. It names the
    role it needs, so `document_roles` can state it in the OpenAPI document."""

    def __init__(self, role: Role) -> None:
        self.role = role

    async def __call__(self, request: Request, presented: Annotated[str | None, Depends(_header)]) -> Principal:
        auth: Authenticator = request.app.state.auth
        principal = auth.authenticate(presented)
        if principal.role < self.role:
            raise Forbidden(f"key {principal.key_id!r} has role {principal.role.name}; this needs {self.role.name}")
        request.state.principal = principal
        return principal


def require(role: Role) -> object:
    return Depends(RoleCheck(role))


# The OpenAPI extension every operation carries: the role it needs (read, write, admin) or `public`.
REQUIRED_ROLE = "x-required-role"
PUBLIC = "public"


def route_role(route: APIRoute) -> Role | None:
    """The role a route's dependencies require (None: no key is checked)."""
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if isinstance(dependant.call, RoleCheck):
            return dependant.call.role
        stack.extend(dependant.dependencies)
    return None


def document_roles(app: FastAPI) -> None:
    """Put `x-required-role` on every operation of the app's OpenAPI document, from the route's own auth
    dependency: what a route enforces is what its schema says (tests/faults/test_auth_matrix.py holds every
    operation of every service to it)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        schema = original()
        for route in app.routes:
            if isinstance(route, APIRoute) and route.include_in_schema:
                role = route_role(route)
                for method in route.methods or ():
                    operation = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
                    if operation is not None:
                        operation[REQUIRED_ROLE] = role.name if role is not None else PUBLIC
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


ReadKey = Annotated[Principal, require(Role.read)]
WriteKey = Annotated[Principal, require(Role.write)]
AdminKey = Annotated[Principal, require(Role.admin)]
