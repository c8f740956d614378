"""`llm plugins`: the platforms, attention backends, models, parsers, executors and quantization methods registered
here, and who provides them.

Listing imports the plugin modules (they name their classes lazily) and the backend classes, to ask each
why_unsupported(); it never imports a model class or a GPU-only package (backends keep those inside functions).
"""
import importlib.metadata
import json
from typing import Annotated

import typer

from llmserve.cli.main import app
from llmserve.interfaces import AttentionSpec, Platform
from llmserve.plugins.conformance import DEFAULT_MODELS
from llmserve.plugins.manager import ENTRY_POINT_GROUP, Registration, registry
from llmserve.plugins.select import current_platform


def representative_spec(platform: type[Platform]) -> AttentionSpec:
    """A backend's support depends on the model: ask about the default model's attention (SmolLM2-135M)."""
    return AttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, dtype=platform.default_dtype(), block_size=16)


def describe(r: Registration) -> dict:
    return {"name": r.name, "distribution": r.distribution, "version": r.version, "target": r.target}


def describe_backend(r: Registration, spec: AttentionSpec, platform: str) -> dict:
    details = []
    try:
        backend = r.load()
        reasons = backend.why_unsupported(spec, platform)
        details = backend.details(spec, platform) if not reasons else []
    except RuntimeError as e:  # the backend's module failed to import
        reasons = [str(e)]
    return describe(r) | {"available": not reasons, "reasons": reasons, "details": details}


def failure(plugin: str, error: str) -> dict:
    """A plugin that failed to load, with the distribution to fix or uninstall (None for a built-in module)."""
    dist = next((ep.dist for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=plugin)), None)
    return {"plugin": plugin, "distribution": dist and dist.name, "version": dist and dist.version, "error": error}


def collect() -> dict:
    reg, platform = registry(), current_platform()
    spec = representative_spec(platform)
    return {
        "platform": platform.name,
        "attention_spec": {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                           "dtype": str(spec.dtype).removeprefix("torch."), "block_size": spec.block_size},
        "platforms": [describe(r) | {"active": r.name == platform.name} for r in reg.of("platform").values()],
        "attention_backends": [describe_backend(r, spec, platform.name) for r in reg.of("attention_backend").values()],
        "models": [describe(r) for r in reg.of("model").values()],
        "tool_parsers": [describe(r) for r in reg.of("tool_parser").values()],
        "reasoning_parsers": [describe(r) for r in reg.of("reasoning_parser").values()],
        "executors": [describe(r) for r in reg.of("executor").values()],
        "quantization_methods": [describe(r) for r in reg.of("quantization").values()],
        "failures": [failure(plugin, error) for plugin, error in reg.failures.items()],
    }


def render(listing: dict) -> str:
    def rows(entries: list[dict], mark=lambda e: "") -> list[str]:
        width = max((len(e["name"]) for e in entries), default=0)
        return [f"  {mark(e)}{e['name']:<{width}}  {e['distribution']} {e['version']}" for e in entries]

    s = listing["attention_spec"]
    lines = ["Platforms (* = active here):", *rows(listing["platforms"], lambda e: "* " if e["active"] else "  "),
             f"Attention backends on {listing['platform']}, checked against a model like the default one "
             f"({s['num_heads']} heads, {s['num_kv_heads']} KV heads, head_dim {s['head_dim']}, {s['dtype']}, "
             f"block size {s['block_size']}):"]
    backends = listing["attention_backends"]
    for backend, row in zip(backends, rows(backends, lambda e: "ok  " if e["available"] else "no  "), strict=True):
        lines += [row, *(f"        - {line}" for line in backend["reasons"] + backend["details"])]
    lines += ["Model architectures:", *rows(listing["models"]), "Tool-call parsers (--tool-call-parser):",
              *rows(listing["tool_parsers"]), "Reasoning parsers (--reasoning-parser):",
              *rows(listing["reasoning_parsers"]), "Distributed executors (--distributed-executor-backend):",
              *rows(listing["executors"]), "Quantization methods (--quantization, or a checkpoint's quant_method):",
              *rows(listing["quantization_methods"])]
    if listing["failures"]:
        lines.append("Plugins that failed to load (skipped):")
    for f in listing["failures"]:
        origin = f" ({f['distribution']} {f['version']})" if f["distribution"] else ""
        lines.append(f"  {f['plugin']}{origin}: {f['error']}")
    return "\n".join(lines)


plugins_app = typer.Typer(help="Platforms, attention backends, models and parsers: list them, or check a backend.")
app.add_typer(plugins_app, name="plugins")


@plugins_app.callback(invoke_without_command=True)
def plugins(ctx: typer.Context,
            as_json: Annotated[bool, typer.Option("--json", help="Print the listing as JSON.")] = False) -> None:
    """List platforms, attention backends, model architectures and parsers, with the package that provides each."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        listing = collect()
    except RuntimeError as e:  # e.g. two plugins registering one name
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(listing, indent=2) if as_json else render(listing))


@plugins_app.command("check")
def check(backend: Annotated[str, typer.Argument(help="The attention backend to check, e.g. TRITON_ATTN.")],
          models: Annotated[str, typer.Option(
              "--models", help="Architectures for the engine stage, comma-separated, or 'all'.")] = ",".join(
              DEFAULT_MODELS),
          stages: Annotated[str, typer.Option(
              "--stages", help="Which stages, comma-separated: kernels, engine.")] = "kernels,engine",
          as_json: Annotated[bool, typer.Option("--json", help="Print the outcomes as JSON.")] = False) -> None:
    """Run an attention backend (ours or a plugin's) through the conformance kit on this machine: its kernels against
    the fp32 paged-attention reference over a grid of shapes, then the engine with it against TORCH_SDPA on tiny
    random models (Llama and Qwen3 unless --models says otherwise; with CUDA graphs where it claims them). Exits 1 when
    anything fails."""
    from dataclasses import asdict

    from llmserve.plugins.conformance import model_configs, run_checks

    def progress(outcome) -> None:
        if not as_json:
            typer.echo(f"  {outcome.stage} {outcome.case}: {outcome.result}", err=True)

    try:
        unknown = set(stages.split(",")) - {"kernels", "engine"}
        if unknown:
            raise ValueError(f"unknown stage {', '.join(sorted(unknown))}; the stages are kernels and engine")
        report = run_checks(backend, progress, list(model_configs()) if models == "all" else models.split(","),
                            tuple(stages.split(",")))
    except ValueError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(2) from None
    typer.echo(json.dumps(asdict(report), indent=2) if as_json else report.table())
    if report.failed:
        raise typer.Exit(1)
