"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

Rule: handlers raise; the app's exception handlers turn every failure into this shape with
the right status (400 bad input, 401 auth, 404 unknown model or route, 405, 413 body too
large, 503 engine dead or server draining, 500 bug), so the server answers and stays up
whatever a request contains. A response never carries a traceback or a file path: a 500
logs the traceback under an error id and the client gets only that id.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class ServerDrainingError(Exception):
    """The server is shutting down: new requests and requests still running at the end of
    `--shutdown-timeout` get a 503 with this message."""


def error_body(status: int, message: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def new_error_id() -> str:
    """The id a 500 response names and the server log records with the traceback."""
    return f"err-{uuid.uuid4().hex[:16]}"


def first_line(text: str) -> str:
    """A reason safe for a client: its first line, without what follows (a traceback)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.rstrip(":").strip()
