"""`llm`: the command line entry point; each subcommand lives in its own module."""
import sys

import typer

# Options that take several values after one flag, as vLLM's do (`--api-key k1 k2`); Typer takes one per flag.
MULTI_VALUE_OPTIONS = ("--api-key", "--served-model-name", "--allowed-origins", "--allowed-methods",
                       "--allowed-headers")


SPREAD_OPTIONS: set[str] = set()  # the options that took several values after one flag on this command line


def spread_values(args: list[str]) -> list[str]:
    """`--api-key k1 k2` -> `--api-key k1 --api-key k2`: the values after such a flag, up to the next option."""
    spread, option, taken = [], None, 0
    for arg in args:
        if arg == "--" or arg.startswith("-"):
            option, taken = (arg, 0) if arg in MULTI_VALUE_OPTIONS else (None, 0)
        elif option is not None:
            if taken:
                spread.append(option)
                SPREAD_OPTIONS.add(option)
            taken += 1
        spread.append(arg)
    return spread


class CommandLine(typer.Typer):
    def __call__(self, *args, **kwargs):
        if not args and "args" not in kwargs:
            kwargs["args"] = spread_values(sys.argv[1:])
        return super().__call__(*args, **kwargs)


app = CommandLine(help="llmserve: a small, plugin-based LLM inference and serving engine.", no_args_is_help=True)


bench_app = typer.Typer(help="Benchmarks: a running server (serve), the engine offline (throughput, latency).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.callback()
def main() -> None:
    """llmserve: a small, plugin-based LLM inference and serving engine."""
from llmserve.cli import bench, bench_offline, generate, plugins, serve  # noqa: E305,E402,F401  (each registers its commands)
