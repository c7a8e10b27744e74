"""The HTTP app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and /metrics. Every
request carries its whole conversation; the prefix tree finds whatever of it the pool holds, and the reply memory
gives replies generated here their own ids back, so a served conversation computes only its new tokens."""

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tp_infer.chat import ReplyMemory, encode_messages
from tp_infer.engine.engine import TurnRefused
from tp_infer.engine.request import Turn
from tp_infer.engine.sampling import SEED_RANGE, SamplingParams
from tp_infer.server.bridge import Busy, Call, EngineLoop
from tp_infer.server.metrics import Metrics
from tp_infer.server.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    Usage,
)
from tp_infer.server.worker import worker_router
from tp_infer.tokenizer import ROLES, ChatTokenizer, StreamDecoder, TokenizerError

MAX_BODY_BYTES = 16 * 2**20
MAX_MESSAGES = 4096


@dataclass
class ServerSettings:
    model_name: str
    max_seq_len: int  # the longest conversation this server runs: what /v1/models reports as max_model_len
    sampling: SamplingParams  # the command line's defaults
    api_keys: tuple[str, ...] = ()  # any of them is let in; none: no key is asked for
    max_body_bytes: int = MAX_BODY_BYTES  # larger request bodies are answered 413 before they are read whole
    max_messages: int = MAX_MESSAGES  # chat requests with more messages are answered 400 before rendering
    require_cache_salt: bool = False  # requests without a cache_salt are answered 400
    salt_with_api_key: bool = False  # the client's API key is part of its cache salt: keys never share prefixes


class ReplyText:
    """Generated ids as text deltas as `sampling` shows them (special tokens, the stop token), ending at the first
    stop string met from the min_tokens-th token on (sent only with include_stop_str_in_output)."""

    def __init__(self, tokenizer: ChatTokenizer, stops: list[str], sampling: SamplingParams):
        self.decoder = StreamDecoder(tokenizer, sampling.skip_special_tokens)
        self.stops, self.sampling = stops, sampling
        self.text, self.sent, self.stopped, self.count = "", 0, False, 0
        self.hold = max((len(s) for s in stops), default=1) - 1  # a stop string may be arriving

    def push(self, token: int) -> str:
        if self.stopped:  # tokens the engine made before the cancel reached it: not part of the reply
            return ""
        position, self.count = self.count, self.count + 1
        if self.sampling.shows(token, position):
            self.text += self.decoder.push(token)
        return self.release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self.release(final=True)

    def release(self, final: bool) -> str:
        if not self.stopped and self.count >= self.sampling.min_tokens:
            start = max(0, self.sent - self.hold)
            cuts = [(i, s) for i, s in ((self.text.find(s, start), s) for s in self.stops) if i >= 0]
            if cuts:
                i, s = min(cuts)
                end = i + len(s) if self.sampling.include_stop_str_in_output else i
                self.text, self.stopped, final = self.text[:end], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out


def error_response(e: APIError, background: BackgroundTask | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, background=background)


class BodyLimit:
    """ASGI middleware: a request body past `limit` bytes is answered 413, by its content-length before anything is
    read, or as soon as the bytes read pass the limit (a chunked body)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than the {self.limit} bytes this server takes (--max-body-bytes)"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await error_response(APIError(413, message))(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            got = await receive()
            seen += len(got.get("body", b"")) if got["type"] == "http.request" else 0
            if seen > self.limit:
                raise HTTPException(413, message)
            return got

        await self.app(scope, limited, send)


class Authorize:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY` with one of `keys`, else 401.
    (Plain ASGI rather than Starlette's BaseHTTPMiddleware, which hides a client's disconnect from the app.)"""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app, self.keys = app, [f"Bearer {key}".encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not sum(hmac.compare_digest(given, key) for key in self.keys):  # every key compared: constant time
                error = APIError(401, "invalid or missing API key", kind="authentication_error")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def parse(raw: bytes, model: type[SamplingRequest]) -> SamplingRequest:
    """A request body as `model`, or the APIError (400) that says in one line what is wrong with it. Run off the
    event loop: a body of megabytes takes a while to parse."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise refusal(e.errors(include_input=False)[0]) from None


def refusal(error: dict) -> APIError:
    """The 400 for pydantic's first error about a request, naming the field."""
    loc = [str(x) for x in error.get("loc", ())]
    # a union (str | list[...]) reports one error per member: name the field, not the member
    param = ".".join(x for x in loc if not any(c in x for c in "[]|()") or x.isdigit()) or None
    message = f"{param}: {error.get('msg')}" if param else error.get("msg", "invalid request")
    if error.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}"
    if error.get("type") == "too_long" and param == "messages":
        count, most = error["ctx"]["actual_length"], error["ctx"]["max_length"]
        message = f"{count} messages, more than the {most} this server takes (--max-messages)"
    return APIError(400, message, param)


