"""Quantization methods on the CPU: checkpoints written by this test in each format's exact layout (GPTQ, AWQ,
compressed-tensors fp8, HF's block-scaled fp8) load into the weights they stand for; fp8 quantization at load stays
close to the float model on the embedded model's real weights; wrong requests are refused by name."""
import json

import numpy as np
import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.plugins.conformance import save_random_checkpoint
from llmserve.quantization.formats import FORMATS, quantized_copy
from llmserve.quantization.fp8 import fp8_linear


def tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float")
    save_random_checkpoint(tiny_llama(), folder, safe_serialization=True)
    return folder


PROMPTS = [[7, 99, 300, 12, 45, 400, 3], [250, 251, 252], list(range(60, 100))]


def merged_weights(llm: LLM) -> dict[str, torch.Tensor]:
    """Each linear layer's float weight as the engine computes with it (fp8 ones times their scales)."""
    out = {}
    for name, module in llm.engine.runner.model.named_modules():
        if hasattr(module, "weight") and name.rsplit(".", 1)[-1] in ("qkv_proj", "o_proj", "gate_up_proj",
                                                                      "down_proj"):
            weight = module.weight.float()
            out[name] = weight * module.weight_scale if hasattr(module, "weight_scale") else weight
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_checkpoint_loads_the_weights_it_stands_for(float_checkpoint, tmp_path, fmt):
    quantize, quant_config = FORMATS[fmt]
    quantized, reference = quantized_copy(float_checkpoint, tmp_path, quantize, quant_config)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = LLM(model=str(reference), skip_tokenizer_init=True, dtype="float32")
    expected, expected_weights = ref.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False), \
        merged_weights(ref)
    ref.engine.shutdown()
    llm = LLM(model=str(quantized), skip_tokenizer_init=True, dtype="float32")
    got_weights = merged_weights(llm)
    assert got_weights.keys() == expected_weights.keys()
    for name in expected_weights:
        torch.testing.assert_close(got_weights[name], expected_weights[name], rtol=1e-6, atol=1e-6, msg=name)
    got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    llm.engine.shutdown()
    if fmt == "compressed-tensors":  # activations are quantized too: close, not equal
        same = sum(a == b for e, g in zip(expected, got) for a, b in zip(e.outputs[0].token_ids,
                                                                         g.outputs[0].token_ids))
        assert same >= 0.6 * 12 * len(PROMPTS)
    else:  # on the CPU the weights are dequantized at load: the float model exactly
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


@pytest.mark.parametrize("rows,columns,tokens", [(64, 128, 1), (96, 64, 7), (32, 256, 33)])
def test_fp8_linear_matches_the_float_reference(rows, columns, tokens):
    torch.manual_seed(rows + tokens)
    weight, x, bias = torch.randn(rows, columns), torch.randn(tokens, columns) * 3, torch.randn(rows)
    w_scale = weight.abs().amax(1, keepdim=True) / 448
    w8 = (weight / w_scale).to(torch.float8_e4m3fn)
    x_scale = x.abs().amax(1, keepdim=True) / 448
    x8 = (x / x_scale).to(torch.float8_e4m3fn)
    expected = (x8.double() * x_scale.double()) @ (w8.double() * w_scale.double()).T + bias.double()
    got = fp8_linear(x, w8, w_scale, bias)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert (got - x @ weight.T - bias).abs().max() < 0.1 * (x @ weight.T).abs().max()  # and near the float one


