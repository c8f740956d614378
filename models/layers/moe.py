"""Mixture-of-experts feed-forward blocks: a router picks each token's top-k experts, each a gated MLP
(SiLU-and-multiply, or gpt-oss's clamped SwiGLU with biases), and their outputs are summed, weighted by the router's
probabilities.

Weights: every expert's gate and up projections stacked into `experts.gate_up_proj` [E, 2I, H] (gate rows, then up
rows) and its down projection into `experts.down_proj` [E, H, I], the layout of transformers 5's experts in memory.
Checkpoints store one tensor per expert; `route_expert_tensors` copies them into the stacks as the model loads.
GGUF files (through transformers' reader) give the stacks whole: `FusedExperts.load_full` takes those.

Tensor parallelism splits each expert's intermediate dim I over the ranks, as a dense MLP's: each rank's experts give
a partial sum of the output, and one all-reduce after the down projection adds them (with a shared expert's partial
sum where the model has one). Expert parallelism (`enable_expert_parallel`) instead gives each rank E / ranks whole
experts: a rank computes the (token, expert) pairs of its own experts, skips the others', and the same all-reduce
adds the ranks' sums.

On the CPU the experts run as plain torch (the (token, expert) pairs sorted by expert, one matmul per expert that has
tokens); on CUDA as the fused Triton kernels of triton_moe (no per-expert Python loop, no host sync).
"""
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.distributed import all_reduce, split_evenly, tp
from llmserve.models.layers import triton_moe, triton_ops

# checkpoint projection of one expert -> (stacked parameter, which half of gate_up_proj; None for down_proj)
EXPERT_PROJECTIONS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                      "down_proj": ("down_proj", None)}
EXPERT_TENSOR = re.compile(r"(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>\w+)\.weight")


@dataclass(frozen=True)
class GatedActivation:
    """act(gate, up) = g * sigmoid(alpha * g) * (u + up_shift) with g = min(gate, limit), u = clamp(up, +-limit):
    SiLU-and-multiply as it stands; gpt-oss's clamped SwiGLU with alpha 1.702, limit 7 and up_shift 1."""

    alpha: float = 1.0
    limit: float | None = None
    up_shift: float = 0.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        if self.alpha == 1.0 and self.up_shift == 0.0:
            return F.silu(gate) * up
        return (up + self.up_shift) * (gate * torch.sigmoid(self.alpha * gate))


SILU = GatedActivation()


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [T, K] and their weights [T, K] (fp32): the softmax over all experts' logits,
    renormalised over the chosen k where the model does (Mixtral; Qwen-MoE's `norm_topk_prob`)."""
    weights, ids = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                    activation: GatedActivation = SILU) -> torch.Tensor:
    """sum over k of weights[t, k] * expert ids[t, k] (x[t]), in plain torch: the (token, expert) pairs sorted by
    expert, one matmul per expert that has tokens, the results scattered back to their tokens, weighted. An id of E
    (the number of experts here) is another rank's expert: its pair is skipped."""
    top_k, num_experts = ids.shape[1], gate_up.shape[0]
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()  # on the host: the loop below needs them
    order = order[:sum(counts[:num_experts])]  # the skipped pairs sort last
    rows = order // top_k  # the token of each pair, in expert order
    picked = x[rows]
    out = torch.empty_like(picked)
    start = 0
    for expert in (e for e, count in enumerate(counts[:num_experts]) if count):
        part = slice(start, start + counts[expert])
        gate, up = F.linear(picked[part], gate_up[expert],
                            None if gate_up_bias is None else gate_up_bias[expert]).chunk(2, dim=-1)
        out[part] = F.linear(activation(gate, up), down[expert], None if down_bias is None else down_bias[expert])
        start += counts[expert]
    out *= weights.flatten()[order].unsqueeze(1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, rows, out)


