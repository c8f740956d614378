"""Loading checkpoint tensors into a model's parameters, by name."""
from collections.abc import Iterable

import torch
from torch import nn

from llmserve.models.layers.attention import Attention
from llmserve.models.layers.pipeline import MissingLayer

# checkpoint projection -> (our merged parameter, shard index): q/k/v and gate/up are stacked into one matmul
QKV_GATE_UP = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    stacked: dict[str, tuple[str, int]] = QKV_GATE_UP) -> None:
    """Copy each (name, tensor) into the parameter of that name, or into its shard of a merged parameter (see
    `stacked`); a tensor without a parameter, or a parameter left without a tensor, is an error naming it. A tensor
    for a tied parameter (lm_head tied to the embedding) is checked against the one already loaded, not loaded twice."""
    params = dict(model.named_parameters(remove_duplicate=False))
    owner = {id(p): name for name, p in reversed(list(params.items()))}  # a tied tensor's first name
    loaded = set()
    shards: dict[str, set[int]] = {}  # merged parameter -> the shards loaded so far
    missing_shards: list[str] = []
    model_name = type(model).__name__
    elsewhere = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, MissingLayer))
    kv_scales: dict[str, dict[str, torch.Tensor]] = {}  # attention module -> its fp8 KV-cache scales ("k", "v")
    for name, tensor in weights:
        if elsewhere and name.startswith(elsewhere):
            continue  # a layer of another pipeline stage
        if (scale := kv_cache_scale(name)) is not None:
            kv_scales.setdefault(scale[0], {})[scale[1]] = tensor
            continue
        module_path, _, leaf = name.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        if proj in stacked:
            merged, shard = stacked[proj]
            target = f"{parent}.{merged}" if parent else merged
            if f"{target}.{leaf}" not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in {model_name} "
                                 f"(expected {target}.{leaf})")
            module = model.get_submodule(target)
            module.load_shard(shard, tensor, leaf)  # copied in the parameter's dtype
            shards.setdefault(f"{target}.{leaf}", set()).add(shard)
            continue
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in {model_name}")
        param = params[name]
        if owner[id(param)] != name and owner[id(param)] in loaded:
            continue  # a tied copy (e.g. lm_head.weight saved beside the embedding it shares)
        module = model.get_submodule(module_path) if module_path else model
        if hasattr(module, "load_full"):  # a layer that keeps its tensor-parallel part of the tensor
            try:
                module.load_full(leaf, tensor)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
        else:
            if param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, but {model_name}'s "
                                 f"parameter {name} has {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
        loaded.add(owner[id(param)])
    proj_of = {(merged, shard): proj for proj, (merged, shard) in stacked.items()}
    for name, done in shards.items():  # a merged parameter is loaded once every shard is
        module_path = name.rpartition(".")[0]
        merged = module_path.rpartition(".")[2]
        absent = [proj_of.get((merged, i), f"shard {i}")
                  for i in range(len(model.get_submodule(module_path).shard_offsets) - 1) if i not in done]
        loaded.add(name)
        if absent:
            missing_shards.append(f"{name} (no {', '.join(absent)})")
    for module_path, scales in kv_scales.items():
        attention = next((m for m in model.get_submodule(module_path).modules() if isinstance(m, Attention)), None)
        if attention is None or len(scales) != 2:
            raise ValueError(f"checkpoint KV-cache scales under {module_path!r} ({sorted(scales)}): expected a k and a "
                             f"v scale of an attention layer of {model_name}")
        attention.set_kv_scales(scales["k"], scales["v"])
    missing = missing_shards + [name for name in dict(model.named_parameters()) if name not in loaded]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"the checkpoint has no tensor for {len(missing)} parameters of {model_name}: {shown}")


def kv_cache_scale(name: str) -> tuple[str, str] | None:
    """(the attention module, "k" or "v") of a checkpoint's fp8 KV-cache scale: `self_attn.k_scale` (compressed-tensors'
    kv_cache_scheme) or `self_attn.k_proj.output_scale` (earlier fp8 checkpoints); None for any other tensor."""
    parts = name.split(".")
    if parts[-1] in ("k_scale", "v_scale"):
        return ".".join(parts[:-1]), parts[-1][0]
    if parts[-1] == "output_scale" and len(parts) > 2 and parts[-2] in ("k_proj", "v_proj"):
        return ".".join(parts[:-2]), parts[-2][0]
    return None
