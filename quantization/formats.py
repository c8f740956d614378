"""Float checkpoints rewritten in each quantized format llmserve reads, beside the float checkpoint of what the
quantized tensors stand for: the reference checkpoints of the quantization tests and benchmarks/quant_accuracy.py.
Weights are rounded to the nearest level (no calibration: GPTQ's and AWQ's own tools choose better levels), and
stored exactly as those tools store them."""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 32


def projection_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def quantized_copy(float_folder: Path, folder: Path, quantize, quant_config: dict, targets=projection_weight,
                   rename=lambda name, kind: f"{name.removesuffix('.weight')}.{kind}") -> tuple[Path, Path]:
    """The float checkpoint with each `targets` tensor (by default each projection's weight) replaced by
    `quantize(tensor)`'s tensors (named `rename(name, kind)`), and beside it the float checkpoint of what those
    tensors stand for (the reference)."""
    tensors = {}
    for file in sorted(Path(float_folder).glob("*.safetensors")):
        tensors |= load_file(file)
    reference = dict(tensors)
    quantized = {}
    for name, weight in tensors.items():
        if targets(name):
            parts, dequantized = quantize(weight)
            quantized |= {rename(name, kind): t for kind, t in parts.items()}
            reference[name] = dequantized
        else:
            quantized[name] = weight
    config = json.loads((Path(float_folder) / "config.json").read_text())
    folder = Path(folder)
    for target, state, extra in ((folder / "q", quantized, {"quantization_config": quant_config}),
                                 (folder / "ref", reference, {})):
        target.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, target / "model.safetensors")
        (target / "config.json").write_text(json.dumps(config | extra))
    return folder / "q", folder / "ref"


def int4_groups(weight: torch.Tensor, groups: np.ndarray):
    """Asymmetric 4-bit quantization of weight [out, in] by the input features' groups: (q [out, in], zeros and
    scales [out, n_groups], dequantized weight) with fp16 scales, as GPTQ and AWQ store them."""
    w = weight.double().numpy()
    n = groups.max() + 1
    scales, zeros = np.zeros((w.shape[0], n)), np.zeros((w.shape[0], n), dtype=np.int64)
    for g in range(n):
        cols = w[:, groups == g]
        low, high = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        scales[:, g] = np.float16((high - low) / 15)
        zeros[:, g] = np.clip(np.round(-low / scales[:, g]), 0, 15)
    q = np.clip(np.round(w / scales[:, groups]) + zeros[:, groups], 0, 15).astype(np.int64)
    dequantized = (q - zeros[:, groups]) * scales[:, groups]
    return q, zeros, scales.astype(np.float16), torch.tensor(dequantized, dtype=torch.float32)


def pack(values: np.ndarray, axis: int, order=range(8)) -> torch.Tensor:
    """4-bit values packed eight to an int32 along `axis`: nibble i of a word holds element 8c + order[i]."""
    v = np.moveaxis(values, axis, -1).astype(np.uint32)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = np.zeros(v.shape[:-1], dtype=np.uint32)
    for i, element in enumerate(order):
        words |= v[..., element] << np.uint32(4 * i)
    return torch.from_numpy(np.moveaxis(words.view(np.int32), -1, axis).copy())


def gptq(weight: torch.Tensor):
    """GPTQ's v1 layout with act-order: the input features' groups follow a permutation (g_idx), which depends on
    the input only (its activations' statistics): the projections of one input share it."""
    columns = weight.shape[1]
    permutation = np.random.default_rng(columns).permutation(columns)
    groups = np.empty(columns, dtype=np.int64)
    groups[permutation] = np.arange(columns) // GROUP
    q, zeros, scales, dequantized = int4_groups(weight, groups)
    return {"qweight": pack(q.T, axis=0), "qzeros": pack(zeros.T - 1, axis=1), "scales": torch.from_numpy(scales.T),
            "g_idx": torch.from_numpy(groups.astype(np.int32))}, dequantized


def awq(weight: torch.Tensor):
    """AutoAWQ's GEMM layout: packed along the output features in its nibble order; consecutive groups."""
    groups = np.arange(weight.shape[1]) // GROUP
    q, zeros, scales, dequantized = int4_groups(weight, groups)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    return {"qweight": pack(q.T, axis=1, order=order), "qzeros": pack(zeros.T, axis=1, order=order),
            "scales": torch.from_numpy(scales.T)}, dequantized


def fp8_per_channel(weight: torch.Tensor):
    scale = weight.abs().amax(1, keepdim=True) / 448
    q = (weight / scale).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def fp8_blocks(weight: torch.Tensor, block: int = 16):
    rows, columns = weight.shape
    blocks = weight.reshape(rows // block, block, columns // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
    q = (weight / expanded).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale}, q.float() * expanded


def mxfp4_experts(stacked: torch.Tensor):
    """Experts [E, in, out] (a float gpt-oss checkpoint's) in MXFP4 as gpt-oss is released: [E, out, in / 32, 16]
    bytes of two e2m1 values (low nibble first) and [E, out, in / 32] exponents + 127, each block's exponent the
    smallest that fits its largest magnitude under 6, values rounded to the nearest level."""
    levels = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    w = stacked.double().transpose(1, 2)
    blocks = w.unflatten(-1, (-1, 32))
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=2.0**-126) / 6)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    index = (scaled.abs().unsqueeze(-1) - levels).abs().argmin(-1)  # ties: the lower level
    nibbles = (index + 8 * (scaled < 0)).to(torch.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    dequantized = (levels[index] * torch.where(scaled < 0, -1.0, 1.0) * torch.exp2(exponent).unsqueeze(-1))
    return ({"blocks": packed, "scales": (exponent + 127).to(torch.uint8)},
            dequantized.flatten(-2).transpose(1, 2).float())


def mxfp4_copy(float_folder: Path, folder: Path) -> tuple[Path, Path]:
    """A float gpt-oss checkpoint with its experts in MXFP4, and the float checkpoint they stand for."""
    return quantized_copy(float_folder, folder, mxfp4_experts,
                          {"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn", "router", "embed_tokens",
                                                                               "lm_head"]},
                          targets=lambda name: name.endswith((".experts.gate_up_proj", ".experts.down_proj")),
                          rename=lambda name, kind: f"{name}_{kind}")


COMPRESSED_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                  "config_groups": {"group_0": {"targets": ["Linear"],
                                                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                                "input_activations": {"num_bits": 8, "type": "float",
                                                                      "strategy": "token", "dynamic": True}}}}
FORMATS = {
    "gptq": (gptq, {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "sym": False}),
    "awq": (awq, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}),
    "compressed-tensors": (fp8_per_channel, COMPRESSED_FP8),
    "fp8-blocks": (fp8_blocks, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}),
}
