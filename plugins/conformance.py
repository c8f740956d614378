"""The conformance kit every attention backend must pass, ours or a plugin's (`llm plugins check NAME`).

Stage 1, kernels: one step of random paged batches through the backend against a plain fp32 reference (each request's
keys and values gathered through its block table, masked softmax), over a grid of head sizes, GQA ratios, block
sizes, windows and soft-caps, for mixed batches (prefill chunks over cached prefixes beside decodes) and decode-only
ones. A case the backend declares it cannot run is listed as refused, with its reasons, not failed.
Stage 2, engine: tiny random checkpoints (Llama and Qwen3, or every architecture with `--models all`) served with the
backend against TORCH_SDPA on the same weights: greedy tokens and logprobs (and with CUDA graphs where the backend
claims them). A model the backend refuses (its head size, soft-cap, window) is listed as refused, with the reason.
"""
import gc
import math
import tempfile
import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from llmserve.interfaces import AttentionBackend, AttentionSpec, BatchLayout

TOLERANCE = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# an fp8 (e4m3) cache against the unquantized attention: the output's error relative to its norm (3 mantissa bits:
# each key and value within 6.25%; the softmax and the sums over keys average most of it away)
FP8_RELATIVE_ERROR = 0.06
MIXED = [(0, 23), (37, 20), (50, 1), (0, 1), (16, 1), (64, 9)]  # (cached tokens, new tokens)
DECODE = [(70, 1), (5, 1), (130, 1), (33, 1)]


