"""`llm generate` (one completion, streamed to stdout) and `llm chat` (a conversation in the terminal)."""
from collections.abc import Iterator
from typing import Annotated, Optional

import typer

from llmserve.cli.engine_options import ModelOption, build_engine, engine_command
from llmserve.cli.main import app
from llmserve.engine import LLMEngine
from llmserve.sampling_params import SamplingParams
from llmserve.tokenizer import apply_chat_template, streamable_text

MaxTokens = Annotated[Optional[int], typer.Option(help="Most tokens to generate (default: up to the context).")]
Temperature = Annotated[Optional[float], typer.Option(help="0 is greedy (default: the model's, else 1.0).")]
TopP = Annotated[Optional[float], typer.Option(help="Nucleus sampling (default: the model's, else 1.0).")]


def sampling(engine: LLMEngine, max_tokens: int | None, temperature: float | None, top_p: float | None,
             seed: int | None = None) -> SamplingParams:
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    return SamplingParams(**(engine.sampling_defaults | {k: v for k, v in given.items() if v is not None}), seed=seed)


def stream_text(engine: LLMEngine, token_ids: list[int], params: SamplingParams) -> Iterator[str]:
    """Run one request on the engine, yielding its text as it grows."""
    request_id = engine.add_request(None, token_ids, params, token_ids)
    sent = 0
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                completion = output.outputs[0]
                text = streamable_text(completion.text, params.stop_strings, completion.finished)
                yield text[sent:]
                sent = len(text)
    finally:
        engine.abort(request_id)


@app.command()
@engine_command
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to complete.")],
    model: ModelOption = None, max_tokens: MaxTokens = 256, temperature: Temperature = None, top_p: TopP = None,
    *, engine_args: dict,
) -> None:
    """Complete PROMPT with the model, streaming the text to stdout."""
    engine = build_engine(LLMEngine, model, engine_args)
    params = sampling(engine, max_tokens, temperature, top_p, engine_args["seed"])
    try:
        token_ids = engine.tokenize(prompt)
        engine.validate(token_ids, params)
    except ValueError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(2) from None
    for delta in stream_text(engine, token_ids, params):
        typer.echo(delta, nl=False)
    typer.echo()


@app.command()
@engine_command
def chat(
    url: Annotated[Optional[str], typer.Option(help="Chat with a running `llm serve` at this base URL "
                                                    "(e.g. http://127.0.0.1:8000/v1) instead of a local engine.")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="LLMSERVE_API_KEY", help="API key for --url.")] = None,
    model: ModelOption = None, system: Annotated[Optional[str], typer.Option(help="A system prompt.")] = None,
    max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None,
    *, engine_args: dict,
) -> None:
    """Chat in the terminal: type a message, read the streamed answer; an empty line or Ctrl-D ends it."""
    messages = [{"role": "system", "content": system}] if system else []
    if url:
        reply = remote_replier(url, api_key, model, max_tokens, temperature, top_p)
    else:
        engine = build_engine(LLMEngine, model, engine_args)
        params = sampling(engine, max_tokens, temperature, top_p)

        def reply(conversation: list[dict]) -> Iterator[str]:
            return stream_text(engine, apply_chat_template(engine.tokenizer, conversation, engine.chat_template), params)
    while True:
        try:
            message = input("> ")
        except (EOFError, KeyboardInterrupt):
            break
        if not message.strip():
            break
        messages.append({"role": "user", "content": message})
        answer = ""
        try:
            for delta in reply(messages):
                typer.echo(delta, nl=False)
                answer += delta
        except ValueError as e:  # e.g. the conversation outgrew the context
            typer.secho(f"error: {e}", err=True, fg="red")
            messages.pop()
            continue
        typer.echo()
        messages.append({"role": "assistant", "content": answer})


def remote_replier(url: str, api_key: str | None, model: str | None, max_tokens, temperature, top_p):
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key or "none")
    model = model or client.models.list().data[0].id

    def reply(conversation: list[dict]) -> Iterator[str]:
        stream = client.chat.completions.create(model=model, messages=conversation, stream=True, max_tokens=max_tokens,
                                                temperature=temperature, top_p=top_p)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    return reply
