"""Mixture-of-experts models and kernels: Mixtral, Qwen2-MoE and Qwen3-MoE on random weights against HF transformers
(greedy tokens and logprobs); the fused Triton MoE kernel against a float64 reference (in Triton's interpreter
without CUDA, compiled with it); the plain grouped path too; a checkpoint missing an expert tensor is refused, naming
it; tensor parallelism of the experts equals one rank. With CUDA, the kernel at Qwen3-30B-A3B's and Mixtral-8x7B's
layer shapes against the plain path."""
import os

import numpy as np
import pytest
import torch
from conftest import RANDOM_MODEL_MAX_TOKENS, RANDOM_MODEL_PROMPTS, greedy, hf_greedy, hf_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first defined

from llmserve import LLM, SamplingParams  # noqa: E402
from llmserve.models.layers.moe import grouped_experts, route  # noqa: E402
from llmserve.plugins.conformance import save_random_checkpoint  # noqa: E402

SMALL = dict(vocab_size=5000, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, num_experts_per_tok=2)


def mixtral_config(**overrides):
    from transformers import MixtralConfig

    args = SMALL | dict(intermediate_size=96, num_hidden_layers=2, num_local_experts=4,
                        architectures=["MixtralForCausalLM"])
    return MixtralConfig(**(args | overrides))


def qwen2_moe_config(**overrides):
    from transformers import Qwen2MoeConfig

    # layer 1 dense (mlp_only_layers); a shared expert on the sparse ones; top-k weights not renormalised
    args = SMALL | dict(intermediate_size=112, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                        num_hidden_layers=3, num_experts=8, mlp_only_layers=[1],
                        architectures=["Qwen2MoeForCausalLM"])
    return Qwen2MoeConfig(**(args | overrides))


def qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    # head_dim 32 != 64 / 4; layer 0 dense; renormalised top-k as in Qwen3-30B-A3B
    args = SMALL | dict(intermediate_size=112, moe_intermediate_size=48, num_hidden_layers=3, num_experts=8,
                        head_dim=32, mlp_only_layers=[0], norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"])
    return Qwen3MoeConfig(**(args | overrides))


def gpt_oss_config(**overrides):
    from transformers import GptOssConfig

    # YaRN with a factor of 8 over 64 original positions, a 16-token window on every other layer, sinks, biases
    rope = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    args = SMALL | dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, head_dim=16,
                        sliding_window=16, rope_parameters=rope, architectures=["GptOssForCausalLM"])
    return GptOssConfig(**(args | overrides))


def generate(folder, **engine_args):
    llm = LLM(model=str(folder), dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=64 << 20,
              **engine_args)
    params = [greedy(n, logprobs=1) for n in RANDOM_MODEL_MAX_TOKENS]
    outputs = llm.generate(RANDOM_MODEL_PROMPTS, params, use_tqdm=False)
    llm.engine.shutdown()
    return outputs


@pytest.mark.parametrize("config", [
    # the 90-token prompt crosses the 16-token window of every layer
    pytest.param(lambda: mixtral_config(sliding_window=16), id="mixtral-window"),
    pytest.param(lambda: qwen2_moe_config(), id="qwen2-moe-shared-expert"),
    # renormalised top-3, experts on every second layer only
    pytest.param(lambda: qwen2_moe_config(norm_topk_prob=True, num_experts_per_tok=3, decoder_sparse_step=2,
                                          mlp_only_layers=[]), id="qwen2-moe-sparse-step"),
    pytest.param(lambda: qwen3_moe_config(), id="qwen3-moe"),
    # not renormalised, top-1, a window on every layer (HF's Qwen3-MoE rule), q/k/v/o biases
    pytest.param(lambda: qwen3_moe_config(norm_topk_prob=False, num_experts_per_tok=1, use_sliding_window=True,
                                          sliding_window=16, attention_bias=True), id="qwen3-moe-window-top1"),
    pytest.param(lambda: gpt_oss_config(), id="gpt-oss"),
])
def test_matches_hf(tmp_path, config):
    """A mixed batch (prompts of 5 to 90 tokens, each its own max_tokens): HF's greedy tokens, logprobs within 1e-3."""
    save_random_checkpoint(config(), tmp_path, layer_norms_near_one=True)
    ours = generate(tmp_path)
    reference = hf_reference(tmp_path)
    for prompt, n, out in zip(RANDOM_MODEL_PROMPTS, RANDOM_MODEL_MAX_TOKENS, ours):
        tokens, logprobs = hf_greedy(reference, prompt, n)
        assert out.outputs[0].token_ids == tokens, f"prompt of {len(prompt)} tokens"
        ours_logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
        assert ours_logprobs == pytest.approx(logprobs, abs=1e-3)


