"""fp8 (e4m3) weights: quantized at load from a float checkpoint (`--quantization fp8`), or read from a checkpoint
saved in fp8 (quant_method "fp8": HF's format; "compressed-tensors" with float 8-bit weights: llm-compressor's).

Weights are kept in fp8 with a scale per output row (a per-tensor scale becomes the same scale on every row);
activations are quantized per token as they arrive, and the GEMM runs on fp8 inputs with fp32 accumulation
(`torch._scaled_mm`: the Hopper tensor cores on the GPU, oneDNN on the CPU). On a GPU, batches of up to 4 rows
(decode) instead keep their activations in 16 bits (triton_fp8's W8A16 kernel): a request's logits then differ in
their last bits with the batch size, as they do with cuBLAS's choice of kernel. A static activation scale in the
checkpoint (`input_scale`) is read but not used: per-token scales are at least as fine. Checkpoints scaled per
128 x 128 block (HF's fp8, DeepSeek's) are dequantized to the model's dtype at load: no block-scaled fp8 GEMM yet.
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.interfaces import QuantizationMethod
from llmserve.models.layers import triton_ops
from llmserve.quantization import triton_fp8
from llmserve.plugins import hookimpl

logger = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scales [M, 1]) with x ~= fp8 * scale, one scale per row."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (model dtype) @ weight [N, K] (fp8, scales [N, 1]) -> [..., N] in x's dtype. On a GPU, a few rows
    (decode) take triton_fp8's W8A16 kernel; the rest have their activations quantized per token."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] <= triton_fp8.GEMV_MAX_ROWS and triton_ops.fused(x):
        return triton_fp8.fp8_gemv(rows, weight, weight_scale, bias).reshape(*shape[:-1], weight.shape[0])
    xq, x_scale = quantize_rows(rows)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=x.dtype,
                           bias=bias)
    return out.reshape(*shape[:-1], weight.shape[0])


class Fp8Method(QuantizationMethod):
    name = "fp8"
    quantizes_at_load = True

    def __init__(self, quant_config: dict, dtype: torch.dtype, platform: str) -> None:
        super().__init__(quant_config, dtype, platform)
        self.serialized = bool(quant_config)  # the checkpoint holds fp8 weights (else: quantize float ones)
        self.block = self.weight_block(quant_config)
        self.ignored = self.ignored_modules(quant_config)
        # HF's block-scaled format names the scales weight_scale_inv (they multiply, as the others' do)
        self.scale_name = "weight_scale_inv" if self.block and quant_config.get("quant_method") == "fp8" \
            else "weight_scale"
        self.static_inputs = self.has_input_scales(quant_config)

    @staticmethod
    def has_input_scales(quant_config: dict) -> bool:
        return quant_config.get("activation_scheme") == "static"

    @staticmethod
    def weight_block(quant_config: dict) -> tuple[int, int] | None:
        block = quant_config.get("weight_block_size")
        return tuple(block) if block else None

    @staticmethod
    def ignored_modules(quant_config: dict) -> list[str]:
        return list(quant_config.get("modules_to_not_convert") or quant_config.get("ignored_layers") or [])

    @classmethod
    def why_unsupported(cls, quant_config: dict, dtype: torch.dtype, platform: str) -> list[str]:
        reasons = []
        if dtype == torch.float32 and platform != "cpu":
            reasons.append("fp8 GEMMs on the GPU give bf16 or fp16 outputs; use --dtype bfloat16")
        if platform == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
            reasons.append(f"fp8 tensor cores need compute capability 8.9 or newer (Ada, Hopper); this GPU has "
                           f"{'.'.join(map(str, torch.cuda.get_device_capability()))}")
        return reasons

    def quantizes(self, prefix: str) -> bool:
        return not any(prefix == name or prefix.startswith(name + ".") or prefix.endswith("." + name)
                       for name in self.ignored)

    def create_weights(self, layer: nn.Module) -> None:
        if not self.serialized:
            return  # the float weight loads as usual; process_weights quantizes it
        rows, columns = layer.weight.shape
        layer.weight = nn.Parameter(torch.empty(rows, columns, dtype=FP8, device=layer.weight.device),
                                    requires_grad=False)
        blocks = -(-columns // self.block[1]) if self.block else 1
        ones = lambda columns: nn.Parameter(torch.ones(rows, columns, dtype=torch.float32, device=layer.weight.device),
                                            requires_grad=False)
        setattr(layer, self.scale_name, ones(blocks))
        if self.static_inputs:
            layer.input_scale = ones(1)  # read, not used: activations get a scale per token

    def checkpoint_rows(self, kind: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        if kind in ("weight_scale", "weight_scale_inv", "input_scale"):
            scale = tensor.float().reshape(tensor.shape[0] if tensor.dim() == 2 else 1, -1)
            if self.block and kind != "input_scale":  # a row of scales per block of output rows: one per row
                return scale.repeat_interleave(self.block[0], dim=0)[:rows]
            return scale.expand(rows, 1) if scale.shape[0] == 1 else scale
        return tensor

    def input_dim(self, kind: str) -> tuple[int, int] | None:
        if kind == "weight":
            return 1, 1
        if kind in ("weight_scale", "weight_scale_inv") and self.block:
            return 1, self.block[1]
        return None

    def dummy_weights(self, layer: nn.Module, generator: torch.Generator | None) -> None:
        if self.serialized:  # random fp8 values of about the float dummy weights' size
            with torch.no_grad():
                values = torch.empty(layer.weight.shape, device=layer.weight.device).uniform_(-448, 448,
                                                                                               generator=generator)
                layer.weight.copy_(values.to(FP8))
                getattr(layer, self.scale_name).fill_(0.05 / 448)

    def process_weights(self, layer: nn.Module) -> None:
        if not self.serialized:
            weight, scale = quantize_rows(layer.weight.detach())
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
            return
        if self.block:  # dequantized once: no block-scaled fp8 GEMM here yet
            scale = getattr(layer, self.scale_name).detach()
            scale = scale.repeat_interleave(self.block[1], dim=1)[:, :layer.weight.shape[1]]
            layer.weight = nn.Parameter((layer.weight.detach().float() * scale).to(self.dtype), requires_grad=False)
            delattr(layer, self.scale_name)
            layer.quant = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)

    def describe(self) -> str:
        if not self.serialized:
            return "fp8: weights quantized at load, a scale per output row; activations per token (kept 16-bit in GPU batches of up to 4 rows)"
        if self.block:
            return f"fp8 checkpoint with {self.block[0]}x{self.block[1]} block scales, dequantized to {self.dtype}"
        return "fp8 checkpoint: weights in fp8, a scale per output row; activations per token (kept 16-bit in GPU batches of up to 4 rows)"


class CompressedTensorsMethod(Fp8Method):
    """llm-compressor's checkpoints (quant_method "compressed-tensors"): the fp8 schemes (8-bit float weights, per
    channel, tensor or block; activations dynamic or static) run through the fp8 path; others are refused."""

    name = "compressed-tensors"
    quantizes_at_load = False

    @staticmethod
    def weight_schemes(quant_config: dict) -> list[dict]:
        return [group.get("weights") or {} for group in (quant_config.get("config_groups") or {}).values()]

    @classmethod
    def why_unsupported(cls, quant_config: dict, dtype: torch.dtype, platform: str) -> list[str]:
        schemes = cls.weight_schemes(quant_config)
        reasons = []
        if len(schemes) != 1:
            reasons.append(f"{len(schemes)} config groups; llmserve reads checkpoints with one")
        for scheme in schemes:
            if scheme.get("type") != "float" or scheme.get("num_bits") != 8:
                reasons.append(f"weights of {scheme.get('num_bits')}-bit {scheme.get('type')}: llmserve reads the "
                               "8-bit float (fp8) schemes of compressed-tensors")
        return reasons or super().why_unsupported(quant_config, dtype, platform)

    @staticmethod
    def weight_block(quant_config: dict) -> tuple[int, int] | None:
        scheme = (CompressedTensorsMethod.weight_schemes(quant_config) or [{}])[0]
        block = scheme.get("block_structure") if scheme.get("strategy") == "block" else None
        return tuple(block) if block else None

    @staticmethod
    def has_input_scales(quant_config: dict) -> bool:
        groups = quant_config.get("config_groups") or {}
        return any((group.get("input_activations") or {}).get("dynamic") is False for group in groups.values())

    def quantizes(self, prefix: str) -> bool:
        import re

        for pattern in self.quant_config.get("ignore") or []:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], prefix):
                    return False
            elif prefix == pattern or prefix.endswith("." + pattern):
                return False
        return True


@hookimpl
def llmserve_quantization_methods():
    return {"fp8": f"{__name__}:Fp8Method", "compressed-tensors": f"{__name__}:CompressedTensorsMethod"}
