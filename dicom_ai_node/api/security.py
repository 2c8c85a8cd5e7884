"""Cookie, CSRF, Host allow-list and response-header policy of the admin API (DESIGN.md, "Control plane").

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


# Orchestrators probe these by pod or host IP, which no admin lists; they reveal no more than liveness.
HOST_CHECK_EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})


def host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower-case: "[::1]:8080" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def host_allowed(name: str, allowed_hosts: tuple[str, ...] | list[str]) -> bool:
    for allowed in allowed_hosts:
        if allowed == "*" or name == allowed:
            return True
        if allowed.startswith("*.") and name.endswith(allowed[1:]):
            return True
    return False


class HostAllowListMiddleware:
    """Answers 400 "host not allowed" to requests whose Host header names none of the allowed hosts.

    DNS rebinding: a page on evil.example re-points its own name at 127.0.0.1 and then calls the API as a
    same-origin page; its requests still say "Host: evil.example", which this refuses. A missing Host
    header (HTTP/1.0) is refused as well.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] | list[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in HOST_CHECK_EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if host_allowed(host_name(header), self.allowed_hosts):
            await self.app(scope, receive, send)
            return
        body = b'{"detail":"host not allowed"}'
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
