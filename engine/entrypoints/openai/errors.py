"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

Rule: handlers raise; the app's exception handlers turn every failure into this shape with
the right status (400 bad input, 401 auth, 404 unknown model, 503 engine dead, 500 bug),
so the server answers and stays up whatever a request contains.
"""

from __future__ import annotations

from typing import Any, Optional

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"),
                      "param": param, "code": status}}
