"""`llm serve`: the OpenAI-compatible server on one engine."""
import contextlib
import logging
import signal
from importlib.metadata import version
from typing import Annotated, Optional

import typer
import uvicorn

from llmserve.async_engine import AsyncEngine
from llmserve.cli.engine_options import build_engine, engine_command
from llmserve.cli.main import app
from llmserve.loader import DEFAULT_MODEL

SHUTDOWN_GRACE_SECONDS = 5  # in-flight requests get this long to finish after SIGINT/SIGTERM, then are aborted


@app.command()
@engine_command
def serve(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", help=f"HF folder, .gguf file or hub id (default: the embedded "
                                                        f"{DEFAULT_MODEL}).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; the default serves this machine only, "
                                           "0.0.0.0 serves the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[list[str]], typer.Option(
        envvar="LLMSERVE_API_KEY", help="Key clients must send as 'Authorization: Bearer KEY' on /v1 routes "
                                        "(repeatable; LLMSERVE_API_KEY may hold several, space-separated).")] = None,
    served_model_name: Annotated[Optional[list[str]], typer.Option(
        help="Name(s) clients use for the model (repeatable; default: MODEL).")] = None,
    *, engine_args: dict,
) -> None:
    """Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), plus /health,
    /metrics, /tokenize, /detokenize and /version."""
    from llmserve.server.app import create_app

    engine = build_engine(AsyncEngine, model, engine_args)
    names = served_model_name or [model or DEFAULT_MODEL]
    core = engine.engine
    typer.echo(f"llmserve {version('llmserve')}: model {names[0]} ({core.model_path}), platform {core.platform.name}, "
               f"attention backend {core.runner.backend.name}, dtype {str(core.runner.dtype).removeprefix('torch.')}, "
               f"max_model_len {core.max_model_len}")
    typer.echo(f"listening on http://{host}:{port} (OpenAI API under /v1){', API key required' if api_key else ''}")
    config = uvicorn.Config(create_app(engine, names, api_key or []), host=host, port=port,
                            log_level=logging.getLogger().level, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    try:
        GracefulServer(config).run()
    finally:
        engine.shutdown()
    typer.echo("llmserve stopped")


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that after SIGINT/SIGTERM it returns (once requests are done or aborted)
    instead of re-raising the signal, which would kill the process before the engine stops."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