def test_gpt_oss_through_triton_attn_matches_hf(tmp_path, monkeypatch):
    """gpt-oss through TRITON_ATTN's kernels (the GPU's default backend; here in Triton's interpreter): its sinks
    start the kernel's online softmax, its windowed layers skip the keys outside."""
    pytest.importorskip("triton")
    from llmserve.backends.triton_attn import TritonAttnBackend

    if DEVICE == "cpu":  # TRITON_ATTN declares CUDA and ROCm; the interpreter runs its kernels on CPU tensors too
        monkeypatch.setattr(TritonAttnBackend, "platforms", TritonAttnBackend.platforms + ("cpu",))
    save_random_checkpoint(gpt_oss_config(), tmp_path, layer_norms_near_one=True)
    ours = generate(tmp_path, attention_backend="TRITON_ATTN")
    reference = hf_reference(tmp_path)
    for prompt, n, out in zip(RANDOM_MODEL_PROMPTS, RANDOM_MODEL_MAX_TOKENS, ours):
        tokens, logprobs = hf_greedy(reference, prompt, n)
        assert out.outputs[0].token_ids == tokens, f"prompt of {len(prompt)} tokens"
        assert [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)] == pytest.approx(logprobs,
                                                                                                     abs=1e-3)


def test_qwen2_moe_layers(tmp_path):
    """Dense MLP on mlp_only_layers, experts with a shared expert elsewhere; expert stacks of HF's layout."""
    from llmserve.models.layers.moe import SparseMoeBlock
    from llmserve.models.llama import LlamaMLP
    from llmserve.models.qwen_moe import Qwen2MoeForCausalLM

    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(qwen2_moe_config(), torch.float32)
    first, dense, last = (layer.mlp for layer in model.model.layers)
    assert isinstance(first, SparseMoeBlock) and isinstance(dense, LlamaMLP) and isinstance(last, SparseMoeBlock)
    assert first.experts.gate_up_proj.shape == (8, 96, 64) and first.experts.down_proj.shape == (8, 64, 48)
    assert first.shared_expert.gate_up_proj.weight.shape == (160, 64)