def reference(q, k, v, cache, tables, requests, scale, window, softcap=None, sinks=None) -> torch.Tensor:
    """Each request's queries over its cached tokens (read through its block table) and its new ones, in fp32; with
    `sinks` ([heads] logits), a sink column joins each softmax and is dropped after it."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    block_size, group, start = cache.shape[2], q.shape[1] // k.shape[1], 0
    for (context, n), table in zip(requests, tables):
        pos = torch.arange(context, device=q.device)
        blocks = torch.tensor(table, device=q.device, dtype=torch.long)[pos // block_size]
        keys = torch.cat([cache[0, blocks, pos % block_size], k[start:start + n]]).float().repeat_interleave(group, 1)
        values = torch.cat([cache[1, blocks, pos % block_size], v[start:start + n]]).float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + n].float(), keys) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = torch.arange(context, context + n, device=q.device)[:, None]
        key_pos = torch.arange(context + n, device=q.device)[None, :]
        visible = key_pos <= query_pos
        if window:
            visible &= key_pos > query_pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is None:
            probs = scores.softmax(-1)
        else:
            sink_column = sinks.float()[:, None, None].expand(-1, n, 1)
            probs = torch.cat([scores, sink_column], dim=-1).softmax(-1)[..., :-1]
        out[start:start + n] = torch.einsum("hqk,khd->qhd", probs, values)
        start += n
    return out


def make_batch(requests, block_size: int):
    """Block tables drawn from a shuffled pool, with a spare block each (the allocator may have one ready)."""
    needed = [math.ceil((c + n) / block_size) + (1 if c + n else 0) for c, n in requests]
    pool = torch.randperm(sum(needed) + 3).tolist()
    tables, used = [], 0
    for count in needed:
        tables.append(pool[used:used + count])
        used += count
    slots = [table[p // block_size] * block_size + p % block_size
             for (c, n), table in zip(requests, tables) for p in range(c, c + n)]
    return tables, slots, len(pool)


def check_backend(backend_cls, dtype, heads, kv_heads, head_dim, block_size, requests, window=None, device="cuda",
                  configure=lambda backend: None, softcap=None, scale=None, kv_cache_dtype=None,
                  sinks=False) -> None:
    """One step of `requests` ((cached tokens, new tokens) each) through a backend against the reference; q, k and v
    are views into one projection output, as the models pass them. With `kv_cache_dtype` (fp8) the cache holds the
    scaled values (check_scaled_cache). Raises AssertionError on a mismatch."""
    torch.manual_seed(zlib.crc32(repr((dtype, heads, kv_heads, head_dim, block_size, requests, window, softcap,
                                       scale, kv_cache_dtype, sinks)).encode()))
    tables, slots, num_blocks = make_batch(requests, block_size)
    tokens = sum(n for _, n in requests)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=device)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=device).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    backend = backend_cls(AttentionSpec(heads, kv_heads, head_dim, dtype, block_size, window, softcap, kv_cache_dtype,
                                        sinks), torch.device(device))
    configure(backend)
    layout = BatchLayout(np.array([n for _, n in requests]), np.array([c for c, _ in requests]), tables,
                         torch.tensor(slots, dtype=torch.int64, device=device), block_size, torch.device(device))
    layer = SimpleNamespace(layer_index=0, scale=scale or head_dim**-0.5, sliding_window=window,
                            logit_softcap=softcap,
                            sinks=(2 * torch.randn(heads, device=device)).to(dtype) if sinks else None)
    if kv_cache_dtype is not None:
        return check_scaled_cache(backend, layer, q, k, v, cache, kv_cache_dtype, layout, requests)
    cache = cache.to(dtype)
    expected = reference(q, k, v, cache, tables, requests, layer.scale, window, softcap, layer.sinks)
    out = backend.forward(layer, q, k, v, cache, backend.build_metadata(layout))
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def quantized(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(dtype)


def check_scaled_cache(backend, layer, q, k, v, values, cache_dtype, layout: BatchLayout, requests) -> None:
    """The cache holds `values` (fp32) quantized with a scale for K and one for V, from their largest magnitudes (the
    engine's rule) times a random factor; the step must (1) write its k and v as torch quantizes them, bit for bit,
    (2) attend as the fp32 reference does over what the cache holds after the step, dequantized, within the query
    dtype's tolerance, and (3) stay within FP8_RELATIVE_ERROR of the unquantized attention."""
    limit = torch.finfo(cache_dtype).max
    device = q.device
    scales = [(torch.maximum(values[i].abs().amax(), x.abs().amax().float()) / limit
               * torch.empty((), device=device).uniform_(1, 1.5)).reshape(1) for i, x in enumerate((k, v))]
    layer.k_scale, layer.v_scale = scales
    cache = torch.stack([quantized(values[i], scales[i], cache_dtype) for i in range(2)])
    out = backend.forward(layer, q, k, v, cache, backend.build_metadata(layout))
    slots, tables, tolerance = layout.slot_mapping, layout.block_tables, TOLERANCE[q.dtype]
    for i, x in enumerate((k, v)):
        written = cache.view(torch.uint8)[i].view(-1, *x.shape[1:])[slots]  # bytes: CPU indexing has no fp8
        assert torch.equal(written, quantized(x, scales[i], cache_dtype).view(torch.uint8)), "the written K/V differ"
    read = torch.stack([cache[i].float() * scales[i] for i in range(2)])  # what the cache holds, as fp32
    new = [read[i].view(-1, *k.shape[1:])[slots] for i in range(2)]
    expected = reference(q, *new, read, tables, requests, layer.scale, layer.sliding_window, layer.logit_softcap,
                         layer.sinks)
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    exact = reference(q, k, v, values.to(q.dtype), tables, requests, layer.scale, layer.sliding_window,
                      layer.logit_softcap, layer.sinks)
    error = ((out.float() - exact).norm() / exact.norm()).item()
    assert error < FP8_RELATIVE_ERROR, f"{error:.3f} of the unquantized attention's norm away from it"


@dataclass
class Outcome:
    stage: str  # "kernels" or "engine"
    case: str
    result: str  # "passed", "failed" or "refused"
    detail: str = ""


@dataclass
class Report:
    backend: str
    platform: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(o.result == "failed" for o in self.outcomes)

    def table(self) -> str:
        width = max((len(o.case) for o in self.outcomes), default=4)
        lines = [f"{self.backend} on {self.platform}:", f"  {'stage':<8} {'case':<{width}}  result"]
        lines += [f"  {o.stage:<8} {o.case:<{width}}  {o.result}{': ' + o.detail if o.detail else ''}"
                  for o in self.outcomes]
        counts = {r: sum(o.result == r for o in self.outcomes) for r in ("passed", "failed", "refused")}
        lines.append(f"{counts['passed']} passed, {counts['failed']} failed, {counts['refused']} refused")
        return "\n".join(lines)


def kernel_cases(device: str) -> list[dict]:
    """The grid: head sizes, GQA ratios (MHA, 4:1, MQA), block sizes, windows, soft-caps; mixed and decode batches."""
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
    cases = []
    for dtype in dtypes:
        for head_dim, heads, kv_heads in [(64, 4, 4), (128, 8, 2), (256, 4, 1), (96, 4, 2)]:
            for block_size in (16, 32):
                cases.append(dict(dtype=dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                  block_size=block_size, requests=MIXED))
        cases += [dict(dtype=dtype, heads=8, kv_heads=2, head_dim=128, block_size=16, requests=DECODE),
                  dict(dtype=dtype, heads=8, kv_heads=2, head_dim=128, block_size=16, requests=MIXED, window=21),
                  dict(dtype=dtype, heads=8, kv_heads=2, head_dim=128, block_size=16, requests=MIXED, scale=0.3),
                  dict(dtype=dtype, heads=8, kv_heads=2, head_dim=128, block_size=16, requests=MIXED, softcap=20.0,
                       scale=0.3),
                  dict(dtype=dtype, heads=8, kv_heads=2, head_dim=64, block_size=16, requests=MIXED, window=21,
                       sinks=True),
                  dict(dtype=dtype, heads=8, kv_heads=2, head_dim=64, block_size=16, requests=DECODE, sinks=True)]
        fp8 = dict(dtype=dtype, heads=8, kv_heads=2, block_size=16, kv_cache_dtype=torch.float8_e4m3fn)
        cases += [dict(fp8, head_dim=128, requests=MIXED), dict(fp8, head_dim=64, requests=DECODE),
                  dict(fp8, head_dim=128, requests=MIXED, window=21, softcap=20.0, scale=0.3)]
    return cases


def case_spec(case: dict) -> AttentionSpec:
    return AttentionSpec(case["heads"], case["kv_heads"], case["head_dim"], case["dtype"], case["block_size"],
                         case.get("window"), case.get("softcap"), case.get("kv_cache_dtype"), case.get("sinks", False))


def describe(case: dict) -> str:
    dtype = str(case["dtype"]).removeprefix("torch.")
    batch = "decode" if case["requests"] is DECODE else "mixed"
    extras = "".join(f" {k}={case[k]}" for k in ("window", "softcap", "scale") if case.get(k))
    extras += " sinks" if case.get("sinks") else ""
    if case.get("kv_cache_dtype"):
        extras += f" kv_cache_dtype={str(case['kv_cache_dtype']).removeprefix('torch.')}"
    return (f"{batch} {dtype} heads {case['heads']}/{case['kv_heads']} head_dim {case['head_dim']} "
            f"block {case['block_size']}{extras}")


def check_kernels(backend_cls: type[AttentionBackend], platform: str, device: str, progress) -> list[Outcome]:
    outcomes = Recorded(progress)
    for case in kernel_cases(device):
        reasons = backend_cls.why_unsupported(case_spec(case), platform)
        if reasons:
            outcomes.append(Outcome("kernels", describe(case), "refused", "; ".join(reasons)))
            continue
        try:
            check_backend(backend_cls, device=device, **case)
            outcomes.append(Outcome("kernels", describe(case), "passed"))
        except Exception as e:  # a mismatch or a crash: either is this backend's failure, reported, not raised
            outcomes.append(Outcome("kernels", describe(case), "failed", f"{type(e).__name__}: {str(e)[:300]}"))
    return outcomes


def save_random_checkpoint(config, folder, layer_norms_near_one: bool = False, **save_kwargs) -> None:
    """Random weights for an HF config (seed 0, normal(0, 0.2): large enough that the greedy path is not flat), saved
    by transformers. `layer_norms_near_one`: LayerNorm weights near 1, as trained, else its random biases decide every
    token."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        if layer_norms_near_one:
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                    module.weight += 1
    model.save_pretrained(folder, **save_kwargs)


WINDOW = 64


def model_configs() -> dict:
    """A small config per architecture, with its features on (windows shorter than the longer prompts, soft-caps,
    partial rotary with LongRoPE, post-norm OPT with project_in/out), made with transformers' own config classes."""
    import transformers as tf

    common = dict(vocab_size=5000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 256, "short_factor": [1.0 + i / 24 for i in range(24)],
                "long_factor": [1.0 + 4 * i / 24 for i in range(24)]}
    return {
        "LlamaForCausalLM": tf.LlamaConfig(**common),
        "Qwen2ForCausalLM": tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=2),
        "Qwen3ForCausalLM": tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True),
        "MistralForCausalLM": tf.MistralConfig(**common, sliding_window=WINDOW),
        "Phi3ForCausalLM": tf.Phi3Config(**(common | dict(num_attention_heads=4, num_key_value_heads=4)),
                                         rope_parameters=longrope, sliding_window=WINDOW, pad_token_id=0),
        "Gemma2ForCausalLM": tf.Gemma2Config(**common, head_dim=128, sliding_window=WINDOW,
                                             query_pre_attn_scalar=144, attn_logit_softcapping=50.0,
                                             final_logit_softcapping=30.0),
        "Gemma3ForCausalLM": tf.Gemma3TextConfig(**common, head_dim=256, sliding_window=WINDOW,
                                                 rope_parameters={
                                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                        "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 1e4}},
                                                 layer_types=["sliding_attention"] * 3 + ["full_attention"]),
        "OPTForCausalLM": tf.OPTConfig(vocab_size=5000, hidden_size=256, ffn_dim=512, num_hidden_layers=4,
                                       num_attention_heads=4, max_position_embeddings=2048,
                                       do_layer_norm_before=False, word_embed_proj_dim=128),
        "GPT2LMHeadModel": tf.GPT2Config(vocab_size=5000, n_embd=256, n_layer=4, n_head=4, n_positions=2048),
    }


