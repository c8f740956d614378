"""Checkpoint formats: one safetensors file, sharded safetensors, PyTorch .bin (single and sharded) give the same
tokens; broken checkpoints give errors that name what is wrong."""
import json
import shutil

import pytest
import torch
from conftest import RANDOM_MODEL_MAX_TOKENS, RANDOM_MODEL_PROMPTS, greedy, save_random_model
from safetensors.torch import load_file

from llmserve import LLM


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])


def tokens(folder, **kwargs) -> list[list[int]]:
    params = [greedy(n) for n in RANDOM_MODEL_MAX_TOKENS]
    outputs = LLM(model=str(folder), dtype="float32", **kwargs).generate(RANDOM_MODEL_PROMPTS, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def as_bin(source, folder, shards: int) -> None:
    """The same checkpoint as PyTorch .bin files (with an index when sharded), as older hub checkpoints (OPT) ship."""
    shutil.copytree(source, folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    state = load_file(source / "model.safetensors")
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    save_random_model(qwen2_config(), root / "single")
    save_random_model(qwen2_config(), root / "sharded", max_shard_size="300KB")
    as_bin(root / "single", root / "bin", shards=1)
    as_bin(root / "single", root / "bin_sharded", shards=3)
    return root


def test_every_format_gives_the_same_tokens(checkpoints):
    assert len(list((checkpoints / "sharded").glob("*.safetensors"))) > 2
    assert (checkpoints / "sharded" / "model.safetensors.index.json").is_file()
    expected = tokens(checkpoints / "single")
    assert tokens(checkpoints / "sharded") == expected
    assert tokens(checkpoints / "bin") == expected
    assert tokens(checkpoints / "bin_sharded", load_format="pt") == expected


def test_other_bin_files_beside_the_weights_are_not_read(checkpoints, tmp_path):
    folder = tmp_path / "finetune"
    shutil.copytree(checkpoints / "bin", folder)
    (folder / "training_args.bin").write_bytes(b"not a state dict")  # fine-tunes ship this beside the weights
    assert tokens(folder) == tokens(checkpoints / "single")


def test_load_format_is_honoured(checkpoints):
    with pytest.raises(ValueError, match=r"no pytorch_model\*\.bin files.*load_format='pt'"):
        LLM(model=str(checkpoints / "single"), load_format="pt")
    with pytest.raises(ValueError, match=r"no \*\.safetensors files.*load_format='safetensors'"):
        LLM(model=str(checkpoints / "bin"), load_format="safetensors")
    with pytest.raises(ValueError, match="load_format 'gguf' needs a .gguf model file"):
        LLM(model=str(checkpoints / "single"), load_format="gguf")


def test_missing_shard_is_named(checkpoints, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints / "sharded", folder)
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"names shards that are not in the folder: {victim.name}"):
        LLM(model=str(folder))


def test_bin_with_code_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(checkpoints / "bin", folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({"state": state, "hook": print}, folder / "pytorch_model.bin")  # unpickling would call into code
    with pytest.raises(ValueError, match="corrupt or unreadable weights"):
        LLM(model=str(folder))


def test_unmatched_tensors_and_parameters_are_named(checkpoints, tmp_path):
    extra, missing = tmp_path / "extra", tmp_path / "missing"
    for folder in (extra, missing):
        shutil.copytree(checkpoints / "bin", folder)
    state = torch.load(extra / "pytorch_model.bin", weights_only=True)
    torch.save(state | {"model.layers.0.mlp.surprise.weight": torch.zeros(2)}, extra / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.surprise.weight' has no parameter in Qwen2ForCausalLM"):
        LLM(model=str(extra))
    del state["model.layers.1.post_attention_layernorm.weight"]
    torch.save(state, missing / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no tensor for 1 parameters of Qwen2ForCausalLM: "
                                         r"model.layers.1.post_attention_layernorm.weight"):
        LLM(model=str(missing))
