"""The HTTP contract of the query service: request/response models, limits, one error shape
(SPEC §1 "Serving"; the endpoints themselves are in server.py).

Every error a client can cause is a 4xx whose body is
  {"error": {"code": str, "message": str, "field": str | null}}
never FastAPI's default {"detail": ...} and never a 500:
  400 malformed_json            the body is not JSON
  401 unauthorized              a missing or wrong bearer token, when the server has one (auth.py)
  408 request_timeout           the request did not arrive within read_timeout_s (limits.py)
  413 payload_too_large         a query over max_query_chars, more than max_queries queries, or a
                                body over the byte limit
  415 unsupported_media_type    Content-Type is not application/json
  422 invalid_request           wrong types, missing or unknown fields, empty strings (or only
                                whitespace, control or format characters such as NUL and
                                zero-width spaces), k outside 1..100, an unknown entity type
  431 headers_too_large         request headers over max_header_bytes or max_headers (limits.py)
  404 / 405                     unknown path / method
  503 overloaded                the bounded query queue is full, or more than max_connections
                                connections are open (with a Retry-After header)
`field` names the offending field as a path into the body ("queries[3]", "k"), null when the
error is about the body as a whole.

Usage: `install(app, max_body_bytes)` adds the handlers and the body guard to a FastAPI app.
"""

import json
import logging
import unicodedata
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("omnisage")

KINDS = ("pins", "products", "queries")
Kind = Literal["pins", "products", "queries"]
MAX_K = 100


class EmbedRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  queries: list[StrictStr] = Field(min_length=1, description="Query texts (at most max_queries, "
                                   "each 1..max_query_chars characters).")


class EmbedResponse(BaseModel):
  embeddings: list[list[float]] = Field(description="One L2-normalised vector per query.")
  dim: int
  cached: list[bool] = Field(description="Per query: served from the cache.")


class SearchRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  query: StrictStr = Field(description="Query text (1..max_query_chars characters).")
  k: StrictInt = Field(10, ge=1, le=MAX_K, description="Results per entity type.")
  types: list[Kind] | None = Field(None, min_length=1, description="Entity types to search "
                                   "(default: every type the index holds).")
  mode: Literal["dense", "lexical", "hybrid"] = Field(
      "dense", description="dense: the embeddings' nearest neighbours; lexical: BM25 over the "
      "titles; hybrid: both lists fused (the index's tuned fusion).")


class SearchHit(BaseModel):
  id: str
  title: str
  score: float = Field(description="dense: inner product of the query and item embeddings; "
                       "lexical: BM25; hybrid: the fused score.")


class SearchResponse(BaseModel):
  query: str
  cached: bool = Field(description="The query embedding (or the whole result) came from the "
                       "cache.")
  results: dict[str, list[SearchHit]]


class ErrorDetail(BaseModel):
  code: str
  message: str
  field: str | None


class ErrorBody(BaseModel):
  error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorBody, "description": description} for status, description
                   in [(400, "Malformed JSON"), (401, "Missing or wrong bearer token"),
                       (413, "Query too long or too many queries"),
                       (415, "Content-Type is not application/json"),
                       (422, "Invalid request"), (503, "Overloaded: retry after Retry-After s")]}


class ApiError(Exception):
  """An error answered with our JSON shape."""

  def __init__(self, status: int, code: str, message: str, field: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.code, self.message, self.field = status, code, message, field
    self.headers = headers


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
  return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status,
                      headers=headers)


INVISIBLE = frozenset({"Cc", "Cf"})   # control (NUL, ...) and format (zero-width, BOM, ...)


def is_blank(text: str) -> bool:
  """Nothing but whitespace and control/format characters: "", " \\t", "\\x00", "\\u200b\\ufeff"."""
  return not any(not ch.isspace() and unicodedata.category(ch) not in INVISIBLE for ch in text)


