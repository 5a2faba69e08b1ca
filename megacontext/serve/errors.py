"""ServeError: a request the server refuses, with the HTTP status and a one-line reason for the client.

Everything the service layer refuses is raised as a ServeError; the HTTP app turns it into
``{"error": {"message": ..., "type": ..., "code": status}}`` (the shape OpenAI clients parse) and the MCP server
into a tool error. Any other exception is a server bug: logged with its traceback, never shown to a client.
"""

from __future__ import annotations

KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 409: "conflict_error", 413: "request_too_large", 423: "locked_error",
         500: "server_error", 503: "unavailable_error"}


class ServeError(Exception):
    """A refused request: ``status`` (HTTP) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = one_line(message)

    @property
    def kind(self) -> str:
        return KINDS.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


def one_line(message: str, limit: int = 500) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_request(message: str) -> ServeError:
    return ServeError(400, message)


def not_found(message: str) -> ServeError:
    return ServeError(404, message)
