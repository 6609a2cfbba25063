"""Business errors carry their HTTP status; one middleware renders them as
`{"error": {"code", "message", "details"}}`."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 400

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: Any = None,
        status: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        if status is not None:
            self.status = status
        self.headers = {"Retry-After": str(retry_after)} if retry_after is not None else None

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class Unprocessable(ApiError):
    """422: the request is well-formed JSON but breaks a rule (see CONTRACT.md for the codes)."""

    status = 422


class Conflict(ApiError):
    status = 409


class NotFound(ApiError):
    status = 404

    def __init__(self, message: str, *, code: str = "not_found") -> None:
        super().__init__(code, message)


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class Unavailable(ApiError):
    status = 503
