"""Request models that mirror OpenAI's chat completions schema, and the response bodies.

Design facts:
- Unknown top-level fields are refused (OpenAI answers "Unrecognized request argument").
- A known field that would change the answer and that kvlib cannot honour (n > 1, tools,
  logprobs, penalties, a JSON response format, logit bias) is refused with a 400 naming
  it, never silently ignored. Fields that do not change the answer (user, metadata,
  store, service_tier) are accepted and ignored.
- `developer` messages are system messages (OpenAI's newer name for the same role).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str | list[dict[str, Any]]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class RetrieveExtension(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(4, ge=1, le=64)


class KvlibExtension(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retrieve: RetrieveExtension | None = None
    mode: str | None = Field(None, min_length=1, max_length=200)  # this request's mode, e.g. rerope+guard:0.2


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    kvlib: KvlibExtension | None = None
    # accepted so they can be refused (or allowed at their neutral value) with a clear message
    n: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # accepted and ignored: they do not change the answer
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


def unsupported(req: ChatCompletionRequest) -> tuple[str, str] | None:
    """(param, message) for the first answer-changing field kvlib cannot honour, else None."""
    checks = [
        ("n", req.n not in (None, 1), "n > 1 is not supported: send one request per completion"),
        ("tools", bool(req.tools) or bool(req.functions), "tools and function calling are not supported"),
        ("tool_choice", req.tool_choice not in (None, "none"), "tool_choice is not supported (no tools)"),
        ("function_call", req.function_call not in (None, "none"), "function_call is not supported"),
        ("logprobs", bool(req.logprobs) or bool(req.top_logprobs), "logprobs are not supported"),
        ("response_format", (req.response_format or {}).get("type", "text") != "text",
         "only response_format {'type': 'text'} is supported"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
        ("presence_penalty", bool(req.presence_penalty), "presence_penalty is not supported (send 0)"),
        ("frequency_penalty", bool(req.frequency_penalty), "frequency_penalty is not supported (send 0)"),
    ]
    return next(((p, m) for p, bad, m in checks if bad), None)


def message_dicts(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template wants them: role and plain-text content.

    Raises ValueError naming the bad part; text parts are joined without a separator,
    as OpenAI concatenates them.
    """
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for j, part in enumerate(m.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages.{i}.content.{j}: only text parts are supported "
                                     f"(got type {part.get('type')!r})")
                parts.append(part["text"])
            text = "".join(parts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def stop_list(req: ChatCompletionRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop takes at most 4 non-empty strings")
    return stops


def usage_body(c) -> dict:
    """OpenAI's usage object; cached_tokens are the prompt tokens served from the library."""
    n_out = len(c.token_ids)
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": n_out, "total_tokens": c.prompt_tokens + n_out,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}


def completion_body(request_id: str, model: str, created: int, c) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "logprobs": None, "finish_reason": c.finish_reason}],
        "usage": usage_body(c), "kvlib": c.kvlib,
    }


def chunk_body(request_id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None, kvlib: dict | None = None, choices: bool = True) -> dict:
    """One `chat.completion.chunk`. The usage chunk has empty choices, as OpenAI sends it."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if choices else []}
    if usage is not None:
        body["usage"] = usage
    if kvlib is not None:
        body["kvlib"] = kvlib
    return body


def now() -> int:
    return int(time.time())
