"""`python -m llmserve.cli`: the `llm` command."""
from llmserve.cli.main import app

app(prog_name="llm")
