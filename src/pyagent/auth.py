"""Bearer-token access for PyAgent's HTTP servers (the engine's OpenAI API and the observer).

A server bound to a loopback address may run without a token; binding any other address needs one,
from an option or the `PYAGENT_TOKEN` environment variable. With a token, every request to a
protected path must carry `Authorization: Bearer <token>` (compared in constant time), else it
gets 401 with a JSON error.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pyagent.errors import ConfigError

TOKEN_ENV = "PYAGENT_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_token(host: str, token: str | None) -> str | None:
    """The token a server bound to `host` requires: `token`, else `PYAGENT_TOKEN`; a ConfigError
    when `host` is not loopback and there is none."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and not token.strip():
        raise ConfigError("the bearer token is empty")
    if token is None and not is_loopback(host):
        raise ConfigError(f"binding {host} exposes the server beyond this machine: give a bearer "
                          f"token with --token or the {TOKEN_ENV} environment variable")
    return token


class BearerAuth:
    """ASGI middleware refusing requests without the bearer `token` on paths that `protected`
    accepts; `error(message)` builds the 401 response (JSON by default)."""

    def __init__(self, app: ASGIApp, token: str,
                 protected: Callable[[str], bool] = lambda path: True,
                 error: Callable[[str], Response] | None = None):
        self.app = app
        self.expected = token.encode()
        self.protected = protected
        self.error = error or (lambda message: JSONResponse(
            {"error": {"message": message, "type": "unauthorized"}}, status_code=401))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and self.protected(
                scope["path"]):
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(),
                                                                      self.expected):
                response = self.error("missing or wrong bearer token: send 'Authorization: "
                                      "Bearer <token>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
