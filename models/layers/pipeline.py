"""Pipeline stages: each rank builds only its stage's decoder layers (distributed.stage_layers), the others are
placeholders whose checkpoint tensors the loader skips."""
from collections.abc import Callable

import torch
from torch import nn

from llmserve.distributed import receive_from_previous_stage, send_to_next_stage, stage_layers, tp


class MissingLayer(nn.Module):
    """A decoder layer that another pipeline stage runs: no parameters here."""


def stage_layer_list(num_layers: int, build: Callable[[int], nn.Module]) -> nn.ModuleList:
    """All `num_layers` positions (so checkpoint names keep their indices), built only for this stage's layers."""
    mine = stage_layers(num_layers)
    return nn.ModuleList(build(i) if i in mine else MissingLayer() for i in range(num_layers))


def present(layers: nn.ModuleList) -> list[nn.Module]:
    return [layer for layer in layers if not isinstance(layer, MissingLayer)]


def stage_input(embed: Callable[[], torch.Tensor], input_ids: torch.Tensor, hidden_size: int, dtype: torch.dtype,
                with_residual: bool = False) -> tuple:
    """(hidden, residual) at the start of this stage: `embed()` on the first stage, else received from the stage
    before (the residual too when the model carries one between layers)."""
    if tp().first_stage:
        return embed(), None
    like = torch.empty((input_ids.shape[0], hidden_size), dtype=dtype, device=input_ids.device)
    x, residual = receive_from_previous_stage(like, like if with_residual else None)
    return x, residual


def stage_output(*tensors: torch.Tensor | None) -> bool:
    """On a stage before the last: send the hidden states on and return True (the model returns no output here)."""
    if tp().last_stage:
        return False
    send_to_next_stage(*tensors)
    return True


def embedding_for_stage(build: Callable[[], nn.Module], tied: bool) -> nn.Module:
    """The token embedding where a stage uses it: the first stage, and the last when the LM head shares its weight."""
    return build() if tp().first_stage or (tied and tp().last_stage) else MissingLayer()


def head_for_stage(build: Callable[[], nn.Module]) -> nn.Module:
    """The LM head, on the last stage only."""
    return build() if tp().last_stage else MissingLayer()