def tiny_checkpoint(architecture: str, folder: str) -> None:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    config = model_configs()[architecture]
    config.architectures = [architecture]
    save_random_checkpoint(config, folder, layer_norms_near_one=True)


def engine_outputs(folder: str, backend: str, dtype: str, **engine_args) -> list:
    from llmserve import LLM, SamplingParams

    prompts = [[5, 17, 300, 1000, 12], list(range(200, 290)), [42] * 7, list(range(500, 537)), [11, 12]]
    llm = LLM(model=folder, dtype=dtype, skip_tokenizer_init=True, attention_backend=backend, max_num_seqs=8,
              max_num_batched_tokens=64, kv_cache_memory_bytes=(64 << 20) if dtype == "float32" else None,
              **engine_args)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    gc.collect()  # the engine's KV cache must be gone before the next engine sizes its own from the free memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return outputs


def logprob_gap(ours, theirs) -> float:
    """The largest difference of the chosen tokens' logprobs while two greedy paths agree."""
    gap = 0.0
    for mine, reference, a, b in zip(ours.logprobs, theirs.logprobs, ours.token_ids, theirs.token_ids):
        if a != b:
            break
        gap = max(gap, abs(mine[a].logprob - reference[a].logprob))
    return gap


def same_greedy(ours, theirs, tolerance: float) -> str | None:
    """None when the tokens agree (or first differ at a near tie of the reference) and the logprobs before any
    difference are within `tolerance`, else what differs."""
    for mine, reference, a, b in zip(ours.logprobs, theirs.logprobs, ours.token_ids, theirs.token_ids):
        if a != b:
            break
        if abs(mine[a].logprob - reference[a].logprob) > tolerance:
            return f"logprob of token {a}: {mine[a].logprob:.4f} vs {reference[a].logprob:.4f}"
    if ours.token_ids == theirs.token_ids:
        return None
    j = next(i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b)
    top = theirs.logprobs[j]
    if ours.token_ids[j] in top and abs(top[ours.token_ids[j]].logprob - top[theirs.token_ids[j]].logprob) < tolerance:
        return None
    return f"tokens differ at {j}: {ours.token_ids[j:j + 4]} vs {theirs.token_ids[j:j + 4]}"


