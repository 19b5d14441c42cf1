"""A chat request, checked and planned before it is queued (HTTP thread), run after (engine thread).

Everything a request can be refused for is decided here, before it takes a queue slot:
the model name, unsupported fields, non-text content, and the context length, which needs
the rendered prompt's length. The prompt is rendered and cut into segments here, in the
threadpool (not on the loop), and the engine thread uses those segments as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from kvlib.serve import schemas
from kvlib.serve.errors import ApiError

DEFAULT_ALIAS = "default"


@dataclass
class ChatRequestPlan:
    model: str
    messages: list[dict]
    tenant: str
    may_store: bool
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    retrieve_k: int | None
    include_usage: bool
    spec: object = None  # the request's own mode (kvlib.mode), resolved; None: the server's default
    segmented: object = None  # pipeline.Segmented: the prompt cut before it was queued

    def run(self, state, job):
        """On the engine thread, alone: begin, decode to the end, the Completion."""
        pending = self.begin(state, job)
        state.pipeline.after_first_token(pending)
        while state.pipeline.step([pending]):
            pass
        return state.pipeline.finish(pending)

    def begin(self, state, job, defer: bool = False):
        """On the engine thread: the answer under way (the worker decodes it with others); with
        `defer`, up to its prefill, which the worker runs for the batch (Pipeline.start)."""
        return state.pipeline.begin(
            self.messages, self.tenant, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=self.seed, stop=self.stop, on_text=job.emit, cancelled=job.cancelled, retrieve_k=self.retrieve_k,
            may_store=self.may_store, spec=self.spec, segmented=self.segmented, defer=defer)

    def finish(self, completion, job, metrics, t_arrival: float) -> None:
        """Back on the loop: the server-side TTFT (queue wait included) into kvlib and metrics."""
        queue_s = job.started_at - job.enqueued_at
        ttft_s = (job.started_at - t_arrival) + completion.ttft_s
        completion.kvlib["ttft_s"] = ttft_s
        completion.kvlib.setdefault("ttft_split_s", {})["queue"] = queue_s
        completion.kvlib["timings_s"] = completion.timings
        metrics.observe_completion(completion, ttft_s, time.perf_counter() - t_arrival)


    def finish_abandoned(self, job, metrics, t_arrival: float) -> None:
        """The client left: count the completion when the engine lets go of it (finish_reason cancelled)."""
        def settled(future):
            if not future.cancelled() and future.exception() is None:
                self.finish(future.result(), job, metrics, t_arrival)

        job.future.add_done_callback(settled)


async def plan_chat(body: schemas.ChatCompletionRequest, who, pipeline, settings) -> ChatRequestPlan:
    if body.model not in (pipeline.model_id, DEFAULT_ALIAS):
        raise ApiError(404, f"the model '{body.model}' does not exist: this server serves '{pipeline.model_id}' "
                       f"(also called '{DEFAULT_ALIAS}')", "model_not_found", "model")
    bad = schemas.unsupported(body)
    if bad:
        raise ApiError(400, bad[1], "unsupported_parameter", bad[0])
    try:
        messages, stops = schemas.message_dicts(body), schemas.stop_list(body)
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_value") from None
    segmented = await run_in_threadpool(pipeline.segment, messages)
    n_prompt = len(segmented.ids)
    asked = body.max_completion_tokens or body.max_tokens
    max_tokens = completion_budget(n_prompt, asked, pipeline.context_length, settings.default_max_tokens)
    retrieve = body.kvlib.retrieve if body.kvlib else None
    spec = request_spec(body.kvlib.mode if body.kvlib else None)
    return ChatRequestPlan(
        model=body.model, messages=messages, tenant=who.tenant, may_store=not who.read_only, prompt_tokens=n_prompt,
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stops,
        retrieve_k=retrieve.k if retrieve else None,
        include_usage=bool(body.stream_options and body.stream_options.include_usage), spec=spec,
        segmented=segmented)


def request_spec(mode: str | None):
    """kvlib.mode resolved by the one grammar, or None; a bad one is a 400 naming the field."""
    from kvlib.errors import InputError
    from kvlib.serve.settings import serve_spec

    if mode is None:
        return None
    try:
        return serve_spec(mode)
    except InputError as exc:
        raise ApiError(400, str(exc), "invalid_value", "kvlib.mode") from None


def completion_budget(n_prompt: int, asked: int | None, context: int, default: int) -> int:
    """max_tokens for the pipeline, or 400 context_length_exceeded as OpenAI words it."""
    if n_prompt >= context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but your messages "
                       f"resulted in {n_prompt} tokens", "context_length_exceeded", "messages")
    if asked is not None and n_prompt + asked > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but you requested "
                       f"{n_prompt + asked} tokens ({n_prompt} in the messages, {asked} in the completion)",
                       "context_length_exceeded", "max_tokens")
    return asked if asked is not None else min(default, context - n_prompt)