def checkpoint_tensors(config, folder) -> dict:
    from safetensors.torch import load_file

    save_random_checkpoint(config, folder)
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("config, absent", [
    (qwen3_moe_config, "model.layers.2.mlp.experts.5.up_proj.weight"),
    (mixtral_config, "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
])
def test_missing_expert_tensor_is_named(tmp_path, config, absent):
    from llmserve.plugins.select import model_class

    hf_config = config()
    tensors = checkpoint_tensors(hf_config, tmp_path)
    del tensors[absent]
    model = model_class(hf_config)(hf_config, torch.float32)
    with pytest.raises(ValueError, match=f"no tensor for 1 expert weights of .*: {absent}$"):
        model.load_weights(iter(tensors.items()))


def test_expert_tensor_of_wrong_shape_is_named(tmp_path):
    from llmserve.models.qwen_moe import Qwen3MoeForCausalLM

    tensors = checkpoint_tensors(qwen3_moe_config(), tmp_path)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    tensors[name] = tensors[name][:, :32]
    with pytest.raises(ValueError, match=f"{name}.*shape \\(48, 32\\), expected \\(48, 64\\)"):
        Qwen3MoeForCausalLM(qwen3_moe_config(), torch.float32).load_weights(iter(tensors.items()))


def test_quantized_experts_are_refused_and_fp8_at_load_leaves_them_as_they_are(tmp_path, caplog):
    import json

    config = qwen3_moe_config()
    save_random_checkpoint(config, tmp_path)
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"  # fp8 GEMMs on a GPU give 16-bit outputs
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype=dtype, quantization="fp8")
    layer = llm.engine.runner.model.model.layers[1]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.experts.gate_up_proj.dtype == getattr(torch, dtype)
    assert f"the experts stay in {dtype}" in caplog.text
    llm.engine.shutdown()
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="^quantization 'gptq': Qwen3MoeForCausalLM's experts have no quantized path"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype=dtype)


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < 2, reason="needs 2 GPUs on a CUDA machine")
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["each-expert-split", "expert-parallel"])
@pytest.mark.parametrize("config", [qwen2_moe_config, gpt_oss_config], ids=["qwen2-moe", "gpt-oss"])
def test_experts_split_over_two_ranks_equal_one(tmp_path, expert_parallel, config):
    """Over 2 ranks, one all-reduce per block: each expert's intermediate dim (and the shared expert's) split, or
    with expert parallelism 4 whole experts on each rank (the shared expert still split): TP=1's tokens and
    logprobs. gpt-oss: each rank's heads' sinks, its experts' biases, the down projections' bias added once."""
    save_random_checkpoint(config(), tmp_path, layer_norms_near_one=True)
    split = generate(tmp_path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel)
    whole = generate(tmp_path)
    for a, b in zip(split, whole):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y, token in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert x[token].logprob == pytest.approx(y[token].logprob, abs=1e-3)


# our checkpoint names -> llama.cpp's, per layer
GGUF_LAYER_TENSORS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                      "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                      "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                      "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"}


def write_qwen3_moe_gguf(config, checkpoint, path) -> None:
    """An f32 GGUF file as llama.cpp lays out a Qwen3-MoE model: its hyper-parameters, the experts of each layer in
    three stacked tensors (ffn_gate_exps, ffn_up_exps [E, I, H], ffn_down_exps [E, H, I]) and the embedded model's
    tokenizer (its vocabulary size is the config's)."""
    import gguf
    from safetensors.torch import load_file

    from llmserve.loader import default_model_file

    tensors = {n: t.float().numpy() for f in checkpoint.glob("*.safetensors") for n, t in load_file(f).items()}
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, field in gguf.GGUFReader(default_model_file()).fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    out = {"token_embd.weight": tensors.pop("model.embed_tokens.weight"),
           "output_norm.weight": tensors.pop("model.norm.weight"), "output.weight": tensors.pop("lm_head.weight")}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for ours, theirs in GGUF_LAYER_TENSORS.items():
            out[f"blk.{layer}.{theirs}.weight"] = tensors.pop(f"{prefix}{ours}.weight")
        for projection, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            out[f"blk.{layer}.ffn_{short}_exps.weight"] = np.stack(
                [tensors.pop(f"{prefix}mlp.experts.{e}.{projection}.weight") for e in range(config.num_experts)])
    assert not tensors, f"not written: {sorted(tensors)}"
    for name, tensor in out.items():
        writer.add_tensor(name, np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen3_moe_gguf_matches_hf(tmp_path):
    """A GGUF file's stacked experts load (transformers' GGUF reader hands them on as [E, 2I, H] and [E, H, I]), with
    the expert size that reader leaves unread (48, not Qwen3MoeConfig's default 768): greedy tokens equal HF's on the
    safetensors checkpoint the file was written from."""
    pytest.importorskip("gguf")
    config = qwen3_moe_config(vocab_size=49152, mlp_only_layers=[], tie_word_embeddings=False)
    save_random_checkpoint(config, tmp_path / "hf", layer_norms_near_one=True)
    write_qwen3_moe_gguf(config, tmp_path / "hf", tmp_path / "tiny-qwen3-moe.gguf")
    ours = LLM(model=str(tmp_path / "tiny-qwen3-moe.gguf"), dtype="float32", kv_cache_memory_bytes=64 << 20)
    outputs = ours.generate(RANDOM_MODEL_PROMPTS, [greedy(n) for n in RANDOM_MODEL_MAX_TOKENS], use_tqdm=False)
    ours.engine.shutdown()
    reference = hf_reference(tmp_path / "hf")
    for prompt, n, out in zip(RANDOM_MODEL_PROMPTS, RANDOM_MODEL_MAX_TOKENS, outputs):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, n)[0]