def check_text(text: str, field: str, max_chars: int) -> None:
  """Blank strings embed to nothing useful (422); long ones are refused before tokenising (413).

  Blank includes strings of only control or format characters (NUL, zero-width spaces, a BOM):
  the tokenizer turns them into spaces, so they would embed like the empty string.
  JSON can spell lone UTF-16 surrogates ("\\ud800") that no UTF-8 text holds: refused (422) here
  rather than failing later when the response echoes the query.
  """
  if is_blank(text):
    raise ApiError(422, "invalid_request", f"{field}: must not be empty or blank (only "
                   "whitespace, control or zero-width characters)", field)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    raise ApiError(422, "invalid_request", f"{field}: contains a lone surrogate (\\ud800-\\udfff)"
                   ", which is not text", field) from None
  if len(text) > max_chars:
    raise ApiError(413, "payload_too_large", f"{field}: {len(text)} characters, more than the "
                   f"limit of {max_chars}", field)


def field_path(loc) -> str | None:
  """('body', 'queries', 3) -> 'queries[3]'; ('body',) -> None."""
  path = ""
  for part in loc[1:] if loc and loc[0] == "body" else loc:
    path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
  return path or None


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
  error = exc.errors()[0]
  if error["type"] == "json_invalid":
    reason = error.get("ctx", {}).get("error", "not valid JSON")
    return error_response(400, "malformed_json", f"request body is not valid JSON: {reason}")
  field = field_path(error["loc"])
  if field is None:
    # The body as a whole: null, an array, a string, or a non-JSON Content-Type slipped through.
    return error_response(422, "invalid_request", "request body must be a JSON object")
  return error_response(422, "invalid_request", f"{field}: {error['msg']}", field)


async def _api_error(request, exc: ApiError) -> JSONResponse:
  return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


HTTP_CODES = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type"}


async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
  code = HTTP_CODES.get(exc.status_code, "http_error")
  return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _unexpected(request, exc: Exception) -> JSONResponse:
  log.exception("unexpected error on %s", request.url.path)
  return error_response(500, "internal", f"internal error ({type(exc).__name__})")


def health(fields: dict, **constant) -> JSONResponse:
  """A /healthz answer that is never a 500: each of `fields` ({name: callable}) is computed and
  made JSON on its own; one that fails is null, with its error under "errors" (the loaders refuse
  a bad manifest; this is the backstop)."""
  body, errors = {"status": "ok", **constant}, {}
  for name, get in fields.items():
    try:
      body[name] = json.loads(json.dumps(get(), allow_nan=False))
    except Exception as error:   # whatever the field holds, the probe gets an answer
      body[name], errors[name] = None, f"{type(error).__name__}: {error}"
  return JSONResponse({**body, "errors": errors} if errors else body)


def install(app: FastAPI, max_body_bytes: int) -> None:
  app.add_exception_handler(RequestValidationError, _validation_error)
  app.add_exception_handler(ApiError, _api_error)
  app.add_exception_handler(StarletteHTTPException, _http_error)
  app.add_exception_handler(Exception, _unexpected)
  app.add_middleware(BodyGuard, max_bytes=max_body_bytes)


class BodyGuard:
  """ASGI middleware: POST bodies must be application/json and at most max_bytes long.

  Checked before FastAPI parses anything, so a 50 MB body costs a 413, not 50 MB of JSON parsing.
  The body is read here (streamed bodies without Content-Length too) and replayed to the app.
  """

  def __init__(self, app, max_bytes: int):
    self.app = app
    self.max_bytes = max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] != "POST":
      return await self.app(scope, receive, send)
    headers = dict(scope["headers"])
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if media != b"application/json":
      shown = media.decode("latin-1") or "none"
      return await error_response(415, "unsupported_media_type", f"Content-Type is {shown!r}; "
                                  "send the body as Content-Type: application/json")(
                                      scope, receive, send)
    length = headers.get(b"content-length", b"0")
    if not length.isdigit() or int(length) > self.max_bytes:
      return await self._too_large(scope, receive, send)
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      chunks.append(message.get("body", b""))
      size += len(chunks[-1])
      if size > self.max_bytes:
        return await self._too_large(scope, receive, send)
      if not message.get("more_body", False):
        break
    body = b"".join(chunks)
    replayed = False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()

    await self.app(scope, replay, send)

  async def _too_large(self, scope, receive, send):
    await error_response(413, "payload_too_large", f"request body is larger than "
                         f"{self.max_bytes} bytes")(scope, receive, send)

