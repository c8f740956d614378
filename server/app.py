"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncEngine."""
import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from llmserve.async_engine import AsyncEngine, EngineDeadError, EngineFault, RequestStream
from llmserve.errors import ParamError
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.metrics import Metrics
from llmserve.server.parsers import ForcedToolCalls, ReplyParser, load_parser, tool_call_schema
from llmserve.server.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, RequestLimits,
                                      SamplingRequest, TokenizeRequest)
from llmserve.structured_outputs import StructuredOutputsParams
from llmserve.server.render import ChatRenderer, CompletionRenderer, Renderer
from llmserve.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 8 << 20
REQUEST_ID_CHARS = 128  # a longer X-Request-Id is cut, one with other than [A-Za-z0-9._-] replaced


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, param, code).body(), status)


def error_for(e: Exception) -> APIError:
    """The API error for an exception raised while serving: bad input is 400, the rest is the engine's fault."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ParamError):
        return APIError(400, str(e), e.field)
    if isinstance(e, ValueError):  # bad input that names no single field (e.g. a model without a chat template)
        return APIError(400, str(e))
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    if not isinstance(e, EngineFault):
        logger.exception("internal error while serving a request")
    return APIError(500, str(e) if isinstance(e, EngineFault) else f"internal error: {type(e).__name__}")


class Guard:
    """ASGI middleware: API keys on /v1 routes (constant-time compare; a CORS preflight needs none), a bound on body
    size, and one request id (the client's X-Request-Id, else a new one) for the engine, the logs and the reply."""

    def __init__(self, app, api_keys: list[str]) -> None:
        self.app, self.keys = app, [k.encode() for k in api_keys]

    def authorized(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        return any([secrets.compare_digest(token, key) for key in self.keys])  # compares with every key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = clean_request_id(headers.get(b"x-request-id")) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.guarded(scope, receive, send_with_id, headers)
        except Exception as e:  # unexpected: answered here, inside CORS and with the request id, not by Starlette
            if started:
                raise
            logger.exception("request %s: internal error", request_id)
            await error_response(500, f"internal error: {type(e).__name__}")(scope, receive, send_with_id)

    async def guarded(self, scope, receive, send, headers: dict) -> None:
        path, root = scope["path"], scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path  # uvicorn puts --root-path in front
        needs_key = self.keys and route.startswith("/v1") and scope["method"] != "OPTIONS"
        if needs_key and not self.authorized(headers.get(b"authorization")):
            return await error_response(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                        code="invalid_api_key")(scope, receive, send)
        too_large = error_response(413, f"request body is larger than {MAX_REQUEST_BYTES} bytes",
                                   code="request_too_large")
        if int(headers.get(b"content-length", 0)) > MAX_REQUEST_BYTES:
            return await too_large(scope, receive, send)
        if b"content-length" in headers:
            return await self.app(scope, receive, send)
        body, more = b"", True  # a chunked body: read it whole, up to the bound
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_REQUEST_BYTES:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def clean_request_id(raw: bytes | None) -> str:
    text = (raw or b"").decode("latin-1")[:REQUEST_ID_CHARS]
    return "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in text)


@dataclass
class ChatParsing:
    """How chat replies are read: `llm serve --tool-call-parser/--enable-auto-tool-choice/--reasoning-parser`."""

    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        self.tool_parser_class = load_parser("tool_parser", self.tool_call_parser)
        self.reasoning_parser_class = load_parser("reasoning_parser", self.reasoning_parser)


@dataclass
class Server:
    engine: AsyncEngine
    model_names: list[str]
    metrics: Metrics
    limits: RequestLimits
    parsing: ChatParsing

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_names}",
                           "model", "model_not_found")

    async def start(self, request_id: str, prompts: list, token_ids: list[list[int]],
                    params: SamplingParams) -> RequestStream:
        """The call's requests, once the engine has accepted them (it compiles a grammar first, off its loop).
        The engine's id is the response's plus a suffix of its own: a client may reuse its X-Request-Id while an
        earlier request of that id is still being torn down."""
        return await self.engine.add_requests(f"{request_id}-{uuid.uuid4().hex[:8]}", prompts, params, token_ids)

    def check(self, body: SamplingRequest, request_id: str, token_ids: list[list[int]], max_tokens: int | None,
              logprobs: int | None) -> None:
        body.check(self.limits, [len(t) for t in token_ids], max_tokens, logprobs, self.engine.info.max_model_len)
        if body.unknown_fields():
            logger.warning("request %s: dropped unknown fields %s", request_id, body.unknown_fields())

    def tool_plan(self, body: ChatRequest) -> tuple[list[dict] | None, ReplyParser | None,
                                                    StructuredOutputsParams | None]:
        """The tools the template sees, how the reply is read, and the schema a forced tool call must follow."""
        mode = body.chosen_tool()
        if mode == "auto" and not self.parsing.enable_auto_tool_choice:
            raise ParamError("tool_choice", '"auto" tool choice needs `llm serve --enable-auto-tool-choice '
                                            '--tool-call-parser NAME`; or give tool_choice "none", "required" or a '
                                            "named function")
        tools = body.tool_dicts() if mode != "none" else None
        tool_parser, forced = None, None
        if mode == "auto":
            tool_parser = self.parsing.tool_parser_class()
        elif mode in ("required", "named"):
            if body.response_format is not None or body.structured_outputs is not None:
                raise ParamError("tool_choice", f"tool_choice {mode!r} cannot be combined with response_format or "
                                                "structured_outputs")
            function = body.tool_choice.function.name if mode == "named" else None
            tool_parser = ForcedToolCalls(function)
            forced = StructuredOutputsParams(json=tool_call_schema(tools, function, body.parallel_tool_calls))
        # a grammar holds the reply from its first token: it never continues a reasoning the prompt opened
        constrained = forced is not None or body.response_format is not None or body.structured_outputs is not None
        reasoning = self.parsing.reasoning_parser_class
        if constrained and reasoning is not None and reasoning.starts_thinking:
            reasoning = None
        if tool_parser is None and reasoning is None:
            return tools, None, None
        return tools, ReplyParser(reasoning and reasoning(), tool_parser, body.parallel_tool_calls), forced

    async def respond(self, raw: Request, body: SamplingRequest, stream: RequestStream, renderer: Renderer):
        if body.stream:
            return StreamingResponse(self.events(stream, renderer, body.include_usage), media_type="text/event-stream")
        return await until_disconnected(raw, self.collect(stream, renderer), stream)

    async def collect(self, stream: RequestStream, renderer: Renderer) -> dict:
        final: dict[int, RequestOutput] = {}
        try:
            async for _ in self.observe(stream, final):
                pass
        finally:
            stream.abort()
        return renderer.response([final[i] for i in range(len(final))])

    async def events(self, stream: RequestStream, renderer: Renderer, include_usage: bool) -> AsyncIterator[str]:
        final: dict[int, RequestOutput] = {}
        try:
            async for index, output in self.observe(stream, final):
                for chunk in renderer.chunks(index, output):
                    yield sse(chunk)
            if include_usage:
                yield sse(renderer.usage_chunk([final[i] for i in range(len(final))]))
        except Exception as e:
            yield sse(error_for(e).body())
        finally:
            stream.abort()  # a no-op when all finished; when the client left, frees the KV blocks at once
        yield "data: [DONE]\n\n"

    async def observe(self, stream: RequestStream, final: dict[int, RequestOutput]):
        """The stream's outputs, timed for /metrics; `final` keeps each prompt's newest."""
        timers = [self.metrics.timer() for _ in stream.index]
        async for index, output in stream:
            timers[index].observe(output)
            final[index] = output
            yield index, output


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def until_disconnected(raw: Request, work, stream: RequestStream):
    """Run `work`, aborting the requests if the client hangs up first (a non-streamed response)."""
    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    stream.abort()
    return Response(status_code=499)


