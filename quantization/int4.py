"""4-bit weights with 16-bit activations (W4A16) from GPTQ and AWQ checkpoints.

Both formats become one layout, output rows first: `qweight` [out, in/8] int32 (eight 4-bit values per word, input
feature 8w + j in bits 4j..4j+3), `scales` and `zeros` [out, groups] (the zero point itself, 0..16), and for GPTQ
`g_idx` [in], the group of each input feature (act-order checkpoints permute them). A weight is
(q - zero[group]) * scale[group]. On the CPU the weights are dequantized once at load to the model's dtype (then packed
for oneDNN like any float weight): the plain path. On the GPU the layout stays as loaded and a Triton kernel
(triton_int4.py) dequantizes tile by tile inside the product; `g_idx` is kept only where it permutes the groups
(act-order), else dropped at load (the kernel then reads group k // group_size, one scale per packed word).
"""
import torch
import torch.nn.functional as F
from torch import nn

from llmserve.interfaces import QuantizationMethod
from llmserve.plugins import hookimpl
from llmserve.quantization import triton_int4

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's packing: nibble i of a word holds column 8c + AWQ_ORDER[i]


def unpack_columns(packed: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """int32 [R, C/8] -> int32 [R, C] of 4-bit values, nibble i of word c being column 8c + order[i]."""
    values = (packed.unsqueeze(-1) >> SHIFTS.to(packed.device)) & 0xF  # [R, C/8, 8] by nibble
    if order is not None:
        values = values[..., torch.tensor(order).argsort()]
    return values.reshape(packed.shape[0], -1)


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] of 4-bit values -> int32 [R, C/8], column 8c + j in nibble j of word c."""
    nibbles = values.to(torch.int32).reshape(values.shape[0], -1, 8) << SHIFTS.to(values.device)
    word = nibbles[..., 0]
    for j in range(1, 8):
        word = word | nibbles[..., j]
    return word


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The float weight [out, in] of the layout above; `groups` [in] is each input feature's group."""
    q = unpack_columns(qweight)
    return ((q - zeros[:, groups].to(torch.int32)).to(scales.dtype) * scales[:, groups]).to(dtype)


