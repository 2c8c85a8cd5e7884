"""Cookie, CSRF and response-header policy of the admin API (DESIGN.md, "Control plane").

The page is same-origin, script-free HTML plus /static files, so a strict Content-Security-Policy costs
nothing and turns an injected string into inert text. API answers are never cached: they carry job and
series state an admin expects to be current, and a shared cache must not keep them.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "ainode_session"
CSRF_HEADER = "X-CSRF-Token"
# Unsafe methods are the ones a cross-site form or script could send with the victim's cookie.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
_NO_STORE_PREFIXES = ("/api", "/metrics", "/openapi.json")


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response (errors included), replacing any same-named ones."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        extra = list(_HEADERS)
        if path.startswith(_NO_STORE_PREFIXES):
            extra.append((b"cache-control", b"no-store"))
        names = {name for name, _ in extra}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = kept + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)
