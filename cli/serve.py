"""`llm serve`: the OpenAI-compatible server on one engine."""
import contextlib
import functools
import json
import logging
import signal
from importlib.metadata import version
from typing import Annotated, Optional

import typer
import uvicorn

from llmserve.async_engine import AsyncEngine
from llmserve.cli.engine_options import build_engine, engine_command
from llmserve.cli.main import SPREAD_OPTIONS, app
from llmserve.engine import freeze_startup_heap
from llmserve.loader import DEFAULT_MODEL
from llmserve.server.protocol import RequestLimits

SHUTDOWN_GRACE_SECONDS = 5  # in-flight requests get this long to finish after SIGINT/SIGTERM, then are aborted
LIMITS = RequestLimits()


def server_option(help: str, **kwargs) -> typer.Option:
    return typer.Option(help=help, rich_help_panel="Server", **kwargs)


@app.command()
@engine_command
def serve(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", help=f"HF folder, .gguf file or hub id (default: the "
                                                        f"embedded {DEFAULT_MODEL}).")] = None,
    model_option: Annotated[Optional[str], typer.Option("--model", help="MODEL, as vLLM's --model.")] = None,
    host: Annotated[str, server_option("Address to bind; the default serves this machine only, 0.0.0.0 serves the "
                                       "network.")] = "127.0.0.1",
    port: Annotated[int, server_option("Port to listen on.")] = 8000,
    api_key: Annotated[Optional[list[str]], server_option(
        "Key clients must send as 'Authorization: Bearer KEY' on /v1 routes; several after one flag (--api-key k1 k2) "
        "or the flag repeated; LLMSERVE_API_KEY or VLLM_API_KEY may hold several, space-separated.",
        envvar=["LLMSERVE_API_KEY", "VLLM_API_KEY"])] = None,
    served_model_name: Annotated[Optional[list[str]], server_option(
        "Name(s) clients use for the model (repeatable; default: MODEL).")] = None,
    allowed_origins: Annotated[Optional[list[str]], server_option(
        "CORS: origins whose browser pages may call the server (repeatable or a JSON list, '*' for any); default: "
        "none, no CORS headers.")] = None,
    allowed_methods: Annotated[Optional[list[str]], server_option("CORS: allowed methods (default: all).")] = None,
    allowed_headers: Annotated[Optional[list[str]], server_option("CORS: allowed headers (default: all).")] = None,
    allow_credentials: Annotated[bool, server_option("CORS: allow credentials (cookies).")] = False,
    ssl_keyfile: Annotated[Optional[str], server_option("TLS private key file (with --ssl-certfile: HTTPS).")] = None,
    ssl_certfile: Annotated[Optional[str], server_option("TLS certificate file.")] = None,
    root_path: Annotated[str, server_option("URL prefix a reverse proxy adds in front of the server.")] = "",
    max_n: Annotated[int, server_option("The most choices (n) one request may ask for.")] = LIMITS.max_n,
    max_prompts_per_request: Annotated[int, server_option(
        "The most prompts in one /v1/completions request.")] = LIMITS.max_prompts,
    max_stop_strings: Annotated[int, server_option("The most stop strings in one request.")] = LIMITS.max_stop_strings,
    max_stop_string_chars: Annotated[int, server_option(
        "The longest stop string, in characters.")] = LIMITS.max_stop_string_chars,
    max_request_tokens: Annotated[int, server_option(
        "The most tokens one request may ask to generate: n x max_tokens over its prompts (without max_tokens, the "
        "rest of the context).")] = LIMITS.max_request_tokens,
    enable_auto_tool_choice: Annotated[bool, server_option(
        "Let the model decide when to call tools (tool_choice 'auto'); needs --tool-call-parser.")] = False,
    tool_call_parser: Annotated[Optional[str], server_option(
        "How the model writes tool calls: hermes (Qwen2.5, Qwen3), llama3_json, mistral (`llm plugins` lists all).")
    ] = None,
    reasoning_parser: Annotated[Optional[str], server_option(
        "Split the model's reasoning from its answer into message.reasoning: qwen3, deepseek_r1.")] = None,
    allow_unknown_fields: Annotated[bool, server_option(
        "Drop request fields the server does not know, with a warning in the log, as vLLM does (default: refuse "
        "them with a 400 naming the field).")] = False,
    engine_in_process: Annotated[bool, server_option(
        "Step the engine in a thread of the server's process instead of a process of its own (one core for both: "
        "slower under load; for debugging).")] = False,
    *, engine_args: dict,
) -> None:
    """Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), plus /health,
    /metrics, /tokenize, /detokenize and /version."""
    from llmserve.server.app import ChatParsing, CorsSettings, create_app

    if model and model_option and model != model_option:
        raise typer.BadParameter(f"MODEL {model!r} and --model {model_option!r} differ", param_hint="--model")
    spread = sorted(SPREAD_OPTIONS & {"--api-key", "--served-model-name"})
    if spread and not (model or model_option):  # was the last "value" meant as MODEL? Refuse to guess.
        raise typer.BadParameter(f"{spread[0]} took several values and no MODEL was given: name MODEL before "
                                 f"{spread[0]}, or give --model (--model {DEFAULT_MODEL} for the default)",
                                 param_hint=spread[0])
    model = model or model_option
    if bool(ssl_keyfile) != bool(ssl_certfile):
        raise typer.BadParameter("give both --ssl-keyfile and --ssl-certfile", param_hint="--ssl-certfile")
    keys = [key for value in api_key or [] for key in value.split()]
    try:
        parsing = ChatParsing(tool_call_parser, enable_auto_tool_choice, reasoning_parser)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--tool-call-parser / --reasoning-parser") from None
    engine = build_engine(functools.partial(AsyncEngine, in_process=engine_in_process), model, engine_args)
    names = served_model_name or [model or DEFAULT_MODEL]
    info = engine.info
    limits = RequestLimits(max_n, max_prompts_per_request, max_stop_strings, max_stop_string_chars,
                           info.max_logprobs, max_request_tokens, allow_unknown_fields)
    cors = CorsSettings(json_list(allowed_origins), json_list(allowed_methods) or ["*"],
                        json_list(allowed_headers) or ["*"], allow_credentials)
    scheme = "https" if ssl_certfile else "http"
    typer.echo(f"llmserve {version('llmserve')}: model {names[0]} ({info.model_path}), platform {info.platform}, "
               f"attention backend {info.attention_backend}, dtype {info.dtype}, max_model_len {info.max_model_len}")
    typer.echo(f"listening on {scheme}://{host}:{port}{root_path} (OpenAI API under /v1)"
               f"{', API key required' if keys else ''}")
    config = uvicorn.Config(create_app(engine, names, keys, limits, cors, root_path, parsing), host=host, port=port,
                            log_level=logging.getLogger().level, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
                            ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, root_path=root_path,
                            # httptools parses HTTP in C where installed; asyncio's loop, not uvloop, which aborts the
                            # process when a socket lands on fd 0 (a supervisor that closed stdin)
                            loop="asyncio")
    freeze_startup_heap()  # the server's own start-up heap (the tokenizer, the web framework)
    try:
        GracefulServer(config, engine).run()
    finally:
        engine.shutdown()
    if engine.error is not None:  # the engine died (a tensor-parallel rank, say): a supervisor should restart us
        typer.echo(f"llmserve stopped: the engine died ({engine.error})", err=True)
        raise typer.Exit(1)
    typer.echo("llmserve stopped")


def json_list(values: list[str] | None) -> list[str]:
    """Values of a repeatable option, where one may also be a JSON list (vLLM's --allowed-origins '["*"]')."""
    result = []
    for value in values or []:
        result += json.loads(value) if value.startswith("[") else [value]
    return result


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that after SIGINT/SIGTERM it returns (once requests are done or aborted)
    instead of re-raising the signal, which would kill the process before the engine stops; and that it stops
    when the engine dies (/health has answered 503 since)."""

    def __init__(self, config: uvicorn.Config, engine) -> None:
        super().__init__(config)
        self.engine = engine
        self.dead_since: int | None = None  # the tick the engine was first seen dead

    async def on_tick(self, counter: int) -> bool:
        if not self.engine.alive:
            self.dead_since = counter if self.dead_since is None else self.dead_since
            if counter - self.dead_since >= 20:  # ticks are 0.1 s: /health answers 503 for two seconds first
                self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