@dataclass
class CorsSettings:
    allowed_origins: list[str]
    allowed_methods: list[str]
    allowed_headers: list[str]
    allow_credentials: bool = False


def create_app(engine: AsyncEngine, model_names: list[str], api_keys: list[str] = (),
               limits: RequestLimits | None = None, cors: CorsSettings | None = None, root_path: str = "",
               parsing: ChatParsing | None = None) -> FastAPI:
    """The app; `cors` with no allowed origin (the default) adds no CORS headers, so browsers of other sites cannot
    call the server."""
    app = FastAPI(title="llmserve", version=version("llmserve"), root_path=root_path)
    limits = limits or RequestLimits(max_logprobs=engine.info.max_logprobs)
    server = Server(engine, model_names, Metrics(engine), limits, parsing or ChatParsing())
    app.state.server = server
    info = engine.info

    async def on_error(_: Request, e: Exception) -> JSONResponse:
        error = error_for(e)
        return JSONResponse(error.body(), error.status)

    for kind in (APIError, ValueError, EngineFault, EngineDeadError, Exception):  # Exception: any other is a 500
        app.add_exception_handler(kind, on_error)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body")
        return error_response(400, f"{field or 'body'}: {first['msg']}", field or None)

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response(503, "the engine is not running", code="engine_dead")
        return Response(status_code=200)

    @app.get("/version")
    async def show_version() -> dict:
        return {"version": version("llmserve")}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            tokens = apply_chat_template(info.tokenizer, [m.to_template_input() for m in body.messages],
                                         info.chat_template)
        else:
            tokens = info.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        server.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < info.vocab_size]
        if bad:
            raise APIError(400, f"tokens must be in [0, {info.vocab_size}), got {bad[:5]}", "tokens")
        return {"prompt": info.tokenizer.decode(body.tokens)}

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmserve",
                                            "root": info.model_path, "max_model_len": info.max_model_len}
                                           for name in model_names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        server.check_model(body.model)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported", "suffix")
        prompts = body.prompts(server.limits)
        token_ids = [engine.tokenize(p) for p in prompts]
        request_id = f"cmpl-{raw.state.request_id}"
        server.check(body, request_id, token_ids, body.max_tokens, body.logprobs)
        prompt_logprobs = body.logprobs if body.echo else None
        params = body.to_sampling_params(info.sampling_defaults, body.max_tokens, body.logprobs, prompt_logprobs)
        stream = await server.start(request_id, prompts, token_ids, params)
        renderer = CompletionRenderer(request_id, server.model_name, info.tokenizer, token_ids, params, body.echo)
        return await server.respond(raw, body, stream, renderer)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, raw: Request):
        server.check_model(body.model)
        conversation = [m.to_template_input() for m in body.messages]
        tools, reply_parser, forced = server.tool_plan(body)
        token_ids = [apply_chat_template(info.tokenizer, conversation, info.chat_template, body.add_generation_prompt,
                                         tools, body.chat_template_kwargs)]
        max_tokens = next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None),
                          info.sampling_defaults.get("max_tokens"))
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request_id = f"chatcmpl-{raw.state.request_id}"
        server.check(body, request_id, token_ids, max_tokens, top_logprobs)
        params = body.to_sampling_params(info.sampling_defaults, max_tokens, top_logprobs, structured_outputs=forced)
        if reply_parser and reply_parser.tools and reply_parser.tools.needs_special_tokens:
            params.skip_special_tokens = False  # the calls are marked by special tokens ([TOOL_CALLS])
        stream = await server.start(request_id, token_ids, token_ids, params)
        renderer = ChatRenderer(request_id, server.model_name, info.tokenizer, token_ids, params, body.logprobs,
                                reply_parser)
        return await server.respond(raw, body, stream, renderer)

    app.add_middleware(Guard, api_keys=list(api_keys))
    if cors and cors.allowed_origins:  # added last: outermost, so a preflight is answered before the key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_methods=cors.allowed_methods,
                           allow_headers=cors.allowed_headers, allow_credentials=cors.allow_credentials,
                           expose_headers=["X-Request-Id"])
    return app

