"""Small HTTP helpers every route module shares: bounded JSON bodies, JSON errors.

A JSON route reads its body through :func:`read_json`, which refuses a body over
the limit before reading it all (413) and malformed JSON with a 400 that says
where (JSON nested absurdly deep or carrying text that is not valid Unicode too), so no route ever answers a bad request with a 500 or an empty body.
"""
from __future__ import annotations

import json
from typing import Any, NoReturn

from aiohttp import web

from engine.submission import MAX_JSON_DEPTH, json_problem

DEFAULT_JSON_LIMIT = 8 * 1024 * 1024


def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "details": extra.pop("details", ""),
                      "extra_info": extra}}


def json_error(status: int, kind: str, message: str, **extra: Any) -> web.Response:
    return web.json_response(error_body(kind, message, **extra), status=status)


def fail(status: int, kind: str, message: str, **extra: Any) -> NoReturn:
    """Abort the handler with a JSON error body."""
    _http(status, kind, message, extra)


def _http(status: int, kind: str, message: str, extra: dict[str, Any]) -> NoReturn:
    cls = {400: web.HTTPBadRequest, 403: web.HTTPForbidden, 404: web.HTTPNotFound, 409: web.HTTPConflict,
           413: web.HTTPRequestEntityTooLarge, 415: web.HTTPUnsupportedMediaType}.get(status, web.HTTPBadRequest)
    text = json.dumps(error_body(kind, message, **extra))
    if cls is web.HTTPRequestEntityTooLarge:
        raise web.HTTPRequestEntityTooLarge(max_size=extra.get("limit", 0), actual_size=extra.get("size", 0),
                                            text=text, content_type="application/json")
    raise cls(text=text, content_type="application/json")


async def read_json(request: web.Request, limit: int | None = None, *, allow_empty: bool = False) -> Any:
    """The request's JSON body, or a 400/413 JSON error."""
    limit = limit or DEFAULT_JSON_LIMIT
    length = request.content_length
    if length is not None and length > limit:
        fail(413, "body_too_large", f"request body of {length} bytes is over the limit of {limit} bytes",
             limit=limit, size=length)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            fail(413, "body_too_large", f"request body is over the limit of {limit} bytes", limit=limit, size=size)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if allow_empty:
            return {}
        fail(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        fail(400, "invalid_json", "the request body is not UTF-8 text")
    except json.JSONDecodeError as exc:
        fail(400, "invalid_json", f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                                  f"column {exc.colno}")
    except RecursionError:
        fail(400, "invalid_json", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    trouble = json_problem(body)
    if trouble:
        fail(400, "invalid_json", trouble)
    return body


async def read_object(request: web.Request, limit: int | None = None, *, allow_empty: bool = False) -> dict[str, Any]:
    body = await read_json(request, limit, allow_empty=allow_empty)
    if not isinstance(body, dict):
        fail(400, "invalid_json", f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def query_int(request: web.Request, name: str, default: int | None, *, minimum: int = 0,
              maximum: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        fail(400, "invalid_query", f"query parameter '{name}' must be an integer, got {raw!r}")
    if value < minimum or (maximum is not None and value > maximum):
        fail(400, "invalid_query", f"query parameter '{name}' must be between {minimum} and {maximum}")
    return value
