"""Console authentication and the headers every response carries.

The token lives in ``<keys dir>/console.token`` (0600, 32 random bytes, URL-safe base64),
made on first use by the console service or by ``ecluster console url``. A request is let in
when it carries the token:

* ``?token=...`` in the URL (the link ``ecluster console url`` prints): answered with a
  redirect to the same URL without the token and a cookie (HttpOnly, SameSite=Strict), so
  the token does not stay in the address bar, the history or a Referer;
* the cookie, from then on;
* ``Authorization: Bearer <token>`` (scripts).

Anything else gets 401. A POST must also be same-origin: its ``Origin`` (or
``Sec-Fetch-Site``) must match the console; a POST without either is accepted only with
the Bearer header, which a browser never adds by itself (so no cross-site forgery).
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

TOKEN_FILE = "console.token"
TOKEN_BYTES = 32
COOKIE_PREFIX = "ecluster_console_"

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class TokenError(RuntimeError):
    """The token file cannot be made or read; one-line message."""


def token_path(keys_dir: Path) -> Path:
    return Path(keys_dir) / TOKEN_FILE


def ensure_token(keys_dir: Path) -> str:
    """The console token, made (0600) when the file does not exist yet. Safe against a race
    with another process making it at the same moment (exclusive create, then read)."""
    path = token_path(keys_dir)
    if not path.exists():
        try:
            Path(keys_dir).mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as e:
            raise TokenError(f"cannot create {path}: {e.strerror or e}") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
                f.flush()
                os.fsync(f.fileno())
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise TokenError(f"cannot read {path}: {e.strerror or e}") from None
    if len(token) < 16:
        raise TokenError(f"{path} holds no usable token (delete it to make a new one)")
    return token


def cookie_name(port: int) -> str:
    """Per port: cookies are not kept apart by port, and two consoles may share a host."""
    return f"{COOKIE_PREFIX}{port}"


def same_token(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, cred = value.partition(" ")
    return cred.strip() if scheme.lower() == "bearer" and cred.strip() else None


def parse_cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


def same_origin(method: str, headers: dict[str, str], scheme: str, used_bearer: bool) -> bool:
    """Whether an unsafe request comes from the console's own pages (or a script). Pure."""
    if method not in UNSAFE_METHODS:
        return True
    origin = headers.get("origin")
    if origin:
        return origin == f"{scheme}://{headers.get('host', '')}"
    site = headers.get("sec-fetch-site")
    if site:
        return site in ("same-origin", "none")
    return used_bearer


def without_token(path: str, query: str) -> str:
    """The URL to redirect to once the token became a cookie. Pure."""
    rest = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"]
    return path + ("?" + urlencode(rest) if rest else "")


class ConsoleGuard:
    """ASGI middleware: the token check, the same-origin check, the security headers."""

    def __init__(self, app, token: str, cookie: str):
        self.app = app
        self.token = token
        self.cookie = cookie

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_safe(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = scope.get("query_string", b"").decode("latin-1")
        url_token = dict(parse_qsl(query)).get("token")
        if url_token is not None:
            if not same_token(url_token, self.token):
                await self._plain(send_safe, 401, "401 unauthorized: wrong token")
                return
            location = without_token(scope.get("path", "/"), query)
            cookie = f"{self.cookie}={self.token}; HttpOnly; SameSite=Strict; Path=/"
            await send_safe({"type": "http.response.start", "status": 303,
                             "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                                         (b"content-length", b"0")]})
            await send_safe({"type": "http.response.body", "body": b""})
            return
        given_bearer = bearer(headers)
        ok = same_token(given_bearer, self.token) or \
            same_token(parse_cookies(headers.get("cookie", "")).get(self.cookie), self.token)
        if not ok:
            await self._plain(send_safe, 401, "401 unauthorized: open the URL printed by "
                                              "`ecluster console url --config FILE --manager NAME`",
                              json_api=scope.get("path", "").startswith("/api/"))
            return
        if not same_origin(scope.get("method", "GET"), headers, scope.get("scheme", "http"),
                           used_bearer=same_token(given_bearer, self.token)):
            await self._plain(send_safe, 403, "403 forbidden: cross-origin request refused",
                              json_api=scope.get("path", "").startswith("/api/"))
            return
        await self.app(scope, receive, send_safe)

    @staticmethod
    async def _plain(send, status: int, text: str, json_api: bool = False) -> None:
        if json_api:
            body = json.dumps({"error": text, "code": "unauthorized" if status == 401 else "forbidden"}).encode()
            ctype = b"application/json"
        else:
            body, ctype = text.encode() + b"\n", b"text/plain; charset=utf-8"
        extra = [(b"www-authenticate", b'Bearer realm="ecluster console"')] if status == 401 else []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
