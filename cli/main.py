"""`llm`: the command line entry point; each subcommand lives in its own module."""
import typer

app = typer.Typer(help="llmserve: a small, plugin-based LLM inference and serving engine.", no_args_is_help=True)


bench_app = typer.Typer(help="Benchmarks: a running server (serve), the engine offline (throughput, latency).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.callback()
def main() -> None:
    """llmserve: a small, plugin-based LLM inference and serving engine."""
from llmserve.cli import bench, bench_offline, generate, plugins, serve  # noqa: E305,E402,F401  (each registers its commands)