class Int4Method(QuantizationMethod):
    """What GPTQ and AWQ share: the layout, the CPU and GPU paths; each subclass reads its checkpoint format."""

    has_g_idx = False

    def __init__(self, quant_config: dict, dtype: torch.dtype, platform: str) -> None:
        super().__init__(quant_config, dtype, platform)
        self.group_size = self.read_group_size(quant_config)
        self.ignored = list(quant_config.get("modules_to_not_convert") or [])

    @staticmethod
    def read_bits(quant_config: dict) -> int:
        return quant_config.get("bits", quant_config.get("w_bit", 4))

    @staticmethod
    def read_group_size(quant_config: dict) -> int:
        return quant_config.get("group_size", quant_config.get("q_group_size", 128))

    @classmethod
    def why_unsupported(cls, quant_config: dict, dtype: torch.dtype, platform: str) -> list[str]:
        reasons = []
        if cls.read_bits(quant_config) != 4:
            reasons.append(f"{cls.read_bits(quant_config)}-bit weights: llmserve reads 4-bit {cls.name} checkpoints")
        if dtype == torch.float32 and platform != "cpu":
            reasons.append("W4A16 runs bf16 or fp16 activations on the GPU; use --dtype float16 or bfloat16")
        return reasons

    def quantizes(self, prefix: str) -> bool:
        return not any(prefix.endswith("." + name) or prefix == name or f".{name}." in f".{prefix}."
                       for name in self.ignored)

    def groups_of(self, layer: nn.Module, in_features: int) -> int:
        size = self.group_size if self.group_size > 0 else in_features
        if in_features % size or in_features % 8:
            raise ValueError(f"{self.name}: {in_features} input features are not a multiple of the group size "
                             f"{size} and of 8")
        return in_features // size

    def create_weights(self, layer: nn.Module) -> None:
        rows, columns = layer.weight.shape
        # a row-parallel layer's groups are numbered over all its input features when g_idx names them
        full = getattr(layer, "full_in", columns) if self.has_g_idx else columns
        groups, device = self.groups_of(layer, full), layer.weight.device
        param = lambda *shape, dtype: nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device),
                                                   requires_grad=False)
        del layer.weight
        layer.qweight = param(rows, columns // 8, dtype=torch.int32)
        layer.scales = param(rows, groups, dtype=self.dtype)
        layer.qzeros = param(rows, groups, dtype=torch.uint8)
        if self.has_g_idx:
            layer.g_idx = param(columns, dtype=torch.int32)

    def input_dim(self, kind: str) -> tuple[int, int] | None:
        if kind == "qweight":
            return 1, 8
        if kind == "g_idx":
            return 0, 1
        if kind in ("scales", "qzeros") and not self.has_g_idx:
            return 1, self.group_size
        return None

    def unsplit(self, kind: str) -> bool:
        return kind == "g_idx"

    def groups(self, layer: nn.Module) -> torch.Tensor:
        if hasattr(layer, "g_idx"):
            return layer.g_idx.long()
        columns = layer.qweight.shape[1] * 8
        return torch.arange(columns, device=layer.qweight.device) // (self.group_size if self.group_size > 0
                                                                       else columns)

    def dummy_weights(self, layer: nn.Module, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            layer.qweight.random_(generator=generator)
            layer.qzeros.fill_(8)
            layer.scales.fill_(0.05 / 8)
            if self.has_g_idx:
                layer.g_idx.copy_(torch.arange(len(layer.g_idx), device=layer.g_idx.device) // self.group_size)

    def process_weights(self, layer: nn.Module) -> None:
        if self.platform == "cpu":  # the plain path: a float weight, packed like any other
            weight = dequantize(layer.qweight, layer.scales, layer.qzeros, self.groups(layer), self.dtype)
            for kind in ("qweight", "scales", "qzeros", "g_idx"):
                if hasattr(layer, kind):
                    delattr(layer, kind)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.quant = None
        elif self.has_g_idx:
            self.drop_ordered_g_idx(layer)

    def drop_ordered_g_idx(self, layer: nn.Module) -> None:
        """Without act-order, g_idx numbers runs of group_size features: keep this rank's columns of scales and
        qzeros and drop g_idx, so that the kernel reads group k // group_size without a gather."""
        g_idx, columns = layer.g_idx.long(), layer.qweight.shape[1] * 8
        size = self.group_size if self.group_size > 0 else columns
        first = int(g_idx[0])
        if columns % size or not torch.equal(g_idx, first + torch.arange(columns, device=g_idx.device) // size):
            return  # act-order (or a rank's slice starting inside a group): the kernel gathers by g_idx
        for kind in ("scales", "qzeros"):
            part = getattr(layer, kind)[:, first:first + columns // size].contiguous()
            setattr(layer, kind, nn.Parameter(part, requires_grad=False))
        del layer.g_idx

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not triton_int4.triton_installed():  # correct, slow: the whole weight dequantized every call
            weight = dequantize(layer.qweight, layer.scales, layer.qzeros, self.groups(layer), x.dtype)
            return F.linear(x, weight, bias)
        return triton_int4.int4_linear(x, layer.qweight, layer.scales, layer.qzeros, getattr(layer, "g_idx", None),
                                       bias)

    def describe(self) -> str:
        where = "dequantized at load (CPU)" if self.platform == "cpu" else "dequantized in a Triton GEMM"
        return f"{self.name}: 4-bit weights, groups of {self.group_size}, {where}"


class GptqMethod(Int4Method):
    """GPTQ (AutoGPTQ / GPTQModel / optimum): qweight [in/8, out] packed along the input, qzeros [groups, out/8]
    packed along the output holding zero - 1 (the "gptq" format; "gptq_v2" holds the zero), scales [groups, out],
    g_idx [in]."""

    name = "gptq"
    has_g_idx = True

    def checkpoint_rows(self, kind: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        if kind == "qweight":
            return tensor.t().contiguous()
        if kind == "qzeros":
            zeros = unpack_columns(tensor)[:, :rows] + (self.quant_config.get("checkpoint_format") != "gptq_v2")
            return zeros.t().contiguous()
        if kind == "scales":
            return tensor.t().contiguous()
        return tensor


class AwqMethod(Int4Method):
    """AWQ (AutoAWQ's GEMM format): qweight [in, out/8] and qzeros [groups, out/8] packed along the output in AWQ's
    nibble order, scales [groups, out]; groups are consecutive input features."""

    name = "awq"

    @classmethod
    def why_unsupported(cls, quant_config: dict, dtype: torch.dtype, platform: str) -> list[str]:
        reasons = super().why_unsupported(quant_config, dtype, platform)
        if str(quant_config.get("version", "gemm")).lower() != "gemm":
            reasons.append(f"AWQ version {quant_config.get('version')!r}: llmserve reads the GEMM format")
        if quant_config.get("zero_point") is False:
            reasons.append("AWQ without zero points: llmserve reads zero-point checkpoints")
        return reasons

    def checkpoint_rows(self, kind: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        if kind == "qweight":
            return pack_columns(unpack_columns(tensor, AWQ_ORDER)[:, :rows].t().contiguous())
        if kind == "qzeros":
            return unpack_columns(tensor, AWQ_ORDER)[:, :rows].t().contiguous()
        if kind == "scales":
            return tensor.t().contiguous()
        return tensor


@hookimpl
def llmserve_quantization_methods():
    return {"gptq": f"{__name__}:GptqMethod", "awq": f"{__name__}:AwqMethod"}