def reference_moe(x, gate_up, down, weights, ids) -> torch.Tensor:
    """The experts in float64, one einsum per step over each token's picked experts' weights."""
    x, gate_up, down, weights = x.double(), gate_up.double(), down.double(), weights.double()
    gate, up = torch.einsum("th,tkih->tki", x, gate_up[ids]).chunk(2, dim=-1)
    return torch.einsum("tk,tkhi,tki->th", weights, down[ids], torch.nn.functional.silu(gate) * up)


def random_experts(tokens, experts, top_k, hidden, size, renormalize, dtype, device=DEVICE):
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    gate_up = torch.randn(experts, 2 * size, hidden, device=device, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, size, device=device, dtype=dtype) / size**0.5
    weights, ids = route(torch.randn(tokens, experts, device=device), top_k, renormalize)
    return x, gate_up, down, weights, ids


TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("tokens, experts, top_k, renormalize", [
    (1, 4, 2, True), (1, 8, 1, False), (5, 8, 2, False), (13, 4, 1, True), (40, 4, 2, True), (140, 4, 2, False),
])
def test_triton_kernel_matches_float64(dtype, tokens, experts, top_k, renormalize):
    """Hidden 96 and intermediate 40 (not multiples of the tiles: masked edges); 40 and 140 tokens x 2 over 4
    experts take the 32- and 64-row tiles."""
    pytest.importorskip("triton")
    from llmserve.models.layers import triton_moe

    torch.manual_seed(tokens * 100 + experts * 10 + top_k)
    args = random_experts(tokens, experts, top_k, 96, 40, renormalize, dtype)
    out = triton_moe.fused_experts(*args)
    assert out.dtype == dtype and out.shape == (tokens, 96)
    torch.testing.assert_close(out.double().cpu(), reference_moe(*(a.cpu() for a in args)),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def reference_clamped_swiglu(x, gate_up, down, weights, ids, gate_up_bias, down_bias, alpha=1.702, limit=7.0):
    """gpt-oss's experts in float64: biases, gate clamped above, up clamped both ways and shifted by one."""
    x, gate_up, down, weights = x.double(), gate_up.double(), down.double(), weights.double()
    h = torch.einsum("th,tkih->tki", x, gate_up[ids]) + gate_up_bias.double()[ids]
    gate, up = h.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    act = (up + 1) * gate * torch.sigmoid(alpha * gate)
    return torch.einsum("tk,tkh->th", weights, torch.einsum("tkhi,tki->tkh", down[ids], act) + down_bias.double()[ids])


@pytest.mark.parametrize("fused", [True, False], ids=["triton", "grouped"])
@pytest.mark.parametrize("tokens", [1, 9, 70])
def test_biases_and_the_clamped_swiglu(fused, tokens):
    """gpt-oss's experts (moe.GatedActivation(1.702, 7.0, 1.0), biases), both paths, against float64; inputs large
    enough that the clamps act."""
    from llmserve.models.layers import triton_moe
    from llmserve.models.layers.moe import GatedActivation

    torch.manual_seed(tokens)
    device = DEVICE if fused else "cpu"
    x, gate_up, down, weights, ids = random_experts(tokens, 8, 2, 64, 40, True, torch.float32, device)
    x = x * 8
    gate_up_bias, down_bias = torch.randn(8, 80, device=device), torch.randn(8, 64, device=device)
    act = GatedActivation(1.702, 7.0, 1.0)
    args = (x, gate_up, down, weights, ids)
    out = (triton_moe.fused_experts(*args, False, gate_up_bias, down_bias, act) if fused
           else grouped_experts(*args, gate_up_bias, down_bias, act))
    gate = torch.einsum("th,tkih->tki", x.double(), gate_up.double()[ids])[..., :40]
    assert (gate > 7).any() and (gate < -7).any()  # the clamps are exercised
    expected = reference_clamped_swiglu(*(a.cpu() for a in (*args, gate_up_bias, down_bias)))
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens, experts, top_k", [(1, 4, 2), (6, 8, 1), (30, 8, 2)])
def test_grouped_path_matches_float64(tokens, experts, top_k):
    torch.manual_seed(tokens)
    args = random_experts(tokens, experts, top_k, 64, 48, True, torch.float32, "cpu")
    torch.testing.assert_close(grouped_experts(*args).double(), reference_moe(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["triton", "grouped"])
@pytest.mark.parametrize("tokens", [1, 7, 50])
def test_other_ranks_experts_are_skipped(fused, tokens):
    """Expert parallelism's ids: E means another rank's expert; those pairs add nothing, the rest as before."""
    from llmserve.models.layers import triton_moe

    torch.manual_seed(tokens)
    dtype = torch.float32
    x, gate_up, down, weights, ids = random_experts(tokens, 8, 2, 64, 40, True, dtype, DEVICE if fused else "cpu")
    here = ids < 4  # this rank holds experts 0..3
    local_ids = ids.masked_fill(~here, 4)
    out = (triton_moe.fused_experts(x, gate_up[:4], down[:4], weights, local_ids, skips=True) if fused
           else grouped_experts(x, gate_up[:4], down[:4], weights, local_ids))
    expected = reference_moe(*(a.cpu() for a in (x, gate_up, down, weights * here, ids)))
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)


def test_expert_parallel_needs_experts_divisible_by_ranks():
    from llmserve import distributed
    from llmserve.models.layers.moe import FusedExperts

    with distributed.assume(distributed.ParallelState(0, 3, 0, 1, expert_parallel=True)), torch.device("meta"):
        with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's 8 experts"):
            FusedExperts(8, 64, 48)
        experts = FusedExperts(6, 64, 48)
    assert experts.gate_up_proj.shape == (2, 96, 64) and experts.missing() == [
        f"{e}.{p}" for e in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")]


def test_alignment_pads_each_expert_to_the_block():
    from llmserve.models.layers.triton_moe import align_by_expert

    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 0: pairs 1, 4; expert 2: 0, 2, 5; expert 3: 3
    sorted_pairs, block_expert, padded = align_by_expert(ids, 4, 4)
    assert padded.tolist() == [12]
    assert sorted_pairs[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]
    assert block_expert[:3].tolist() == [0, 2, 3]


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden, size, experts, top_k", [(2048, 768, 128, 8), (4096, 14336, 8, 2)],
                         ids=["qwen3-30b-a3b", "mixtral-8x7b"])
@pytest.mark.parametrize("tokens", [1, 8, 64, 512])
def test_triton_kernel_at_real_shapes(hidden, size, experts, top_k, tokens):
    """bf16 kernel against the plain grouped path in fp32 on the same weights: relative error of bf16's order."""
    from llmserve.models.layers import triton_moe

    torch.manual_seed(tokens)
    x, gate_up, down, weights, ids = random_experts(tokens, experts, top_k, hidden, size, True, torch.bfloat16)
    out = triton_moe.fused_experts(x, gate_up, down, weights, ids).float()
    expected = grouped_experts(x.float(), gate_up.float(), down.float(), weights, ids)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("config", ["MixtralConfig", "Qwen2MoeConfig", "Qwen3MoeConfig"])
def test_default_configs_build_with_hf_parameter_counts(config):
    """transformers' default configs (Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B shapes), shapes only."""
    import transformers
    from transformers import AutoModelForCausalLM

    from llmserve.plugins.select import model_class

    hf_config = getattr(transformers, config)()
    hf_config.architectures = [config.replace("Config", "ForCausalLM")]
    with torch.device("meta"):
        ours = model_class(hf_config)(hf_config, torch.bfloat16)
        reference = AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_gpt_oss_mxfp4_checkpoint_matches_its_dequantized_float_model(tmp_path):
    """gpt-oss's experts in MXFP4 as released (written by quantization/formats.py in that layout; transformers' own
    dequantization agrees with ours on them): greedy tokens and logprobs of HF on the float checkpoint they stand
    for."""
    from safetensors.torch import load_file

    from llmserve.quantization.formats import mxfp4_copy
    from llmserve.quantization.mxfp4 import dequantize

    save_random_checkpoint(gpt_oss_config(intermediate_size=64), tmp_path / "float", layer_norms_near_one=True)
    quantized, reference = mxfp4_copy(tmp_path / "float", tmp_path)
    tensors = load_file(quantized / "model.safetensors")
    blocks, scales = tensors["model.layers.0.mlp.experts.down_proj_blocks"], tensors[
        "model.layers.0.mlp.experts.down_proj_scales"]
    assert blocks.shape == (4, 64, 2, 16) and scales.shape == (4, 64, 2)
    expected = load_file(reference / "model.safetensors")["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(dequantize(blocks, scales, torch.float32), expected)
    try:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except ImportError:
        convert_moe_packed_tensors = None
    if convert_moe_packed_tensors is not None:
        assert torch.equal(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), expected)
    ours = generate(quantized)
    hf = hf_reference(reference)
    for prompt, n, out in zip(RANDOM_MODEL_PROMPTS, RANDOM_MODEL_MAX_TOKENS, ours):
        tokens, logprobs = hf_greedy(hf, prompt, n)
        assert out.outputs[0].token_ids == tokens
        assert [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)] == pytest.approx(logprobs,
                                                                                                     abs=1e-3)