def check_engine(backend_cls: type[AttentionBackend], device: str, models: list[str], progress) -> list[Outcome]:
    dtype = "float32" if device == "cpu" else "bfloat16"
    outcomes = Recorded(progress)
    modes = [("eager", {"enforce_eager": True})]
    if device != "cpu" and backend_cls.supports_cuda_graphs:
        modes.append(("cuda graphs", {}))
    refusal = f"attention backend {backend_cls.name} cannot run this model here: "
    for architecture in models:
        with tempfile.TemporaryDirectory() as folder:
            tiny_checkpoint(architecture, folder)
            expected = engine_outputs(folder, "TORCH_SDPA", dtype, enforce_eager=True)
            tolerance, detail = 2e-3, ""
            if dtype != "float32":  # some models amplify rounding more than others: allow twice the reference's own
                exact = engine_outputs(folder, "TORCH_SDPA", "float32", enforce_eager=True)
                noise = max(logprob_gap(e, x) for e, x in zip(expected, exact))
                tolerance = max(0.1, 2 * noise)
                detail = f"logprobs within {tolerance:.2f} (TORCH_SDPA {dtype} is within {noise:.2f} of float32)"
            for mode, args in modes:
                case = f"{architecture} {dtype} {mode}"
                try:
                    problems = [p for p in (same_greedy(o, e, tolerance) for o, e in
                                            zip(engine_outputs(folder, backend_cls.name, dtype, **args), expected))
                                if p]
                    outcomes.append(Outcome("engine", case, "failed" if problems else "passed",
                                            "; ".join(problems) or detail))
                except ValueError as e:
                    if not str(e).startswith(refusal):
                        raise
                    outcomes.append(Outcome("engine", case, "refused", str(e).removeprefix(refusal)))
                    break  # the other modes would be refused alike
                except Exception as e:
                    outcomes.append(Outcome("engine", case, "failed", f"{type(e).__name__}: {str(e)[:300]}"))
    return outcomes


