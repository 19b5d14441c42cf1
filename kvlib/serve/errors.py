"""OpenAI error objects: every non-2xx answer is `{"error": {message, type, param, code}}`.

FastAPI's own 422 validation shape and Starlette's HTTP errors are rewritten into this one
shape (OpenAI answers 400 for a request it cannot accept), so every client library that
parses OpenAI errors, the `openai` package included, reads ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvlib.errors import CalibrationMissingError, InputError, KvlibError, ManifestUnavailableError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 429: "rate_limit_error", 501: "not_implemented_error", 503: "server_error"}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    code: str | None = None
    param: str | None = None
    headers: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """One readable line from Pydantic's error list: (message, param, code)."""
    first = (exc.errors() or [{}])[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}", None, "invalid_json"
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param, "unsupported_parameter"
    if not loc:  # the body itself is no object: an array, a number, nothing
        return f"the request body must be a JSON object ({msg})", None, "invalid_request"
    return (f"invalid value for '{param}': {msg}" if param else msg), param, "invalid_value"


def kvlib_error_status(exc: KvlibError) -> int:
    from kvlib.serve.pipeline import PipelineUnavailable

    if isinstance(exc, PipelineUnavailable):
        return 501
    if isinstance(exc, ManifestUnavailableError):  # the server is degraded; it says so on /healthz
        return 503
    return 400 if isinstance(exc, (InputError, CalibrationMissingError)) else 500


def kvlib_error_body(exc: KvlibError) -> dict:
    """The OpenAI error object of a domain error, as a response or as a stream's error event."""
    status = kvlib_error_status(exc)
    if isinstance(exc, CalibrationMissingError):  # the mode asked needs `kvlib calibrate` first
        return error_body(status, str(exc), "calibration_missing", "kvlib.mode")
    code = {501: "not_implemented", 503: "manifest_unavailable", 400: "invalid_input"}.get(status, "engine_error")
    return error_body(status, str(exc), code)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param, code = describe_validation(exc)
        return error_response(400, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code, headers=getattr(exc, "headers", None))

    @app.exception_handler(KvlibError)
    async def _kvlib(_: Request, exc: KvlibError):
        return JSONResponse(kvlib_error_body(exc), status_code=kvlib_error_status(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # A bug must still answer in OpenAI's shape; the traceback goes to the server log.
        import logging

        logging.getLogger("kvlib.serve").exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
