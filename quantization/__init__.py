"""Quantization methods (plugins, one module each) and how a model gets one.

A method comes from `--quantization NAME` or from the checkpoint's `quantization_config` (its `quant_method`); the
model runner calls `choose` before loading, `prepare` on the built model, and `finish` once the weights are in.
"""
import logging

import torch
from torch import nn

from llmserve.interfaces import QuantizationMethod
from llmserve.plugins.manager import registry

logger = logging.getLogger(__name__)


def checkpoint_config(hf_config) -> dict | None:
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    return config if isinstance(config, dict) else config.to_dict()


def choose(requested: str | None, hf_config, dtype: torch.dtype, platform: str) -> QuantizationMethod | None:
    """The method for this model (None: plain float weights); a ValueError naming `quantization` when it cannot be."""
    found = checkpoint_config(hf_config)
    in_checkpoint = found.get("quant_method") if found else None
    name = requested or in_checkpoint
    if name is None:
        return None
    methods = registry().of("quantization")
    if name not in methods:
        what = f"the checkpoint's quant_method {name!r}" if requested is None else f"quantization {name!r}"
        raise ValueError(f"{what} is not a registered quantization method; registered: {sorted(methods)} "
                         "(`llm plugins` lists them with the packages providing them)")
    cls = methods[name].load()
    if requested is not None and in_checkpoint is not None and in_checkpoint != requested:
        raise ValueError(f"quantization {requested!r} does not match the checkpoint, quantized with "
                         f"{in_checkpoint!r}; leave quantization unset to use the checkpoint's")
    if found is None and not cls.quantizes_at_load:
        raise ValueError(f"quantization {name!r} reads checkpoints quantized in that format, and this one has no "
                         "quantization_config; give a quantized checkpoint, or a method that quantizes at load (fp8)")
    reasons = cls.why_unsupported(found or {}, dtype, platform)
    if reasons:
        raise ValueError(f"quantization {name!r} cannot run here: {'; '.join(reasons)}")
    return cls(found or {}, dtype, platform)


def quantized_layers(model: nn.Module, method: QuantizationMethod) -> list[tuple[str, nn.Module]]:
    from llmserve.models.layers.linear import Linear, ParallelLMHead

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, Linear) and not isinstance(m, ParallelLMHead) and method.quantizes(name)]


def prepare(model: nn.Module, method: QuantizationMethod) -> None:
    """Give each quantized layer the method's parameters, before the checkpoint is loaded. A mixture of experts'
    experts have no quantized path yet: a quantized checkpoint's are refused, and fp8 at load leaves them as they are
    (said in the log)."""
    from llmserve.models.layers.moe import FusedExperts

    if any(isinstance(m, FusedExperts) for m in model.modules()) and not method.dequantizes_experts:
        if not method.quantizes_at_load:
            raise ValueError(f"quantization {method.name!r}: {type(model).__name__}'s experts have no quantized path "
                             "yet; serve the model's float checkpoint (with --quantization fp8 for its other layers)")
        logger.warning("quantization %s: the experts stay in %s (no quantized path for them yet); attention and dense "
                       "layers are quantized", method.name, str(method.dtype).removeprefix("torch."))
    layers = quantized_layers(model, method)
    for _, layer in layers:
        layer.quant = method
        method.create_weights(layer)
    logger.info("quantization: %s, %d linear layers", method.describe(), len(layers))


def finish(model: nn.Module, method: QuantizationMethod, dummy: bool, generator: torch.Generator | None) -> None:
    """After loading (or random dummy weights): each layer's last step (quantize, repack)."""
    for _, layer in quantized_layers(model, method):
        if layer.quant is method:
            if dummy:
                method.dummy_weights(layer, generator)
            method.process_weights(layer)
