"""Connection limits of the query service: what uvicorn's HTTP protocol leaves unbounded.

uvicorn 0.54 over httptools (its parser whenever httptools is installed, as here) bounds neither
the size nor the number of request headers (llhttp buffers a 16 MB header and the app answers
200), and it starts no timer before a request's headers have arrived: its keep-alive timer runs
only after a response, so a client that connects and sends half a header holds the connection
(and a file descriptor) for ever. `LimitedHttpToolsProtocol` adds, per connection:

  max_header_bytes         request line + headers over this -> 431, connection closed
  max_headers              more header lines than this -> 431, connection closed
  read_timeout_s           a request's headers and body must arrive within this many seconds of
                           its first byte (of the connection opening, for the first request):
                           else 408 (or, once the app is reading the body, a plain close)
  max_connections          uvicorn's own `limit_concurrency`, answered in our JSON shape: a
                           request while more connections are open (or as many requests run)
                           -> 503 with Retry-After, connection closed
  max_keep_alive_requests  requests per connection; the last is answered with Connection: close
and uvicorn's `timeout_keep_alive` (keep_alive_s here) closes connections idle between requests.
Every refusal has the JSON error shape of api.py.

Usage: `uvicorn.Config(app, http=protocol_class(Limits(read_timeout_s=5)), ...)` (runner.py).
"""

import dataclasses
import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from omnisage.serving.service import api

RETRY_AFTER_S = 1   # the Retry-After of a 503 at the connection cap


@dataclasses.dataclass(frozen=True)
class Limits:
  """The defaults of configs/serve.py (docs/serving.md "Hardening")."""
  max_header_bytes: int = 32 * 1024   # request line + headers (nginx: 1 KiB + 4 x 8 KiB)
  max_headers: int = 100              # header lines per request (gunicorn's default)
  read_timeout_s: float = 10.0        # headers + body of one request, from its first byte
  keep_alive_s: float = 5.0           # idle time between requests (uvicorn's default)
  max_keep_alive_requests: int = 1000  # requests per connection (nginx's keepalive_requests)
  max_connections: int = 512          # open connections served at once; more -> 503

  @classmethod
  def from_config(cls, config) -> "Limits":
    """The fields of a ConfigDict (configs/serve.py) that name a limit; defaults for the rest."""
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)
                  if f.name in config and config[f.name] is not None})


def protocol_class(limits: Limits) -> type:
  """The protocol uvicorn instantiates per connection (uvicorn.Config(http=...)), with `limits`."""
  return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
  """uvicorn's httptools protocol plus the limits above (its parser callbacks are extended, never
  replaced: uvicorn still builds the scope, runs the app and handles keep-alive)."""

  limits = Limits()

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # uvicorn's check answers text/plain and lets limit - 1 connections in; ours is below.
    self.max_connections, self.limit_concurrency = self.limit_concurrency, None
    self._timer = None        # the read timeout of the request under way
    self._messages = 0        # requests begun on this connection
    self._in_headers = False  # between a request's first byte and the end of its headers
    self._parsed_bytes = 0    # request line + complete header lines seen by the parser
    self._read_bytes = 0      # whole reads that fell inside the header block
    self._header_count = 0

  # --- the read timeout ---------------------------------------------------------------------------

  def _arm(self) -> None:
    if self._timer is None:
      self._timer = self.loop.call_later(self.limits.read_timeout_s, self._timed_out)

  def _disarm(self) -> None:
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None

  def _timed_out(self) -> None:
    self._timer = None
    self._refuse(408, "request_timeout", "the request did not arrive within "
                 f"{self.limits.read_timeout_s:g} s")

  def _idle(self) -> bool:
    """No request is being answered on this connection."""
    return self.cycle is None or self.cycle.response_complete

  def _refuse(self, status: int, code: str, message: str) -> None:
    """Answers (when no other response is under way on the connection) and closes."""
    if self.transport.is_closing():
      return
    if self._idle():
      body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
      head = [STATUS_LINE[status]]
      for name, value in self.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
      head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                  b"connection: close\r\n\r\n" % len(body))
      self.transport.write(b"".join(head) + body)
    self.transport.close()

  def connection_made(self, transport) -> None:
    super().connection_made(transport)
    self._arm()   # a connection that never sends a request is dropped too

  def connection_lost(self, exc) -> None:
    self._disarm()
    super().connection_lost(exc)

  # --- header size and count ----------------------------------------------------------------------

  def _headers_too_large(self) -> str | None:
    size = max(self._parsed_bytes, self._read_bytes)
    if size > self.limits.max_header_bytes:
      return f"request headers are larger than {self.limits.max_header_bytes} bytes"
    if self._header_count > self.limits.max_headers:
      return f"more than {self.limits.max_headers} request headers"
    return None

  def data_received(self, data: bytes) -> None:
    if self.transport.is_closing():
      return
    if self._idle():
      self._arm()   # bytes between requests start the next request's clock
    messages = self._messages
    super().data_received(data)
    if not self._in_headers or self.transport.is_closing():
      return
    # The header block is still incomplete. httptools holds a header line until it ends, so the
    # callbacks alone would not see one endless line: a read in which no request began belongs
    # to the header block entirely (the read in which it began is counted by the callbacks).
    if messages == self._messages:
      self._read_bytes += len(data)
    reason = self._headers_too_large()
    if reason:
      self._refuse(431, "headers_too_large", reason)

  def on_message_begin(self) -> None:
    super().on_message_begin()
    self._messages += 1
    self._in_headers = True
    self._parsed_bytes = self._read_bytes = self._header_count = 0
    self._arm()

  def on_url(self, url: bytes) -> None:
    super().on_url(url)
    self._parsed_bytes += len(url)

  def on_header(self, name: bytes, value: bytes) -> None:
    super().on_header(name, value)
    self._parsed_bytes += len(name) + len(value) + 4   # ": " and CRLF
    self._header_count += 1

  def on_headers_complete(self) -> None:
    self._in_headers = False
    reason = self._headers_too_large()   # exact now: every header line has been parsed
    limit = self.max_connections
    if reason:
      refusal = api.error_response(431, "headers_too_large", reason,
                                   headers={"Connection": "close"})
    elif limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit):
      refusal = api.error_response(
          503, "overloaded", f"more than {limit} connections open; retry in {RETRY_AFTER_S} s",
          headers={"Connection": "close", "Retry-After": str(RETRY_AFTER_S)})
    else:
      refusal = None
    previous = self.cycle
    if refusal is None:
      super().on_headers_complete()
    else:   # uvicorn answers with `self.app` (as it does its own 503): the refusal, this once
      app, self.app = self.app, refusal
      try:
        super().on_headers_complete()
      finally:
        self.app = app
    if self.cycle is previous:   # an upgrade: no request cycle
      return
    if self._messages >= self.limits.max_keep_alive_requests:
      self.cycle.keep_alive = False
    if self.pipeline:
      # Pipelined behind an unanswered request, its body is not read until that one is answered
      # (uvicorn pauses reading): the clock restarts then (on_response_complete).
      self._disarm()

  def on_message_complete(self) -> None:
    super().on_message_complete()
    self._disarm()

  def on_response_complete(self) -> None:
    waiting = self.pipeline[-1][0] if self.pipeline else None   # the cycle uvicorn starts next
    super().on_response_complete()
    if waiting is not None and waiting.more_body and not self.transport.is_closing():
      self._arm()