class Recorded(list):
    """Outcomes, each also handed to `progress` as it comes (a kernel may compile for many seconds)."""

    def __init__(self, progress) -> None:
        super().__init__()
        self.progress = progress

    def append(self, outcome: Outcome) -> None:
        super().append(outcome)
        self.progress(outcome)


DEFAULT_MODELS = ("LlamaForCausalLM", "Qwen3ForCausalLM")


def run_checks(name: str, progress=lambda outcome: None, models: list[str] | None = None,
               stages: tuple[str, ...] = ("kernels", "engine")) -> Report:
    """The whole kit for the backend registered as `name` on this machine's platform, the engine stage with `models`
    (architecture names of model_configs(), default Llama and Qwen3); `progress` sees each outcome as it comes."""
    from llmserve.plugins.manager import registry
    from llmserve.plugins.select import current_platform

    backends = registry().of("attention_backend")
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; registered: {', '.join(sorted(backends))}")
    models = list(models or DEFAULT_MODELS)
    unknown = [m for m in models if m not in model_configs()]
    if unknown:
        raise ValueError(f"no tiny config for {', '.join(unknown)}; the kit has {', '.join(model_configs())}")
    backend_cls, platform = backends[name].load(), current_platform()
    device = platform.device().type
    report = Report(name, platform.name)
    if "kernels" in stages:
        report.outcomes += check_kernels(backend_cls, platform.name, device, progress)
    if "engine" in stages:
        report.outcomes += check_engine(backend_cls, device, models, progress)
    return report