# the errors each operation may answer besides 200, for /openapi.json
ERRORS = {
    400: "Invalid request: bad JSON, an unknown or invalid field, a prompt past max_model_len",
    401: "Missing or wrong API key (with --api-key)",
    404: "Unknown model",
    413: "Request body larger than --max-body-bytes",
    500: "The turn failed inside the engine",
    503: "Too many requests in flight, or the engine has stopped",
}


def errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}


def takes(model: type[SamplingRequest]) -> dict:
    """The request body of an operation that reads its body itself (described() adds the model's schema)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def streamed(model: type) -> dict:
    """A 200 that is `model` as JSON, or server-sent events with `stream`."""
    data = "a chunk as JSON, then an error object if the turn failed, then [DONE]"
    event = {"type": "object", "properties": {"data": {"type": "string", "description": data}}, "required": ["data"]}
    events = {"text/event-stream": {"schema": event}}  # before Open API 3.2, `schema` describes one event
    return {200: {"description": f"{model.__name__}, or with stream=true its chunks as events", "content": events}}


def build_app(
    loop: EngineLoop, tokenizer: ChatTokenizer, settings: ServerSettings, metrics: Metrics, memory: ReplyMemory
) -> FastAPI:
    app = FastAPI(title="tp_infer", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_keys:
        app.add_middleware(Authorize, keys=settings.api_keys)  # added last: runs first
    endpoints = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

    def count(request: Request, status: int) -> None:
        if (endpoint := endpoints.get(request.url.path)) is not None:
            metrics.requests.labels(endpoint, str(status)).inc()

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        count(request, e.status)
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """Starlette's own answers (no such path, method not allowed, a body that cannot be read) as OpenAI's."""
        if e.status_code == 404:
            error = APIError(404, f"no such path: {request.url.path}")
        elif e.status_code == 405:
            error = APIError(405, f"{request.method} is not allowed on {request.url.path}")
        else:
            error = APIError(e.status_code, str(e.detail))
        count(request, error.status)
        response = error_response(error)
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Engine stopped"}})
    async def health() -> Response:
        return JSONResponse({"status": "ok" if loop.healthy else "failed"}, status_code=200 if loop.healthy else 503)

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(401)})
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=errors(401))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, max_model_len=settings.max_seq_len)])

    app.include_router(worker_router(loop, settings))  # what a gateway in front of replicas reads

    ChatRequest = ChatCompletionRequest.limited(settings.max_messages)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**streamed(ChatCompletion), **errors(400, 401, 404, 413, 500, 503)},
        openapi_extra=takes(ChatRequest),
    )
    async def chat_completions(request: Request):
        body = await read(request, ChatRequest)
        sampling, salt = check(body, request)
        messages = []
        for i, m in enumerate(body.messages):
            if m.role not in ROLES:
                raise APIError(400, f"messages[{i}]: unknown role {m.role!r} (allowed: {', '.join(ROLES)})", "messages")
            messages.append({"role": m.role, "content": m.text()})

        try:
            rendering = tokenizer.with_template_kwargs(body.chat_template_kwargs)
        except TokenizerError as e:
            raise APIError(400, str(e), "chat_template_kwargs") from None

        def encode() -> tuple[list[int], list[int] | None]:
            try:
                return encode_messages(rendering, messages, memory, salt)
            except TokenizerError as e:
                raise APIError(400, str(e), "messages") from None

        return await answer(body, request, sampling, salt, encode, chat=True)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={**streamed(Completion), **errors(400, 401, 404, 413, 500, 503)},
        openapi_extra=takes(CompletionRequest),
    )
    async def completions(request: Request):
        body = await read(request, CompletionRequest)
        sampling, salt = check(body, request)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of prompts is not supported)", "prompt")
            prompt = prompt[0]

        def encode() -> tuple[list[int], list[int] | None]:
            if isinstance(prompt, str):
                ids = ([bos] if (bos := tokenizer.bos_token_id) is not None else []) + tokenizer.encode(prompt)
            else:
                ids = list(prompt)
                # the model's vocabulary: its embedding may have more rows than the tokenizer has tokens
                vocab = loop.engine.runner.model.args.vocab_size
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise APIError(400, f"token id {bad} is out of the vocabulary [0, {vocab})", "prompt")
            if not ids:
                raise APIError(400, "the prompt is empty", "prompt")
            return ids, None

        return await answer(body, request, sampling, salt, encode, chat=False)

    async def read(request: Request, model: type[SamplingRequest]) -> SamplingRequest:
        return await run_in_threadpool(parse, await request.body(), model)

    def check(body: SamplingRequest, request: Request) -> tuple[SamplingParams, str | None]:
        """The request's sampling values and cache salt, or the APIError that refuses it: before any work."""
        if body.model != settings.model_name:
            raise APIError(
                404, f"model {body.model!r} does not exist (this server has {settings.model_name!r})", "model"
            )
        body.check_supported()
        defaults, limit_field = settings.sampling, token_field(body)
        try:  # SamplingParams knows what the sampler can take
            limit = body.token_limit or defaults.max_new_tokens
            sampling = replace(defaults, max_new_tokens=limit, **body.sampling_fields())
        except ValueError as e:  # its message starts with the field's name
            name = str(e).split()[0]
            raise APIError(400, str(e), limit_field if name == "max_new_tokens" else name) from None
        salt = body.cache_salt
        if salt is None and settings.require_cache_salt:
            message = "this server requires a cache_salt in every request (--require-cache-salt)"
            raise APIError(400, message, "cache_salt")
        if settings.salt_with_api_key:  # what was let in: a key of this server, or any with no key required
            key = request.headers.get("authorization", "")
            salt = hashlib.sha256(json.dumps([key, salt]).encode()).hexdigest()
        return sampling, salt

    def token_field(body: SamplingRequest) -> str:
        return "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"

    async def answer(body: SamplingRequest, request: Request, sampling: SamplingParams, salt, encode, chat: bool):
        def prepare() -> tuple[list[int], list[int] | None]:
            """Render and encode (time linear in the prompt at best: off the event loop, so /health answers)."""
            ids, starts = encode()
            try:  # the overflow policy may drop the oldest turns; a prompt that cannot fit even so is refused
                loop.engine.admissible(ids, starts, sampling.max_new_tokens)
            except TurnRefused as e:
                too_long = len(ids) >= settings.max_seq_len
                field = ("messages" if chat else "prompt") if too_long else token_field(body)
                raise APIError(400, str(e), field) from None
            return ids, starts

        ids, starts = await run_in_threadpool(prepare)
        seed = body.seed if body.seed is not None else uuid.uuid4().int >> 65
        call = Call(
            prompt=ids,
            turn_starts=starts,
            sampling=sampling,
            seed=seed,
            cache_salt=salt,
            loop=asyncio.get_running_loop(),
        )
        try:
            loop.submit(call)
        except Busy as e:
            raise APIError(503, f"{e}; retry later", kind="server_error") from None
        reply = ReplyText(tokenizer, body.stops, sampling)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(call, reply, rid, chat, usage, request), media_type="text/event-stream")
        return await whole(call, reply, rid, chat, request)

    def failure(call: Call, event: tuple) -> APIError:
        """The APIError of a turn that ended without a reply: ("refused" | "failed" | "stopped", message)."""
        kind, message = event
        if kind == "refused":
            return APIError(400, message, "messages" if call.turn_starts is not None else "prompt")
        return APIError(500 if kind == "failed" else 503, message, kind="server_error")

    async def events(call: Call, reply: ReplyText, request: Request) -> AsyncIterator[tuple[str, object]]:
        """("text", delta) as tokens come, then ("done", turn) or an APIError raised; nothing more when the client
        has gone away. A client that goes away (asked every POLL_S, tokens coming or not), or a stop string,
        cancels the turn on every rank."""
        last, gaps, asked = None, [], time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(call.events.get(), timeout=POLL_S)
                except TimeoutError:
                    event = None
                if event is None or time.monotonic() - asked >= POLL_S:
                    asked = time.monotonic()
                    if await request.is_disconnected():
                        return
                    if event is None:
                        continue
                if event[0] in ("refused", "failed", "stopped"):
                    raise failure(call, event)
                if event[0] == "done":
                    turn = event[1]
                    if delta := reply.finish():
                        yield "text", delta
                    metrics.turn_done(turn, gaps)
                    if not reply.stopped and turn.finish_reason != "cancelled":
                        memory.remember(turn.prompt, reply.text, turn.generated, call.cache_salt)
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

    def usage(turn: Turn, reply: ReplyText) -> Usage:
        """The turn's token counts; a reply cut at a stop string counts the tokens up to the one that completed it,
        not those the engine generated before the cancel reached it."""
        s = turn.stats
        completion = reply.count if reply.stopped else len(turn.generated)
        return Usage(
            prompt_tokens=s.prompt_tokens,
            completion_tokens=completion,
            total_tokens=s.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=s.reused_tokens),
        )

    async def whole(call: Call, reply: ReplyText, rid: str, chat: bool, request: Request):
        turn, delivered = None, call.delivered.set
        try:
            async for kind, value in events(call, reply, request):
                if kind == "done":
                    turn = value
        except APIError as e:
            count(request, e.status)
            delivered = None  # once the answer is sent
            return error_response(e, background=BackgroundTask(call.delivered.set))
        finally:
            if delivered is not None:
                delivered()
        if turn is None:  # the client went away
            count(request, 499)
            return Response(status_code=499)
        count(request, 200)
        reason, answered = finish_reason(turn, reply), {"id": rid, "created": int(time.time())}
        answered.update(model=settings.model_name, usage=usage(turn, reply))
        if chat:
            message = AssistantMessage(content=reply.text)
            return ChatCompletion(**answered, choices=[ChatChoice(index=0, message=message, finish_reason=reason)])
        return Completion(**answered, choices=[CompletionChoice(index=0, text=reply.text, finish_reason=reason)])

    async def stream(call, reply, rid, chat, include_usage, request) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, first: bool = False, usage_: Usage | None = None) -> str:
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
                data["usage"] = usage_.model_dump()
            return f"data: {json.dumps(data)}\n\n"

        status = 499  # unless it ends otherwise: the client went away
        try:
            if chat:
                yield chunk("", None, first=True)
            try:
                async for event, value in events(call, reply, request):
                    if event == "text":
                        yield chunk(value, None)
                    else:
                        yield chunk(None, finish_reason(value, reply))
                        if include_usage:
                            yield chunk(None, None, usage_=usage(value, reply))
                        status = 200
            except APIError as e:  # the stream has started: the error is its last event
                status = e.status
                yield f"data: {json.dumps(e.body())}\n\n"
            if status != 499:
                yield "data: [DONE]\n\n"
        finally:
            count(request, status)
            call.delivered.set()

    app.openapi = lambda: app.openapi_schema or described(app, settings, (ChatRequest, CompletionRequest))
    return app


POLL_S = 0.5  # how often a waiting request asks whether its client is still there


def described(app: FastAPI, settings: ServerSettings, requests: tuple[type[SamplingRequest], ...]) -> dict:
    """/openapi.json as the server answers: the request bodies' models (read by the routes themselves, so no
    FastAPI 422 anywhere), `model` this server's model and `role` one the chat template knows."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    del schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]["application/json"]  # text alone
    parts = schema["components"]["schemas"]
    for model in requests:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        parts.update(body.pop("$defs", {}))
        parts[model.__name__] = body
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        parts[name]["properties"]["model"] = {"type": "string", "enum": [settings.model_name], "title": "Model"}
    parts["ChatMessage"]["properties"]["role"] = {"type": "string", "enum": list(ROLES), "title": "Role"}
    for name in ("ChatCompletionRequest", "CompletionRequest"):  # as integers: JSON numbers this large lose digits
        parts[name]["properties"]["seed"]["anyOf"][0].update(minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
    app.openapi_schema = schema
    return schema
