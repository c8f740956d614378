"""MXFP4 checkpoints (`quant_method: mxfp4`: gpt-oss as released): each layer's experts stored as 4-bit e2m1 values in
blocks of 32 input features sharing one power-of-two scale, everything else in bf16. The experts are dequantized to
the model's dtype as they load (no MXFP4 kernel yet): they take four times their checkpoint's bytes (gpt-oss-20b's
about 38 GB in bf16 instead of 12), and run as any float experts.

Stored per projection: `<name>_blocks` uint8 [E, out, in / 32, 16] (two values a byte, the low nibble first) and
`<name>_scales` uint8 [E, out, in / 32] (the exponent plus 127), rows in [E, out, in] order; the float tensor
`<name>` they become has the checkpoint's float layout, [E, in, out].
"""
import logging
from collections.abc import Iterator

import torch

from llmserve.interfaces import QuantizationMethod
from llmserve.plugins import hookimpl

logger = logging.getLogger(__name__)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., out, in / 32, 16] uint8 nibbles and [..., out, in / 32] exponents -> [..., in, out] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not pair: expected uint8 [..., out, in / 32, 16] and [..., out, in / 32]")
    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    values = torch.stack([table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]], dim=-1).flatten(-2)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))  # exact: a power of two
    return values.flatten(-2).transpose(-1, -2).to(dtype)


class Mxfp4Method(QuantizationMethod):
    name = "mxfp4"
    dequantizes_experts = True

    def quantizes(self, prefix: str) -> bool:
        return False  # the linear layers of an MXFP4 checkpoint are float (its modules_to_not_convert)

    def create_weights(self, layer) -> None:
        raise AssertionError("mxfp4 quantizes no linear layer")

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise AssertionError("mxfp4 quantizes no linear layer")

    def checkpoint_tensors(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each `<name>_blocks` with its `<name>_scales` (in either order) becomes the float `<name>`."""
        waiting: dict[str, dict[str, torch.Tensor]] = {}
        count = 0
        for name, tensor in weights:
            base, _, part = name.rpartition("_")
            if part not in ("blocks", "scales") or not base:
                yield name, tensor
                continue
            pair = waiting.setdefault(base, {})
            pair[part] = tensor
            if len(pair) == 2:
                del waiting[base]
                try:
                    yield base, dequantize(pair["blocks"], pair["scales"], self.dtype)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensors {base}_blocks / {base}_scales: {e}") from None
                count += 1
        if waiting:
            names = ", ".join(f"{base}_{'scales' if 'blocks' in pair else 'blocks'}" for base, pair in waiting.items())
            raise ValueError(f"MXFP4 checkpoint: no tensor {names} for the one beside it")
        logger.info("mxfp4: %d expert tensors dequantized to %s at load (no MXFP4 kernel yet: 4x their checkpoint "
                    "bytes)", count, str(self.dtype).removeprefix("torch."))

    def describe(self) -> str:
        return f"mxfp4 (experts dequantized to {str(self.dtype).removeprefix('torch.')} at load)"


@hookimpl
def llmserve_quantization_methods():
    return {"mxfp4": f"{__name__}:Mxfp4Method"}
