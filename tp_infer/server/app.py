"""The HTTP app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and /metrics. Every
request carries its whole conversation; the prefix tree finds whatever of it the pool holds, and the reply memory
gives replies generated here their own ids back, so a served conversation computes only its new tokens."""

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tp_infer.chat import ReplyMemory, encode_messages
from tp_infer.engine.engine import TurnRefused
from tp_infer.engine.request import Turn
from tp_infer.engine.sampling import SamplingParams
from tp_infer.server.bridge import Busy, Call, EngineLoop
from tp_infer.server.metrics import Metrics
from tp_infer.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest
from tp_infer.tokenizer import ROLES, ChatTokenizer, StreamDecoder, TokenizerError


@dataclass
class ServerSettings:
    model_name: str
    max_seq_len: int
    sampling: SamplingParams  # the command line's defaults
    api_key: str | None = None


class ReplyText:
    """Generated ids as text deltas, ending before the first stop string (which is never sent)."""

    def __init__(self, tokenizer: ChatTokenizer, stops: list[str]):
        self.decoder, self.stops = StreamDecoder(tokenizer), stops
        self.text, self.sent, self.stopped = "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1  # a stop string may be arriving

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self.release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self.release(final=True)

    def release(self, final: bool) -> str:
        if not self.stopped:
            cuts = [i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0]
            if cuts:
                self.text, self.stopped, final = self.text[: min(cuts)], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(
    loop: EngineLoop, tokenizer: ChatTokenizer, settings: ServerSettings, metrics: Metrics, memory: ReplyMemory
) -> FastAPI:
    app = FastAPI(title="tp_infer", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"the request body is not valid JSON ({first.get('msg')})"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a union (str | list[...]) reports one error per member: name the field, not the member
        loc = [x for x in loc if not any(c in x for c in "[]|") or x.isdigit()]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}"
        return error_response(APIError(400, message, param))

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if settings.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return error_response(APIError(401, "invalid or missing API key", kind="authentication_error"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok" if loop.healthy else "failed"}, status_code=200 if loop.healthy else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "tp_infer"}
        return {"object": "list", "data": [{**card, "max_model_len": settings.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check(body)
        messages = []
        for i, m in enumerate(body.messages):
            if m.role not in ROLES:
                raise APIError(400, f"messages[{i}]: unknown role {m.role!r} (allowed: {', '.join(ROLES)})", "messages")
            messages.append({"role": m.role, "content": m.text()})
        try:
            ids, starts = encode_messages(tokenizer, messages, memory)
        except TokenizerError as e:
            raise APIError(400, str(e), "messages") from None
        return await answer(body, request, ids, starts, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of prompts is not supported)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = ([bos] if (bos := tokenizer.bos_token_id) is not None else []) + tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is out of the vocabulary [0, {tokenizer.vocab_size})", "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        return await answer(body, request, ids, None, chat=False)

    def check(body: SamplingRequest) -> None:
        if body.model != settings.model_name:
            raise APIError(
                404, f"model {body.model!r} does not exist (this server has {settings.model_name!r})", "model"
            )
        body.check_supported()

    async def answer(body: SamplingRequest, request: Request, ids: list[int], starts, chat: bool):
        endpoint = "chat" if chat else "completions"
        limit = body.token_limit or settings.sampling.max_new_tokens
        try:  # the overflow policy may drop the oldest turns; a prompt that cannot fit even so is refused
            loop.engine.admissible(ids, starts, limit)
        except TurnRefused as e:
            too_long = len(ids) >= settings.max_seq_len
            field = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
            raise APIError(400, str(e), ("messages" if chat else "prompt") if too_long else field) from None
        defaults = settings.sampling
        sampling = replace(
            defaults,
            max_new_tokens=limit,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
        )
        seed = body.seed if body.seed is not None else uuid.uuid4().int >> 65
        call = Call(ids, starts, sampling, seed, asyncio.get_running_loop())
        try:
            loop.submit(call)
        except Busy as e:
            metrics.requests.labels(endpoint, "503").inc()
            raise APIError(503, f"server busy: {e}; retry later", kind="server_error") from None
        reply = ReplyText(tokenizer, body.stops)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                stream(call, reply, rid, chat, usage, endpoint, request), media_type="text/event-stream"
            )
        return await whole(call, reply, rid, chat, endpoint, request)

    async def events(call: Call, reply: ReplyText, request: Request) -> AsyncIterator[tuple[str, object]]:
        """("text", delta) as tokens come, then ("done", turn) or an APIError raised; a client that goes away, or a
        stop string, cancels the turn."""
        last, gaps = None, []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(call.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event[0] == "error":
                    raise APIError(400, event[1], "messages" if call.turn_starts is not None else "prompt")
                if event[0] == "done":
                    turn = event[1]
                    if delta := reply.finish():
                        yield "text", delta
                    metrics.turn_done(turn, gaps)
                    if not reply.stopped and turn.finish_reason != "cancelled":
                        memory.remember(turn.prompt, reply.text, turn.generated)
                    yield "done", turn
                    return
                _, token, at = event
                if last is not None:
                    gaps.append(at - last)
                last = at
                if reply.stopped:
                    continue
                if delta := reply.push(token):
                    yield "text", delta
                if reply.stopped:
                    loop.cancel(call)
        finally:
            if not call.settled:
                loop.cancel(call)

    def finish_reason(turn: Turn, reply: ReplyText) -> str:
        return "stop" if reply.stopped or turn.finish_reason == "stop" else "length"

    def usage(turn: Turn) -> dict:
        s = turn.stats
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": len(turn.generated),
            "total_tokens": s.prompt_tokens + len(turn.generated),
            "prompt_tokens_details": {"cached_tokens": s.reused_tokens},
        }

    async def whole(call: Call, reply: ReplyText, rid: str, chat: bool, endpoint: str, request: Request):
        turn = None
        try:
            async for kind, value in events(call, reply, request):
                if kind == "done":
                    turn = value
        except APIError:
            metrics.requests.labels(endpoint, "400").inc()
            raise
        if turn is None:  # the client went away
            metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        metrics.requests.labels(endpoint, "200").inc()
        reason = finish_reason(turn, reply)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": reply.text, "finish_reason": reason, "logprobs": None}
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [choice],
            "usage": usage(turn),
        }

    async def stream(call, reply, rid, chat, include_usage, endpoint, request) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, first: bool = False, usage_: dict | None = None) -> str:
            if usage_ is not None:
                choices = []
            elif chat:
                message = {"role": "assistant", "content": delta or ""} if first else {"content": delta or ""}
                choices = [
                    {"index": 0, "delta": message if delta is not None or first else {}, "finish_reason": reason}
                ]
            else:
                choices = [{"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}]
            data = {"id": rid, "object": kind, "created": created, "model": settings.model_name, "choices": choices}
            if usage_ is not None:
                data["usage"] = usage_
            return f"data: {json.dumps(data)}\n\n"

        if chat:
            yield chunk("", None, first=True)
        try:
            async for event, value in events(call, reply, request):
                if event == "text":
                    yield chunk(value, None)
                else:
                    yield chunk(None, finish_reason(value, reply))
                    if include_usage:
                        yield chunk(None, None, usage_=usage(value))
                    metrics.requests.labels(endpoint, "200").inc()
        except APIError as e:
            metrics.requests.labels(endpoint, "400").inc()
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return app
