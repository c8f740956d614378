"""The fused mixture-of-experts kernels for the GPU (Triton's interpreter runs them on the CPU in tests).

`fused_experts` runs every token's top-k experts in two grouped GEMMs, on the device and with shapes fixed by the
token count (no host sync: a CUDA graph can capture it):
1. `align_by_expert`: the T*K (token, expert) pairs sorted by expert, each expert's run padded with a sentinel to a
   multiple of BLOCK_M, and the expert of each BLOCK_M block of rows;
2. gate/up: each block's rows of x times its expert's gate and up tiles, SiLU(gate) * up in registers -> [T*K, I];
3. down: those rows times the expert's down tiles, each row scaled by its routing weight -> [T*K, H], then summed
   over the k picks of each token.
A program computes a BLOCK_M x BLOCK_N tile of one expert's rows, looping over the input dim in BLOCK_K steps with
fp32 accumulation; programs are grouped GROUP_M blocks along M so that neighbours reuse the same weight tiles from
L2. The grid covers the most blocks the padding can make; blocks past the padded count (known only on the device)
return at once. triton is imported on first use.

Tile sizes: measured ones where `benchmarks/moe_kernel.py --write` tuned this GPU and layer shape (kept in
triton_moe_configs.json, by GPU name, then shape, then token count: the nearest count's), else heuristics by the rows
per expert.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int = 3


TUNED_FILE = Path(__file__).with_name("triton_moe_configs.json")


def shape_key(num_experts: int, hidden: int, size: int, top_k: int, dtype: torch.dtype) -> str:
    return f"E={num_experts},H={hidden},I={size},k={top_k},{str(dtype).removeprefix('torch.')}"


@functools.cache
def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


@functools.cache
def tuned_configs(device_name: str, key: str) -> dict[int, Tiles]:
    """The measured tiles of this GPU and shape by token count (empty: never tuned)."""
    if not TUNED_FILE.exists():
        return {}
    found = json.loads(TUNED_FILE.read_text()).get(device_name, {}).get(key, {})
    return {int(tokens): Tiles(**fields) for tokens, fields in found.items()}


def tiles_for(tokens: int, num_experts: int, hidden: int, size: int, top_k: int, dtype: torch.dtype,
              device: torch.device) -> Tiles:
    """The tuned tiles of the nearest token count where this GPU and shape were tuned, else the heuristics."""
    if device.type == "cuda":
        tuned = tuned_configs(gpu_name(device), shape_key(num_experts, hidden, size, top_k, dtype))
        if tuned:
            return tuned[min(tuned, key=lambda n: abs(n - tokens))]
    return tiles(tokens * top_k, num_experts, dtype)


def tiles(pairs: int, num_experts: int, dtype: torch.dtype) -> Tiles:
    """Tile sizes from the average rows per expert: decode-sized batches stream the weights through narrow tiles
    (many programs, each few rows), prefill-sized ones take larger tiles for reuse; fp32 halves BLOCK_K."""
    per_expert = pairs / num_experts
    if per_expert <= 16:
        m, n, k, group, warps = 16, 64, 128, 1, 4
    elif per_expert <= 64:
        m, n, k, group, warps = 32, 64, 64, 4, 4
    else:
        m, n, k, group, warps = 64, 128, 64, 8, 8
    return Tiles(m, n, k // 2 if dtype == torch.float32 else k, group, warps)


@functools.cache
def kernels() -> SimpleNamespace:
    # Triton's interpreter runs a kernel's source against its module's globals: the names it uses must be globals.
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def expert_gemm(a_ptr, w_ptr, bias_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, padded_ptr, pairs, n,
                    k, a_divisor, blocks_m, up_offset, stride_a, stride_we, stride_wn, stride_o, stride_be, alpha,
                    limit, up_shift, GATED: tl.constexpr, WEIGHTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
        """out[pair] = a[pair // a_divisor] @ w[expert].T (+ bias[expert]) over one tile (w: [E, n (+ n more when
        GATED), k]); GATED: the gated activation (moe.GatedActivation) of the two halves; WEIGHTED: times the pair's
        routing weight."""
        pid = tl.program_id(0)
        blocks_n = tl.cdiv(n, BLOCK_N)
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        if pid_m * BLOCK_M >= tl.load(padded_ptr):
            return
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pair < pairs  # the padding's sentinel is `pairs`
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (pair // a_divisor).to(tl.int64)[:, None] * stride_a + ks[None, :]
        w_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            k_ok = ks < k - start
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            acc = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc, input_precision=PRECISION)
            if GATED:
                up = tl.dot(a, tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0), up, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            bias_row = bias_ptr + expert * stride_be + cols
            acc += tl.load(bias_row, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                up += tl.load(bias_row + n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:  # min(gate, limit) * sigmoid(alpha * ...) * (clamp(up, +-limit) + up_shift); SiLU: inf, 1, 0
            acc = tl.minimum(acc, limit)
            acc = acc / (1.0 + tl.exp(-alpha * acc)) * (tl.minimum(tl.maximum(up, -limit), limit) + up_shift)
        if WEIGHTED:
            acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
        out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_o + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])

    return SimpleNamespace(expert_gemm=expert_gemm, cdiv=triton.cdiv)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """The pairs (flat indices t * K + k of ids [T, K]) sorted by expert, each expert's run padded to a multiple of
    block_m with the sentinel T * K; the expert of each block_m block; and the padded length of the experts' runs
    [1], on the device. Pairs whose id is num_experts (another rank's expert) sort past that length: never computed.
    Sized for the most padding T * K pairs can need (shapes depend on T alone)."""
    pairs = ids.numel()
    flat = ids.flatten()
    device = ids.device
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    expert = flat[order]
    rank = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[expert]  # within its expert's run
    capacity = -(-(pairs + min(num_experts + 1, pairs) * (block_m - 1)) // block_m) * block_m
    sorted_pairs = torch.full((capacity,), pairs, dtype=torch.int32, device=device)
    sorted_pairs[(padded_ends - padded)[expert] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    # blocks past the padded length get the last expert: the kernels skip them
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, block_expert.to(torch.int32), padded_ends[num_experts - 1:num_experts]


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, skips: bool = False, gate_up_bias: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None, activation=None, config: Tiles | None = None) -> torch.Tensor:
    """sum over k of weights[t, k] * expert ids[t, k] (x[t]) for x [T, H], gate_up [E, 2I, H] (gate rows, then up),
    down [E, H, I], weights [T, K] and ids [T, K]; in x's dtype. skips: ids may be E, another rank's expert, whose
    pairs add nothing. Biases [E, 2I] and [E, H] where the model has them; `activation` a moe.GatedActivation
    (None: SiLU-and-multiply); `config` forces the tiles (benchmarks/moe_kernel.py)."""
    tokens, top_k = ids.shape
    num_experts, two_i, hidden = gate_up.shape
    size, pairs = two_i // 2, tokens * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    t = config or tiles_for(tokens, num_experts, hidden, size, top_k, x.dtype, x.device)
    sorted_pairs, block_expert, padded = align_by_expert(ids, num_experts, t.block_m)
    weights = weights.flatten().float().contiguous()
    intermediate = torch.empty((pairs, size), dtype=x.dtype, device=x.device)
    out = (torch.zeros if skips else torch.empty)((pairs, hidden), dtype=x.dtype, device=x.device)
    kern = kernels()
    blocks_m = sorted_pairs.numel() // t.block_m
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 in full precision; half types ignore it
    alpha, limit, up_shift = ((activation.alpha, activation.limit or float("inf"), activation.up_shift)
                              if activation is not None else (1.0, float("inf"), 0.0))
    for a, w, bias, result, n, k, a_divisor, gated in (
            (x, gate_up, gate_up_bias, intermediate, size, hidden, top_k, True),
            (intermediate, down, down_bias, out, hidden, size, 1, False)):
        grid = (blocks_m * kern.cdiv(n, t.block_n),)
        kern.expert_gemm[grid](a, w, w if bias is None else bias, result, weights, sorted_pairs, block_expert, padded,
                               pairs, n, k, a_divisor, blocks_m, size * w.stride(1), a.stride(0), w.stride(0),
                               w.stride(1), result.stride(0), 0 if bias is None else bias.stride(0), alpha, limit,
                               up_shift, GATED=gated, WEIGHTED=not gated, HAS_BIAS=bias is not None,
                               PRECISION=precision, BLOCK_M=t.block_m,
                               BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.num_warps,
                               num_stages=t.num_stages)
    return out.view(tokens, top_k, hidden).sum(dim=1)
