"""The offline API: LLM(...).generate(prompts, sampling_params) and LLM(...).chat(conversations)."""
import time

from tqdm import tqdm

from llmserve.config import EngineConfig
from llmserve.engine import LLMEngine
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.tokenizer import apply_chat_template

Prompt = str | list[int] | dict  # text, token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}


class LLM:
    """Offline batched inference. `LLM()` loads the embedded default model (SmolLM2-135M-Instruct)."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine."""
        return self.engine

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() uses without sampling_params: the model's generation_config defaults, else ours."""
        return self.engine.default_sampling_params()

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of the prompts."""
        prompts = normalize_prompts(prompts)
        params = sampling_params or self.engine.default_sampling_params()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        token_ids = [self.engine.tokenize(p) for p in prompts]
        for ids, p in zip(token_ids, params):  # everything is checked before anything is queued
            self.engine.validate(ids, p)
        ids = [self.engine.add_request(None, p, sp, t) for p, t, sp in zip(prompts, token_ids, params)]
        return self.run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Complete each conversation through the chat template; `tools` (OpenAI function definitions) and
        `chat_template_kwargs` (e.g. {"enable_thinking": False}) go to the template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        template = chat_template or self.engine.chat_template
        prompts = [apply_chat_template(self.engine.tokenizer, c, template, add_generation_prompt, tools,
                                       chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start, prompt_tokens, output_tokens = time.perf_counter(), 0, 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(finished_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        prompt_tokens += len(out.prompt_token_ids)
                        output_tokens += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"est. speed input: {prompt_tokens / elapsed:.2f} toks/s, "
                                            f"output: {output_tokens / elapsed:.2f} toks/s", refresh=False)
                        bar.update(1)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        finally:
            bar.close()
        return [done[i] for i in request_ids]


def normalize_prompts(prompts) -> list[str | list[int]]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    result = []
    for p in prompts:
        if isinstance(p, dict):
            p = p.get("prompt_token_ids", p.get("prompt"))
        if not isinstance(p, (str, list)):
            raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(p).__name__}")
        result.append(p)
    return result
