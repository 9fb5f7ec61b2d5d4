"""The console's guards: the token, cross-site request forgery, response headers.

A state-changing request (a replay) must pass every check here, in this
order, or nothing happens:

1. the console has a token at all (else 403: it is read-only);
2. it does not come from another site: ``Sec-Fetch-Site`` (sent by current
   browsers) is ``same-origin`` or ``none`` and ``Origin``, when sent, is the
   console's own (else 403);
3. it carries the token (a form field, or ``Authorization: Bearer`` for the
   JSON API), compared in constant time (else 401);
4. a form also carries the CSRF token of its page, equal to the one in the
   ``SameSite=Strict`` cookie and signed with this process's key (else 403).
   The JSON API authenticates with a header, which a browser never adds to a
   cross-site request by itself, and insists on a JSON body.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The CSRF cookie and form field.
CSRF_COOKIE = "exactlyonce_csrf"
CSRF_FIELD = "csrf"
#: The form field holding the console token.
TOKEN_FIELD = "token"

#: No script, style or image from anywhere but the console; no framing; forms post only to it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # (not no-referrer: with it a browser sends "Origin: null" on the console's own form posts)
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def token_matches(given: str | None, expected: str | None) -> bool:
    """Whether ``given`` is the console token (constant time; never true without a configured token)."""
    if expected is None or not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def cross_site(request: Request) -> str | None:
    """Why ``request`` looks like it came from another site, or ``None``."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own:
            return f"Origin {origin!r} is not {own!r}"
    return None


class Csrf:
    """Signed double-submit tokens: a random nonce and its HMAC under a key of this process.

    A page puts the cookie's token into its forms; a POST must return the
    same token in the form and in the cookie, and its signature must verify,
    so a token planted by someone else (another site writing a cookie for a
    parent domain) is refused too. A restart makes older tokens invalid; the
    next page load issues a new one.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new token."""
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign(nonce)}"

    def genuine(self, token: str | None) -> bool:
        """Whether ``token`` was issued by this process."""
        if not token or "." not in token:
            return False
        nonce, _, signature = token.partition(".")
        return hmac.compare_digest(signature.encode(), self._sign(nonce).encode())

    def verify(self, cookie: str | None, field: str | None) -> bool:
        """Whether the form's token equals the cookie's, and is genuine."""
        if not cookie or not field:
            return False
        return hmac.compare_digest(cookie.encode(), field.encode()) and self.genuine(cookie)


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)
