"""Turning an OpenAI-compatible request into a job (DESIGN 2.2 and 4.3).

Scheduler inputs come from body fields or `X-Rbee-*` headers. Fields only
rbee understands are removed before the request goes upstream, so strict
servers do not refuse it.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson

from rbee.queen.jobs import ENDPOINTS, Job

__all__ = ["BadRequest", "parse_job", "RBEE_BODY_FIELDS"]

#: Body fields for the scheduler, not for the inference server.
RBEE_BODY_FIELDS = ("priority", "deadline_ms", "session_id", "tags", "user_geo")


class BadRequest(Exception):
    """A request the queen refuses with 400; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error",
                          "code": "invalid_request", "param": self.param}}


def _positive_int(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{param}' must be a positive integer, got {value!r}", param)
    return value


def _text_size(value: Any) -> int:
    """A rough prompt size in characters, for the token estimate: the
    strings, and in objects their `content` and `text`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = [value.get("content"), value.get("text")]
    elif not isinstance(value, list):
        return 0
    size = 0
    for item in value:
        # Chat messages: plain strings under "content", looked at here
        # rather than through a call per message.
        if isinstance(item, dict):
            content = item.get("content")
            size += len(content) if isinstance(content, str) else _text_size(content)
            if "text" in item:
                size += _text_size(item["text"])
        elif item is not None:
            size += _text_size(item)
    return size


def _geo_header(value: str) -> dict[str, float]:
    lat, sep, lon = value.partition(",")
    try:
        if not sep:
            raise ValueError
        geo = {"latitude": float(lat), "longitude": float(lon)}
    except ValueError:
        raise BadRequest(f"X-Rbee-User-Geo must be 'lat,lon', got {value!r}",
                         "X-Rbee-User-Geo") from None
    if not (-90 <= geo["latitude"] <= 90 and -180 <= geo["longitude"] <= 180):
        raise BadRequest(f"X-Rbee-User-Geo is out of range: {value!r}", "X-Rbee-User-Geo")
    return geo


def _tags_header(value: str) -> dict[str, str]:
    tags = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise BadRequest(f"X-Rbee-Tags must be 'k=v,...', got {value!r}", "X-Rbee-Tags")
        tags[key.strip()] = val.strip()
    return tags


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _check_payload(endpoint: str, body: Mapping[str, Any]) -> None:
    if endpoint == "chat.completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"'messages[{i}]' must be an object with a 'role'",
                                 f"messages[{i}]")
    elif endpoint == "completions":
        if not isinstance(body.get("prompt"), (str, list)):
            raise BadRequest("'prompt' must be a string or an array", "prompt")
    elif endpoint == "embeddings":
        if not isinstance(body.get("input"), (str, list)) or body.get("input") in ("", []):
            raise BadRequest("'input' must be a non-empty string or array", "input")
    elif endpoint == "images.generations":
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")


def parse_job(
    endpoint: str,
    body: dict[str, Any],
    headers: Mapping[str, str],
    *,
    default_timeout_ms: int,
) -> Job:
    """Validates the request and builds its job; `body` is left ready to
    forward (rbee-only fields removed)."""
    if endpoint not in ENDPOINTS:
        raise BadRequest(f"unknown endpoint {endpoint!r}", "endpoint")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BadRequest("'model' must be a non-empty string", "model")
    if model is None and endpoint != "images.generations":
        raise BadRequest("'model' is required", "model")
    _check_payload(endpoint, body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    max_tokens = None
    for param in ("max_tokens", "max_completion_tokens"):
        if body.get(param) is not None:
            max_tokens = _positive_int(body[param], param)

    extra = {k: body.pop(k) for k in RBEE_BODY_FIELDS if k in body}
    priority = headers.get("X-Rbee-Priority") or extra.get("priority") or "normal"
    if not isinstance(priority, str):
        raise BadRequest("'priority' must be a string", "priority")
    deadline = headers.get("X-Rbee-Deadline-Ms") or extra.get("deadline_ms")
    if isinstance(deadline, str):
        if not deadline.strip().isdigit():
            raise BadRequest(f"X-Rbee-Deadline-Ms must be a positive integer, got {deadline!r}",
                             "X-Rbee-Deadline-Ms")
        deadline = int(deadline)
    if deadline is not None:
        deadline = _positive_int(deadline, "deadline_ms")
    session = headers.get("X-Rbee-Session") or extra.get("session_id")
    tags = extra.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise BadRequest("'tags' must be an object of strings", "tags")
    if headers.get("X-Rbee-Tags"):
        tags = {**tags, **_tags_header(headers["X-Rbee-Tags"])}
    user: dict[str, Any] = {}
    if isinstance(body.get("user"), str):
        user["id"] = body["user"]
    geo = extra.get("user_geo")
    if geo is not None and not isinstance(geo, dict):
        raise BadRequest("'user_geo' must be an object", "user_geo")
    if headers.get("X-Rbee-User-Geo"):
        geo = {**(geo or {}), **_geo_header(headers["X-Rbee-User-Geo"])}
    if geo:
        user["geo"] = geo

    payload = body.get("messages") or body.get("prompt") or body.get("input") or ""
    return Job(
        endpoint=endpoint,
        model=model,
        type=ENDPOINTS[endpoint][1],
        priority=priority,
        user=user or None,
        deadline_ms=deadline,
        max_tokens=max_tokens,
        prompt_tokens=max(1, _text_size(payload) // 4),
        session_id=session,
        stream=stream,
        tags=tags,
        timeout_ms=default_timeout_ms,
    )
