import functools

import torch
import torch.nn.functional as F

from llmserve.models.layers.fused import kernels_for

# HF `hidden_act` / `activation_function` names -> the function
ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def activation(name: str):
    """The activation an HF config names; a name we do not know is an error, never a silent substitute."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def act_and_mul(x: torch.Tensor, name: str = "silu") -> torch.Tensor:
    """act(gate) * up for x [T, 2 * size] = [gate | up] (the gated MLP's activation)."""
    if name in ("silu", "swish") and (kernels := kernels_for(x)):
        return kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return activation(name)(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return act_and_mul(x, "silu")