class FusedExperts(nn.Module):
    """E gated MLPs held as two stacked tensors: this rank's slice of each expert's intermediate dim, or with
    expert parallelism this rank's E / ranks whole experts (from `first_expert` on). With `bias`, stacked biases
    too (gpt-oss): the down projection's is added by one rank only where tensor parallelism splits each expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool = False,
                 activation: GatedActivation = SILU) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        state = tp()
        if state.expert_parallel:
            if num_experts % state.size:
                raise ValueError(f"tensor_parallel_size {state.size} does not divide the model's {num_experts} "
                                 "experts, as enable_expert_parallel needs; turn it off to split each expert instead")
            self.local_experts, self.size, self.start = num_experts // state.size, intermediate_size, 0
        else:
            self.local_experts = num_experts
            self.size = split_evenly(intermediate_size, "MoE intermediate size")  # this rank's
            self.start = state.rank * self.size
        self.first_expert = state.rank * self.local_experts if state.expert_parallel else 0
        self.gate_up_proj = nn.Parameter(torch.empty(self.local_experts, 2 * self.size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.local_experts, hidden_size, self.size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.local_experts, 2 * self.size)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(self.local_experts, hidden_size)) if bias else None
        self.activation = activation
        self.loaded: set[tuple[int, str]] = set()  # (expert, checkpoint projection)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the experts' weighted outputs (the caller all-reduces)."""
        others = self.local_experts < self.num_experts
        if others:  # the router's ids as this rank's; local_experts: another rank's expert, skipped
            ids = ids - self.first_expert
            ids = ids.masked_fill((ids < 0) | (ids >= self.local_experts), self.local_experts)
        if triton_ops.fused(x):
            return triton_moe.fused_experts(x, self.gate_up_proj, self.down_proj, weights, ids, others,
                                            self.gate_up_proj_bias, self.down_proj_bias, self.activation)
        return grouped_experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.gate_up_proj_bias,
                               self.down_proj_bias, self.activation)

    def load_expert(self, expert: int, projection: str, tensor: torch.Tensor) -> None:
        """One expert's checkpoint tensor (`projection`: gate_proj, up_proj or down_proj): this rank's part of it."""
        if projection not in EXPERT_PROJECTIONS:
            raise ValueError(f"an expert has no projection {projection!r} (expected one of "
                             f"{', '.join(EXPERT_PROJECTIONS)})")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range: the model has {self.num_experts} experts")
        stacked, half = EXPERT_PROJECTIONS[projection]
        full = (self.hidden_size, self.intermediate_size) if half is None else (self.intermediate_size,
                                                                                 self.hidden_size)
        if tuple(tensor.shape) != full:
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected {full}")
        local = expert - self.first_expert
        if not 0 <= local < self.local_experts:  # another rank's
            return
        if half is None:
            target, part = self.down_proj[local], tensor[:, self.start:self.start + self.size]
        else:
            target = self.gate_up_proj[local, half * self.size:(half + 1) * self.size]
            part = tensor[self.start:self.start + self.size]
        with torch.no_grad():
            target.copy_(part)
        self.loaded.add((expert, projection))

    def missing(self) -> list[str]:
        """`{expert}.{projection}` of every expert tensor not loaded yet."""
        experts = range(self.first_expert, self.first_expert + self.local_experts)
        return [f"{e}.{p}" for e in experts for p in EXPERT_PROJECTIONS if (e, p) not in self.loaded]

    def load_full(self, kind: str, tensor: torch.Tensor) -> None:
        """load_checkpoint's call for a stacked parameter: every expert's tensors in one (transformers 5's layout,
        which its GGUF reader gives): this rank's part of it; or the parameter itself, which route_expert_tensors
        hands on once the per-expert tensors filled it, so that the loader counts it as loaded."""
        param = getattr(self, kind)
        if tensor is param:
            return
        experts = slice(self.first_expert, self.first_expert + self.local_experts)
        if kind.endswith("_bias"):
            self.load_bias(kind, tensor, experts)
            return
        if kind == "gate_up_proj":
            full = (self.num_experts, 2 * self.intermediate_size, self.hidden_size)
            halves = tensor.unflatten(1, (2, self.intermediate_size)) if tuple(tensor.shape) == full else None
            part = None if halves is None else halves[experts, :, self.start:self.start + self.size].flatten(1, 2)
            projections = ("gate_proj", "up_proj")
        else:
            full = (self.num_experts, self.hidden_size, self.intermediate_size)
            part = tensor[experts, :, self.start:self.start + self.size] if tuple(tensor.shape) == full else None
            projections = ("down_proj",)
        if part is None:
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected {full} (experts, out, in)")
        with torch.no_grad():
            param.copy_(part)
        self.loaded.update((e, p) for e in range(experts.start, experts.stop) for p in projections)


    def load_bias(self, kind: str, tensor: torch.Tensor, experts: slice) -> None:
        """Every expert's biases [E, 2I] (gate's, then up's) or [E, H]: this rank's part."""
        param = getattr(self, kind)
        width = 2 * self.intermediate_size if kind == "gate_up_proj_bias" else self.hidden_size
        if tuple(tensor.shape) != (self.num_experts, width):
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected {(self.num_experts, width)} (experts, out)")
        if kind == "gate_up_proj_bias":
            part = tensor.unflatten(1, (2, self.intermediate_size))[experts, :, self.start:self.start + self.size]
            part = part.flatten(1)
        elif self.local_experts == self.num_experts and tp().rank != 0:  # each expert split: rank 0 adds it
            part = torch.zeros_like(param)
        else:
            part = tensor[experts]
        with torch.no_grad():
            param.copy_(part)


