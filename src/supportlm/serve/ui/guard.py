"""ASGI middleware in front of the mounted Gradio app, for what Gradio's own routes leave open.

* ``POST /login``: failed logins are throttled per account and address (`LoginThrottle`).
* With ``SUPPORTLM_AUTH``, every other ``POST /gradio_api/...`` needs a signed-in session: Gradio
  checks the login on its queue and upload routes but not on ``/cancel``, ``/reset`` or
  ``/stream/...``, which change another session's state given its (guessable) session hash.
  MCP has its own check (`supportlm.serve.ui.server.McpAccess`).
* ``POST /gradio_api/upload``: each client (signed-in user or address) may upload
  ``SUPPORTLM_UPLOAD_BYTES_PER_HOUR`` bytes an hour, at most `MAX_FILES` files a request; a file
  that is not UTF-8 text is deleted and refused; every accepted upload is deleted after
  `UPLOAD_TTL_S` seconds whether or not a tab read it (reading deletes it at once).

Written as plain ASGI because it must see the request body before Gradio does (the login form)
and the response after it (the stored upload paths); Gradio offers no hook for either.
"""

from __future__ import annotations

import json
import threading
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.responses import JSONResponse

from supportlm.errors import SupportLMError
from supportlm.serve.admission import Busy, RateLimit
from supportlm.serve.throttle import LoginThrottle
from supportlm.serve.ui.common import check_text_file

MAX_LOGIN_BODY = 16_384
MAX_FILES = 2
UPLOAD_TTL_S = 120.0
MCP_PREFIX = "/gradio_api/mcp"


class GradioGuard:
    """The middleware; `gradio_app` is the mounted Gradio `App` (its login tokens), `uploads`
    each client's upload bytes in the last hour."""

    def __init__(self, app, *, gradio_app, login_required: bool, throttle: LoginThrottle,
                 uploads: RateLimit, max_upload_bytes: int) -> None:  # fmt: skip
        self.app, self.gradio_app = app, gradio_app
        self.login_required, self.throttle = login_required, throttle
        self.uploads, self.max_upload_bytes = uploads, max_upload_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/")
        if path == "/login":
            await self._login(scope, receive, send)
        elif (
            path.startswith("/gradio_api/")
            and not path.startswith(MCP_PREFIX)
            and (self.login_required and self._user(scope) is None)
        ):
            await JSONResponse({"detail": "Not authenticated"}, 401)(scope, receive, send)
        elif path == "/gradio_api/upload":
            await self._upload(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _user(self, scope) -> str | None:
        headers = dict(scope["headers"])
        try:
            cookies = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:
            return None
        suffix = self.gradio_app.cookie_id
        for name in (f"access-token-{suffix}", f"access-token-unsecure-{suffix}"):
            if name in cookies and cookies[name].value in self.gradio_app.tokens:
                return self.gradio_app.tokens[cookies[name].value]
        return None

    async def _login(self, scope, receive, send) -> None:
        body = await _read_body(receive, MAX_LOGIN_BODY)
        if body is None:
            await JSONResponse({"detail": "The login form is too large."}, 413)(
                scope, receive, send
            )
            return
        form = parse_qs(body.decode("utf-8", "replace"))
        account = (form.get("username") or [""])[0].strip()[:200] or None
        address = _address(scope)
        try:
            self.throttle.check(account, address)
        except Busy as error:
            await JSONResponse({"detail": str(error)}, 429)(scope, receive, send)
            return

        async def observed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] in (400, 401):
                self.throttle.failed(account, address)
            await send(message)

        await self.app(scope, _replay(body, receive), observed)

    async def _upload(self, scope, receive, send) -> None:
        client = self._user(scope) or _address(scope) or "?"
        left = self.uploads.left(client)
        size = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)
        if size <= 0 or size > left:
            megabytes = self.uploads.limit / 1_000_000
            message = f"Upload limit reached: at most {megabytes:g} MB an hour; try again later."
            await JSONResponse({"detail": message}, 429)(scope, receive, send)
            return
        self.uploads.record(client, size)
        start, body = await _capture(self.app, scope, receive)
        refusal = self._check_uploads(start["status"], body)
        if refusal is not None:
            await JSONResponse({"detail": refusal}, 415)(scope, receive, send)
            return
        await send(start)
        await send({"type": "http.response.body", "body": body})

    def _check_uploads(self, status: int, body: bytes) -> str | None:
        """Why the stored files are refused (they are deleted then), or None; each kept file is
        deleted after `UPLOAD_TTL_S` seconds."""
        if status != 200:
            return None
        try:
            paths = [Path(p) for p in json.loads(body)]
        except (ValueError, TypeError):
            return None
        reason = f"Upload at most {MAX_FILES} files at once." if len(paths) > MAX_FILES else None
        for path in paths:
            try:
                check_text_file(path, self.max_upload_bytes)
            except (SupportLMError, OSError) as error:
                reason = reason or str(error)
        for path in paths:
            if reason is not None:
                path.unlink(missing_ok=True)
            else:
                timer = threading.Timer(UPLOAD_TTL_S, path.unlink, kwargs={"missing_ok": True})
                timer.daemon = True
                timer.start()
        return reason


def _address(scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


async def _read_body(receive, limit: int) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body"):
            return body


def _replay(body: bytes, receive):
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _capture(app, scope, receive) -> tuple[dict, bytes]:
    """Run `app` and keep its whole response (an upload's JSON list of paths is small)."""
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return start, b"".join(chunks)
