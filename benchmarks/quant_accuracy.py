"""How far each quantization method moves a model from its float self: the mean KL divergence of the next-token
distributions over every prompt position, and greedy agreement (the first token, and 64-token continuations).

    python benchmarks/quant_accuracy.py                       # the embedded model's real weights, float32, CPU
    python benchmarks/quant_accuracy.py --model M --dtype bfloat16 --load-format dummy   # a GPU, random weights

Methods: fp8 (weights and activations, quantized at load), kv-fp8 (the KV cache in fp8), gptq-rtn and awq-rtn
(4-bit checkpoints written in GPTQ's and AWQ's formats by rounding to the nearest level: what the formats and their
kernels cost, without the tools' calibration). A short table is printed last; --json gets the figures.
"""
import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

TEXT = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "Water boils at a temperature of", "Once upon a time, in a small village by the sea,",
        "The three primary colors are", "import numpy as np\n\ndef softmax(x):\n",
        "In 1969, the first humans", "Photosynthesis is the process by which",
        "A good way to learn a new language is", "SELECT name, age FROM users WHERE",
        "The theory of relativity states that", "Here is a recipe for pancakes:\n1.",
        "The largest planet in our solar system", "To be or not to be,",
        "Machine learning models are trained by", "The quick brown fox"]
METHODS = {"fp8": {"quantization": "fp8"}, "kv-fp8": {"kv_cache_dtype": "fp8"}, "gptq-rtn": "gptq", "awq-rtn": "awq"}


def run(model: str | None, dtype: str, prompts: list, output_len: int, **kwargs) -> tuple[torch.Tensor, list]:
    """(log-probabilities of every prompt position [positions, vocab], greedy continuations)."""
    from llmserve import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, seed=0, **kwargs)
    model_module = llm.engine.runner.model
    original, captured = model_module.compute_logits, []

    def capture(hidden):
        logits = original(hidden)
        captured.append(logits.float().log_softmax(-1).cpu())
        return logits

    model_module.compute_logits = capture
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)
    model_module.compute_logits = original
    outputs = llm.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    llm.engine.shutdown()
    return torch.cat(captured), [o.outputs[0].token_ids for o in outputs]


def measure(model: str | None, dtype: str, methods: dict, num_prompts: int, output_len: int,
            load_format: str = "auto") -> dict:
    from llmserve.loader import find_model, load_hf_config

    folder = find_model(model)
    if load_format == "dummy":  # no tokenizer needed: random token ids
        vocab = load_hf_config(folder).vocab_size
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(rng.randrange(16, 64))]}
                   for _ in range(num_prompts)]
        extra = {"load_format": "dummy", "skip_tokenizer_init": True}
    else:
        prompts, extra = [TEXT[i % len(TEXT)] for i in range(num_prompts)], {}
    reference_logp, reference_tokens = run(folder, dtype, prompts, output_len, **extra)
    results = {}
    for name, method in methods.items():
        if isinstance(method, str):  # a checkpoint written in that format
            from llmserve.quantization.formats import FORMATS, quantized_copy

            quantized, _ = quantized_copy(Path(folder), Path(tempfile.mkdtemp()), *FORMATS[method])
            tokenizer = {} if load_format == "dummy" else {"tokenizer": folder}
            logp, tokens = run(str(quantized), dtype, prompts, output_len, **tokenizer, **extra)
        else:
            logp, tokens = run(folder, dtype, prompts, output_len, **method, **extra)
        assert logp.shape == reference_logp.shape, (logp.shape, reference_logp.shape)
        kl = (reference_logp.exp() * (reference_logp - logp)).sum(-1)
        same = [np.mean([a == b for a, b in zip(r, t)]) for r, t in zip(reference_tokens, tokens)]
        results[name] = {"positions": len(kl), "mean_kl": kl.mean().item(), "p99_kl": kl.quantile(0.99).item(),
                         "first_token_agreement": (logp.argmax(-1) == reference_logp.argmax(-1)).float().mean().item(),
                         "continuation_agreement": float(np.mean(same)),
                         "identical_continuations": sum(r == t for r, t in zip(reference_tokens, tokens)),
                         "continuations": len(tokens)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an HF folder (default: the embedded model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = measure(args.model, args.dtype, {m: METHODS[m] for m in args.methods}, args.num_prompts,
                      args.output_len, args.load_format)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model or "embedded", "dtype": args.dtype,
                                               "results": results}, indent=2))
    print(f"| method | positions | mean KL | p99 KL | next-token agreement | {args.output_len}-token continuations: "
          "tokens equal / identical |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['positions']} | {r['mean_kl']:.4f} | {r['p99_kl']:.4f} | "
              f"{r['first_token_agreement']:.3f} | {r['continuation_agreement']:.3f} / "
              f"{r['identical_continuations']} of {r['continuations']} |")


if __name__ == "__main__":
    main()
