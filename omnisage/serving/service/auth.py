"""Optional bearer-token authentication for every route of a query service but /healthz.

The token is one line in a file (`launch.py serve --config.auth_token_file=PATH`), so it appears
neither in the command line nor in the process list. Clients send `Authorization: Bearer TOKEN`;
a missing or wrong token gets 401 in api.py's error shape with a `WWW-Authenticate: Bearer`
header, before the body is read or the path is routed (an unknown path is a 401 too, so the
routes cannot be probed). The comparison takes the same time wherever the tokens differ
(hmac.compare_digest).

Usage: `auth.install(app, auth.read_token("secrets/token"))` after api.install (outside its body
guard).
"""

import hmac

from omnisage.serving.service import api

OPEN_PATHS = frozenset({"/healthz"})   # liveness probes carry no credentials


def read_token(path: str) -> str:
  """The token in `path`, stripped of surrounding whitespace; ValueError if unreadable or empty."""
  try:
    with open(path, encoding="utf-8") as f:
      token = f.read().strip()
  except (OSError, UnicodeDecodeError) as error:
    raise ValueError(f"auth_token_file {path}: cannot read the token ({error})") from error
  if not token:
    raise ValueError(f"auth_token_file {path}: the file is empty; write the token into it")
  return token


def install(app, token: str | None) -> None:
  """Requires `token` on every route but OPEN_PATHS; no-op when token is None."""
  if token is not None:
    app.add_middleware(BearerAuth, token=token)


class BearerAuth:
  """ASGI middleware: HTTP requests outside OPEN_PATHS need `Authorization: Bearer <token>`."""

  def __init__(self, app, token: str):
    if not token:
      raise ValueError("BearerAuth needs a non-empty token")
    self.app = app
    self.token = token.encode("utf-8")

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
      return await self.app(scope, receive, send)
    given = None
    for name, value in scope["headers"]:
      if name == b"authorization":
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == b"bearer":
          given = credentials.strip()
        break
    if given is not None and hmac.compare_digest(given, self.token):
      return await self.app(scope, receive, send)
    if given is None:
      message, challenge = "send the token as Authorization: Bearer <token>", "Bearer"
    else:
      message, challenge = "the bearer token is not valid", 'Bearer error="invalid_token"'
    response = api.error_response(401, "unauthorized", message,
                                  headers={"WWW-Authenticate": challenge})
    await response(scope, receive, send)
