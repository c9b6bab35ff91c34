from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from shared.auth import ApiKeyConfigError, Authenticator, Role, parse_api_keys
from shared.errors import Unauthorized
from shared.settings import Settings


def test_api_keys_parse_with_ordered_roles() -> None:
    keys = parse_api_keys("a:read:aaaaaaaaaaaaaaaa, b:admin:bbbbbbbbbbbbbbbb:with:colons")
    assert [(k.key_id, k.role) for k in keys] == [("a", Role.read), ("b", Role.admin)]
    assert keys[1].secret == b"bbbbbbbbbbbbbbbb:with:colons"
    assert Role.read < Role.write < Role.admin


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("nocolons", "expected key_id:role:secret"),
        ("a:root:aaaaaaaaaaaaaaaa", "role 'root' is not read, write or admin"),
        ("a:read:short", "shorter than 16"),
    ],
)
def test_malformed_api_keys_stop_the_service(raw: str, message: str) -> None:
    with pytest.raises(ApiKeyConfigError, match=message):
        parse_api_keys(raw)


def test_authenticate_matches_secret_and_refuses_others() -> None:
    auth = Authenticator(Settings(api_keys=SecretStr("a:write:aaaaaaaaaaaaaaaa")))
    assert auth.authenticate("aaaaaaaaaaaaaaaa").key_id == "a"
    with pytest.raises(Unauthorized):
        auth.authenticate("aaaaaaaaaaaaaaab")
    with pytest.raises(Unauthorized):
        auth.authenticate(None)


def test_auth_disabled_is_admin_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        auth = Authenticator(Settings(auth_disabled=True))
    assert auth.authenticate(None).role is Role.admin
    assert "AUTH_DISABLED=true" in caplog.text


def test_auth_disabled_is_refused_in_production() -> None:
    with pytest.raises(ApiKeyConfigError, match="refused when ENVIRONMENT=production"):
        Authenticator(Settings(auth_disabled=True, environment="production"))
