"""The `llm` command line (Typer)."""