def test_tuned_tiles_are_read_by_gpu_shape_and_nearest_token_count(tmp_path, monkeypatch):
    """benchmarks/moe_kernel.py --write's file: tiles by GPU name, expert shape and token count (the nearest)."""
    import json

    from llmserve.models.layers import triton_moe

    key = triton_moe.shape_key(128, 2048, 768, 8, torch.bfloat16)
    assert key == "E=128,H=2048,I=768,k=8,bfloat16"
    small, large = triton_moe.Tiles(16, 64, 128, 1, 4, 4), triton_moe.Tiles(64, 128, 64, 8, 8, 3)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"GPU X": {key: {"8": small.__dict__, "512": large.__dict__}}}))
    monkeypatch.setattr(triton_moe, "TUNED_FILE", path)
    triton_moe.tuned_configs.cache_clear()
    monkeypatch.setattr(triton_moe, "gpu_name", lambda device: "GPU X")
    try:
        cuda = torch.device("cuda")
        assert triton_moe.tiles_for(1, 128, 2048, 768, 8, torch.bfloat16, cuda) == small
        assert triton_moe.tiles_for(300, 128, 2048, 768, 8, torch.bfloat16, cuda) == large
        assert triton_moe.tiles_for(1, 64, 2048, 768, 8, torch.bfloat16, cuda) == triton_moe.tiles(8, 64,
                                                                                                    torch.bfloat16)
        assert triton_moe.tiles_for(300, 128, 2048, 768, 8, torch.bfloat16, torch.device("cpu")) == triton_moe.tiles(
            2400, 128, torch.bfloat16)
    finally:
        triton_moe.tuned_configs.cache_clear()