@pytest.mark.slow
def test_fp8_at_load_stays_close_to_the_float_model(tmp_path):
    """The embedded model's real weights, fp8 weights and activations against float32, through the accuracy
    benchmark: the next-token distributions over every prompt position, and the greedy next token."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "quant_accuracy.py"
    subprocess.run([sys.executable, str(script), "--methods", "fp8", "--num-prompts", "4", "--output-len", "8",
                    "--json", str(tmp_path / "out.json")], check=True)
    result = json.loads((tmp_path / "out.json").read_text())["results"]["fp8"]
    assert result["positions"] >= 40 and result["mean_kl"] < 0.05, result
    assert result["first_token_agreement"] >= 0.75, result


def test_wrong_quantization_requests_are_refused_by_name(float_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"^quantization 'int3' is not a registered quantization method; "
                                         r"registered: \[.*'awq'.*'fp8'.*'gptq'"):
        LLM(model=str(float_checkpoint), skip_tokenizer_init=True, quantization="int3")
    with pytest.raises(ValueError, match="^quantization 'gptq' reads checkpoints quantized in that format, and this "
                                         "one has no quantization_config"):
        LLM(model=str(float_checkpoint), skip_tokenizer_init=True, quantization="gptq")
    quantized, _ = quantized_copy(float_checkpoint, tmp_path, *FORMATS["awq"])
    with pytest.raises(ValueError, match="^quantization 'fp8' does not match the checkpoint, quantized with 'awq'"):
        LLM(model=str(quantized), skip_tokenizer_init=True, quantization="fp8")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="^quantization 'awq' cannot run here: 3-bit weights"):
        LLM(model=str(quantized), skip_tokenizer_init=True)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_quantized_checkpoints_split_over_two_ranks_as_on_one(float_checkpoint, tmp_path, fmt):
    """Tensor parallelism over gloo: stacked projections split by output rows, o_proj and down_proj by input
    features (GPTQ's act-order g_idx with them, its scales whole; AWQ's scales by group). fp8 activations get a
    scale per token on each rank's share of a row-parallel layer's input: close to one rank's, not equal."""
    tolerance = dict(rel=0.03) if fmt == "compressed-tensors" else dict(abs=1e-3)
    quantized, _ = quantized_copy(float_checkpoint, tmp_path, *FORMATS[fmt])
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    outputs = []
    for size in (1, 2):
        llm = LLM(model=str(quantized), skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=size,
                  kv_cache_memory_bytes=32 << 20)
        outputs.append(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False))
        llm.engine.shutdown()
    for one, two in zip(*outputs):
        assert one.outputs[0].token_ids == two.outputs[0].token_ids
        for a, b, token in zip(one.outputs[0].logprobs, two.outputs[0].logprobs, one.outputs[0].token_ids):
            assert a[token].logprob == pytest.approx(b[token].logprob, **tolerance)


@pytest.mark.parametrize("naming", ["self_attn.{}_scale", "self_attn.{}_proj.output_scale"])
def test_kv_cache_scales_from_the_checkpoint(float_checkpoint, tmp_path, naming):
    """compressed-tensors' kv_cache_scheme (`self_attn.k_scale`) and earlier fp8 checkpoints (`k_proj.output_scale`):
    the fp8 cache uses them instead of computing its own; a k scale without its v scale is an error."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmserve.models.layers import Attention

    folder = tmp_path / "scaled"
    shutil.copytree(float_checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    for layer in range(2):
        for which, value in (("k", 0.03 + layer), ("v", 0.02 + layer)):
            tensors[f"model.layers.{layer}." + naming.format(which)] = torch.tensor(value)
    save_file(tensors, folder / "model.safetensors")
    llm = LLM(model=str(folder), skip_tokenizer_init=True, dtype="float32", kv_cache_dtype="fp8")
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    assert [(round(a.k_scale.item(), 6), round(a.v_scale.item(), 6), a.kv_scales_known) for a in layers] == \
        [(0.03, 0.02, True), (1.03, 1.02, True)]
    assert llm.engine.runner.kv_scales_to_compute == []
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert layers[0].k_scale.item() == pytest.approx(0.03)  # not recomputed in the first step
    llm.engine.shutdown()
    del tensors["model.layers.1." + naming.format("v")]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"KV-cache scales under 'model\.layers\.1\.self_attn' \(\['k'\]\): expected"):
        LLM(model=str(folder), skip_tokenizer_init=True, dtype="float32", kv_cache_dtype="fp8")
