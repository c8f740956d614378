"""Tune the fused MoE kernel (models/layers/triton_moe.py) for one model's expert shape on this GPU: every candidate
tile config at each token count, timed as CUDA-graph replays (triton.testing.do_bench_cudagraph medians, as the
engine's decode steps run it; timed eagerly, small counts measure the Python launches) against the heuristic tiles,
and, with --write, the best of each count saved into models/layers/triton_moe_configs.json, where fused_experts
finds them.

    python benchmarks/moe_kernel.py --model benchmarks/models/Qwen3-30B-A3B [--tokens 1 8 64 512] [--write]

Also prints each count's time against the weight-read floor (the experts its pairs pick, at the measured copy
bandwidth). Random routing, bf16 (--dtype)."""
import argparse
import itertools
import json
import time

import torch
from transformers import AutoConfig
from triton.testing import do_bench, do_bench_cudagraph

from llmserve.models.layers import triton_moe
from llmserve.models.layers.moe import route

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def expert_shape(config) -> tuple[int, int, int, int]:
    """(experts, hidden, intermediate, top-k) of Mixtral-, Qwen-MoE- and gpt-oss-style configs."""
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return experts, config.hidden_size, size, config.num_experts_per_tok


def candidates() -> list[triton_moe.Tiles]:
    out = []
    for m, n, k, warps, stages in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (4, 8), (3, 4)):
        if m * n >= 128 * 128 and warps == 4 or m == 16 and warps == 8:
            continue  # too few threads for the tile, or too many for it
        out.append(triton_moe.Tiles(m, n, k, 1 if m == 16 else 4 if m == 32 else 8, warps, stages))
    return out


def graph_us(fn) -> float:
    return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1000


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (do_bench(lambda: b.copy_(a), return_mode="median") / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder with the model's config.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--write", action="store_true", help="save the best tiles for this GPU and shape")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    experts, hidden, size, top_k = expert_shape(AutoConfig.from_pretrained(args.model))
    torch.manual_seed(0)
    gate_up = torch.randn(experts, 2 * size, hidden, device="cuda", dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, size, device="cuda", dtype=dtype) / size**0.5
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    bandwidth, start, rows, best = copy_bandwidth(), time.time(), [], {}
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
        weights, ids = route(torch.randn(tokens, experts, device="cuda"), top_k, True)
        reference = triton_moe.fused_experts(x, gate_up, down, weights, ids, config=triton_moe.tiles(
            tokens * top_k, experts, dtype)).float()
        timed = {}
        for cfg in candidates():
            try:
                out = triton_moe.fused_experts(x, gate_up, down, weights, ids, config=cfg).float()
                if ((out - reference).norm() / reference.norm()).item() > 1e-2:
                    raise AssertionError("differs from the heuristic tiles' result")
                timed[cfg] = graph_us(lambda: triton_moe.fused_experts(x, gate_up, down, weights, ids, config=cfg))
            except Exception as e:  # noqa: BLE001 (a config the GPU cannot run: out of shared memory, ...)
                print(f"  tokens {tokens} {cfg}: {type(e).__name__}: {str(e)[:120]}")
        heuristic = triton_moe.tiles(tokens * top_k, experts, dtype)
        heuristic_us = graph_us(lambda: triton_moe.fused_experts(x, gate_up, down, weights, ids, config=heuristic))
        fastest = min(timed, key=timed.get)
        picked = experts * (1 - (1 - top_k / experts) ** tokens)
        floor_us = picked * expert_bytes / bandwidth * 1e6
        best[tokens] = fastest
        rows.append((tokens, heuristic_us, timed[fastest], floor_us, fastest))
        print(f"tokens {tokens}: heuristic {heuristic_us:.1f} us, best {timed[fastest]:.1f} us {fastest} "
              f"t={time.time() - start:.0f}s", flush=True)
    key = triton_moe.shape_key(experts, hidden, size, top_k, dtype)
    if args.write:
        saved = json.loads(triton_moe.TUNED_FILE.read_text()) if triton_moe.TUNED_FILE.exists() else {}
        saved.setdefault(torch.cuda.get_device_name(), {})[key] = {
            str(t): cfg.__dict__ for t, cfg in sorted(best.items())}
        triton_moe.TUNED_FILE.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"\n{torch.cuda.get_device_name()}, {key}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'tokens':>7}{'heuristic us':>14}{'tuned us':>10}{'floor us':>10}{'tuned/floor':>12}  tiles")
    for tokens, heuristic_us, tuned_us, floor_us, cfg in rows:
        print(f"{tokens:>7}{heuristic_us:>14.1f}{tuned_us:>10.1f}{floor_us:>10.1f}{tuned_us / floor_us:>12.2f}  "
              f"{tuple(cfg.__dict__.values())}")


if __name__ == "__main__":
    main()
