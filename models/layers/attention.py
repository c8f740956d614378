from typing import Callable

import torch
from torch import nn

from llmserve.distributed import tp
from llmserve.interfaces import AttentionSpec


KV_SCALE_FLOOR = 1e-6  # a computed scale is never 0 (a layer whose first keys or values were all zeros)


class Attention(nn.Module):
    """One layer's attention over the paged KV cache; the engine gives it a backend and its cache.

    A cache stored in fp8 (AttentionSpec.kv_cache_dtype) holds clamp(x / scale, +-max) with one fp32 scale per layer
    for K and one for V: the checkpoint's (`set_kv_scales`), else computed from the first step the engine runs (it
    always has prompt tokens): amax(|x|) / the fp8 maximum over that step's tokens, and fixed from then on, so that
    what is cached is never rescaled. The scales stay on the device and the backends read them there: no host sync,
    and a CUDA graph captured before they were computed reads the new values when it replays. The computing step runs
    `attend` eagerly (whole-graph replays are off for it, graph pieces run attention eagerly between them), so the
    step's K and V of this layer are at hand; values of later tokens beyond that amax saturate at the fp8 maximum.
    """

    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int | None = None, logit_softcap: float | None = None,
                 sinks: bool = False) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        # attention sinks (gpt-oss): a learned logit per head that joins each softmax's denominator, no value
        self.sinks = nn.Parameter(torch.empty(num_heads)) if sinks else None
        self.backend = None
        self.kv_cache = torch.empty(0)
        # set while the platform captures a step in CUDA graph pieces: the attention runs between them instead
        self.graph_split: Callable[["Attention", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # buffers, not parameters: checkpoints without them load (the loader wants a tensor for every parameter)
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.kv_scales_known = False  # set from the checkpoint, or computed: fixed
        self.compute_kv_scales_rows: int | None = None  # set for one step: compute the scales from its first rows

    def set_kv_scales(self, k_scale: torch.Tensor | float, v_scale: torch.Tensor | float) -> None:
        """The scales of a fp8 KV cache, from the checkpoint (dequantized = stored * scale); never computed then."""
        for buffer, value in ((self.k_scale, k_scale), (self.v_scale, v_scale)):
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.numel() != 1:
                raise ValueError(f"layer {self.layer_index}: a KV-cache scale is one number per tensor, got shape "
                                 f"{tuple(value.shape)}")
            buffer.copy_(value.reshape(1))
        self.kv_scales_known = True

    def compute_kv_scales(self, k: torch.Tensor, v: torch.Tensor, rows: int) -> None:
        """Scales from this step's first `rows` tokens (the rest pad a CUDA graph's size), on the device."""
        fp8_max = torch.finfo(self.kv_cache.dtype).max
        for buffer, x in ((self.k_scale, k), (self.v_scale, v)):
            buffer.copy_((x[:rows].abs().amax().float() / fp8_max).clamp(min=KV_SCALE_FLOOR).reshape(1))
        self.kv_scales_known = True

    def load_full(self, leaf: str, tensor: torch.Tensor) -> None:
        """The checkpoint's sinks of every head: this rank's heads of them."""
        if tuple(tensor.shape) != (self.num_heads * tp().size,):
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected ({self.num_heads * tp().size},): one per head")
        with torch.no_grad():
            self.sinks.copy_(tensor[tp().rank * self.num_heads:(tp().rank + 1) * self.num_heads])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata) -> torch.Tensor:
        """q [T, heads*head_dim], k/v [T, kv_heads*head_dim] (or split into heads) -> [T, heads*head_dim]."""
        if self.graph_split is not None:
            return self.graph_split(self, q, k, v)
        return self.attend(q, k, v, attn_metadata)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_metadata) -> torch.Tensor:
        tokens = q.shape[0]
        if self.compute_kv_scales_rows is not None:
            self.compute_kv_scales(k, v, self.compute_kv_scales_rows)
        out = self.backend.forward(self, q.view(tokens, self.num_heads, self.head_dim),
                                   k.view(tokens, self.num_kv_heads, self.head_dim),
                                   v.view(tokens, self.num_kv_heads, self.head_dim), self.kv_cache, attn_metadata)
        return out.reshape(tokens, self.num_heads * self.head_dim)


def attention_spec(model: nn.Module, block_size: int) -> AttentionSpec:
    """What a model's attention layers ask of the backend (they share heads and head size; windows may differ)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    first = layers[0]
    if any((a.num_heads, a.num_kv_heads, a.head_dim) != (first.num_heads, first.num_kv_heads, first.head_dim)
           for a in layers):
        raise ValueError(f"{type(model).__name__}: attention layers differ in heads or head size, which one KV cache "
                         "layout cannot hold")
    windows = [a.sliding_window for a in layers if a.sliding_window]
    caps = {a.logit_softcap for a in layers}
    if len(caps) > 1:
        raise ValueError(f"{type(model).__name__}: attention layers differ in logit soft-cap {caps}; backends take one")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return AttentionSpec(first.num_heads, first.num_kv_heads, first.head_dim, dtype, block_size,
                         max(windows, default=None), caps.pop(),
                         attention_sinks=any(a.sinks is not None for a in layers))


def layer_sliding_window(config, layer_index: int) -> int | None:
    """The layer's window as HF decides it: by `layer_types` where the config has them (Gemma, Qwen2/3), else by
    Qwen's `use_sliding_window` from `max_window_layers` on, else `sliding_window` on every layer (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types:
        return window if types[layer_index] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window"):
        return window if config.use_sliding_window and layer_index >= config.max_window_layers else None
    return window