def route_expert_tensors(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                         checkpoint_name=lambda name: name) -> Iterator[tuple[str, torch.Tensor]]:
    """Wrap a checkpoint's (name, tensor) stream for load_checkpoint: each expert tensor
    (`<...>.experts.{e}.{gate_proj,up_proj,down_proj}.weight`) goes into its layer's stacks here, every other tensor
    goes on; at the end, an expert tensor missing from any layer is an error naming it (`checkpoint_name`: the
    checkpoint's name for one of ours, where the model renamed), then each stacked parameter goes on, complete."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedExperts)}
    for name, tensor in weights:
        match = EXPERT_TENSOR.fullmatch(name)
        if match is None or match["experts"] not in layers:  # not an expert, or one of another pipeline stage
            yield name, tensor
            continue
        try:
            layers[match["experts"]].load_expert(int(match["expert"]), match["projection"], tensor)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {checkpoint_name(name)!r}: {e}") from None
    missing = [checkpoint_name(f"{prefix}.{tensor}.weight") for prefix, m in layers.items() for tensor in m.missing()]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"the checkpoint has no tensor for {len(missing)} expert weights of {type(model).__name__}: "
                         f"{shown}")
    for prefix, m in layers.items():
        for kind in ("gate_up_proj", "down_proj"):
            yield f"{prefix}.{kind}", getattr(m, kind)


class SparseMoeBlock(nn.Module):
    """A MoE feed-forward block: the router (`gate`, replicated on every rank), the routed experts, and a model's
    shared expert where it has one (`shared_output`), under one all-reduce."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 act: str | GatedActivation = "silu", bias: bool = False) -> None:
        super().__init__()
        if isinstance(act, str) and act not in ("silu", "swish"):
            raise ValueError(f"MoE experts support the SiLU activation only, not {act!r}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be between 1 and the {num_experts} experts")
        self.top_k, self.renormalize = top_k, renormalize
        # an nn.Linear, not our Linear: quantization methods leave the router alone, as quantized checkpoints do
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, bias,
                                    SILU if isinstance(act, str) else act)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """A shared expert's output for every token (this rank's partial sum); None: the model has none."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        shared = self.shared_output(x)
        return all_reduce(out if shared is None else out + shared)
