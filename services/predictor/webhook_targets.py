"""What a webhook may target and how a delivery is signed: shared by the API (checked when a webhook is
created) and the delivery worker (checked again before every attempt, against the address it then connects to,
so a name that re-resolves to a private address later - DNS rebinding - is refused too).

The rule: only http(s) URLs; every address the host resolves to must be globally routable. Loopback, private,
link-local (169.254.169.254, the cloud metadata endpoint), multicast, reserved, unspecified and the other
non-global ranges are refused unless the operator sets WEBHOOK_ALLOW_PRIVATE_TARGETS=true.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from shared.errors import ValidationFailed

SIGNATURE_HEADER = "X-AICash-Signature"
TIMESTAMP_HEADER = "X-AICash-Timestamp"
EVENT_ID_HEADER = "X-AICash-Event-Id"
ATTEMPT_HEADER = "X-AICash-Delivery-Attempt"
MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(ValidationFailed):
    """The URL or the address it resolves to breaks the webhook target rule (422 in the API)."""

    code = "webhook_target_refused"


class UnresolvedTarget(TargetRefused):
    """The host did not resolve (now): at creation a 422; at delivery a failed attempt, retried like any other."""


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # as written in the URL, without brackets
    port: int
    addresses: tuple[IPAddress, ...]


def parse_url(url: str) -> SplitResult:
    """The URL's parts, or TargetRefused saying what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as exc:
        raise TargetRefused(f"url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise TargetRefused(f"url scheme {parts.scheme or '(none)'!r} is not allowed: use http:// or https://")
    if not parts.hostname:
        raise TargetRefused(f"url {url!r} has no host: use e.g. https://hooks.example.com/aicash")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("url must not carry credentials (user:password@); authenticate by the signature")
    if parts.fragment:
        raise TargetRefused("url must not have a #fragment")
    return parts


def refusal(address: IPAddress) -> str | None:
    """Why `address` may not be a webhook target, or None when it is globally routable."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),
    )
    for name, hit in checks:
        if hit:
            return f"{address} is a {name} address" if name != "not globally routable" else f"{address} is {name}"
    return None


async def resolve(host: str, port: int, timeout_seconds: float) -> tuple[IPAddress, ...]:
    """Every address `host` resolves to (a literal IP is itself), in resolver order; TargetRefused when none."""
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_seconds):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise UnresolvedTarget(f"host {host!r} did not resolve within {timeout_seconds:g} s") from None
    except OSError as exc:
        raise UnresolvedTarget(f"host {host!r} does not resolve ({exc}); use a public DNS name or IP") from None
    out: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # an IPv6 scope id is not an address
        if address not in out:
            out.append(address)
    if not out:
        raise UnresolvedTarget(f"host {host!r} resolves to no address")
    return tuple(out)


async def check_target(url: str, *, allow_private: bool, timeout_seconds: float) -> Target:
    """Parse and resolve `url` and apply the rule to every address; TargetRefused names the first refusal."""
    parts = parse_url(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    addresses = await resolve(host, port, timeout_seconds)
    if not allow_private:
        for address in addresses:
            why = refusal(address)
            if why is not None:
                shown = "" if str(address) == host else f" (host {host!r} resolves to it)"
                raise TargetRefused(
                    f"webhook target refused: {why}{shown}; only public addresses are allowed unless the "
                    "operator sets WEBHOOK_ALLOW_PRIVATE_TARGETS=true"
                )
    return Target(url, scheme, host, port, addresses)


def signature(secret: str, body: bytes) -> str:
    """The X-AICash-Signature value: `sha256=` and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: compare the header with the expected signature in constant time."""
    return hmac.compare_digest(signature(secret, body), header)
