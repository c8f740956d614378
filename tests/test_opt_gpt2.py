"""OPT and GPT-2 on random weights against HF transformers, and their checkpoint names."""
import json
import re

import pytest
import torch
from conftest import assert_greedy_matches_hf, greedy, save_random_model

from llmserve import LLM
from llmserve.loader import iter_weights
from llmserve.models.gpt2 import GPT2LMHeadModel
from llmserve.models.opt import OPTForCausalLM


def opt_config(**overrides):
    from transformers import OPTConfig

    args = dict(vocab_size=50272, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=512, architectures=["OPTForCausalLM"])
    return OPTConfig(**(args | overrides))


def gpt2_config(**overrides):
    from transformers import GPT2Config

    args = dict(vocab_size=50257, n_embd=128, n_inner=256, n_layer=3, n_head=4, n_positions=512,
                architectures=["GPT2LMHeadModel"])
    return GPT2Config(**(args | overrides))


# Sizes and layer counts chosen so that a wrong position offset, norm order, q/k order or scale changes the greedy
# tokens: with random LayerNorm biases some configs' greedy paths repeat one token whatever the model computes.
@pytest.mark.parametrize("overrides", [
    {},  # pre-norm with a final LayerNorm, as OPT-125m
    # post-norm with a down-projected embedding (project_in/project_out), as OPT-350m
    {"do_layer_norm_before": False, "word_embed_proj_dim": 32, "num_hidden_layers": 2},
    {"tie_word_embeddings": False, "enable_bias": False, "layer_norm_elementwise_affine": False},
])
def test_opt_matches_hf(tmp_path, overrides):
    assert_greedy_matches_hf(opt_config(**overrides), tmp_path)


@pytest.mark.parametrize("overrides", [
    {},
    # unscaled scores make attention sharp enough for the per-layer 1 / (layer_index + 1) to show
    {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True, "n_head": 8, "activation_function": "relu",
     "tie_word_embeddings": False},
])
def test_gpt2_matches_hf(tmp_path, overrides):
    assert_greedy_matches_hf(gpt2_config(**overrides), tmp_path)


def prefixed_and_bare(folder, prefix: str) -> tuple[dict, list]:
    """The HF-saved checkpoint, and the same tensors named as the original hub checkpoints name them."""
    weights = dict(iter_weights(str(folder)))
    return weights, [(name.removeprefix(prefix), tensor) for name, tensor in weights.items()]


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_opt_loads_checkpoints_without_model_prefix(tmp_path):
    config = opt_config(do_layer_norm_before=False, word_embed_proj_dim=32)
    save_random_model(config, tmp_path)
    weights, bare = prefixed_and_bare(tmp_path, "model.")
    assert any(name.startswith("decoder.") for name, _ in bare)
    hf_named, original = OPTForCausalLM(config, torch.float32), OPTForCausalLM(config, torch.float32)
    hf_named.load_weights(weights.items())
    original.load_weights(bare)
    assert_same_parameters(hf_named, original)


def test_gpt2_loads_checkpoints_without_prefix_and_with_mask_buffers(tmp_path):
    config = gpt2_config()
    save_random_model(config, tmp_path)
    weights, bare = prefixed_and_bare(tmp_path, "transformer.")
    buffers = [(f"h.{i}.attn.{name}", torch.ones(1, 1, 512, 512)) for i in range(3) for name in ("bias", "masked_bias")]
    hf_named, original = GPT2LMHeadModel(config, torch.float32), GPT2LMHeadModel(config, torch.float32)
    hf_named.load_weights(weights.items())
    original.load_weights(bare + buffers)
    assert_same_parameters(hf_named, original)


@pytest.mark.parametrize("cls, config, dropped, extra, our_name", [
    (OPTForCausalLM, opt_config(), "model.decoder.layers.1.fc2.bias", "model.decoder.layers.0.fc3.weight",
     "decoder.layers.1.fc2.bias"),
    (OPTForCausalLM, opt_config(), "model.decoder.layers.2.self_attn.k_proj.weight", "model.decoder.extra.weight",
     "decoder.layers.2.self_attn.qkv_proj.weight (no k_proj)"),
    (GPT2LMHeadModel, gpt2_config(), "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.q_attn.weight",
     "h.1.mlp.c_fc.weight"),
])
def test_missing_or_extra_tensor_is_named(tmp_path, cls, config, dropped, extra, our_name):
    save_random_model(config, tmp_path)
    weights = dict(iter_weights(str(tmp_path)))
    missing = {name: t for name, t in weights.items() if name != dropped}
    assert len(missing) == len(weights) - 1
    with pytest.raises(ValueError, match=re.escape(our_name)):
        cls(config, torch.float32).load_weights(missing.items())
    with pytest.raises(ValueError, match=extra.partition(".")[2].replace(".", r"\.")):
        cls(config, torch.float32).load_weights([*weights.items(), (extra, torch.zeros(64, 64))])


def test_gpt2_refuses_cross_attention():
    with pytest.raises(ValueError, match="add_cross_attention"):
        GPT2LMHeadModel(gpt2_config(add_cross_attention=True), torch.float32)


def test_model_without_chat_template_refuses_chat_unless_given_one(tmp_path):
    """OPT and GPT-2 ship no chat template: chat is a clear error, and works once a template is given."""

    save_random_model(opt_config(), tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config_file = tmp_path / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "chat_template"}))
    messages = [{"role": "user", "content": "Hello"}]
    with pytest.raises(ValueError, match="no chat template"):
        LLM(model=str(tmp_path), dtype="float32").chat(messages)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    llm = LLM(model=str(tmp_path), dtype="float32", chat_template=template)
    out = llm.chat(messages, greedy(3))[0]
    assert llm.engine.tokenizer.decode(out.prompt_token_ids) == "user: Hello\nassistant:"
    assert len(out.outputs[0].token_ids) == 3
