"""Choosing the platform, the attention backend and the model class from the registry."""
import logging
import os

import torch

from llmserve.interfaces import AttentionBackend, AttentionSpec, Platform
from llmserve.plugins.manager import registry

logger = logging.getLogger(__name__)
BUILTIN_PLATFORMS = ("rocm", "cuda", "cpu")  # detection order


def current_platform(device: str | None = None) -> type[Platform]:
    """The platform that claims this machine; with `device` (EngineConfig.device) of another type, the one that
    runs that type (e.g. the CPU on a GPU machine)."""
    platforms = registry().of("platform")
    claims = [r for name, r in platforms.items() if name not in BUILTIN_PLATFORMS and r.load().is_current()]
    if len(claims) > 1:
        raise RuntimeError("more than one platform plugin claims this machine: "
                           + ", ".join(f"{r.name} ({r.distribution})" for r in claims))
    detected = claims[0].load() if claims else next(c for c in (platforms[n].load() for n in BUILTIN_PLATFORMS)
                                                    if c.is_current())
    device_type = torch.device(device).type if device is not None else detected.device_type
    if detected.device_type == device_type:
        return detected
    for registration in platforms.values():
        if registration.load().device_type == device_type:
            return registration.load()
    raise ValueError(f"device {device!r}: no registered platform runs {device_type!r} devices")


def select_attention_backend(requested: str | None, spec: AttentionSpec,
                             platform: type[Platform]) -> type[AttentionBackend]:
    """The requested backend (argument, else LLMSERVE_ATTENTION_BACKEND) or the platform's first usable one."""
    backends = registry().of("attention_backend")
    requested = requested or os.environ.get("LLMSERVE_ATTENTION_BACKEND") or None
    if requested:
        if requested not in backends:
            failed = "".join(f"; plugin {n!r} failed to load ({e})" for n, e in registry().failures.items())
            raise ValueError(f"unknown attention backend {requested!r}; registered: {', '.join(sorted(backends))}{failed}")
        cls = backends[requested].load()
        reasons = cls.why_unsupported(spec, platform.name) or cls.prepare()
        if reasons:
            raise ValueError(f"attention backend {requested} cannot run this model here: " + "; ".join(reasons))
        logger.info("attention backend %s, as asked%s", requested, "".join(f"; {d}" for d in
                                                                        cls.details(spec, platform.name)))
        return cls
    rejected = []
    for name in [n for n in platform.attention_backends if n in backends]:
        cls = backends[name].load()
        reasons = cls.why_unsupported(spec, platform.name) or cls.prepare()
        if not reasons:
            logger.info("attention backend %s picked: the %s platform's first choice that supports this model%s%s",
                        name, platform.name, f" (skipped {'; '.join(rejected)})" if rejected else "",
                        "".join(f"; {d}" for d in cls.details(spec, platform.name)))
            return cls
        rejected.append(f"{name}: {', '.join(reasons)}")
    raise ValueError(f"no attention backend of the {platform.name} platform can run this model: " + "; ".join(rejected))


def model_class(hf_config) -> type:
    models = registry().of("model")
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in models:
            return models[arch].load()
    raise ValueError(f"model architecture {architectures or '(none given)'} is not supported; "
                     f"supported: {', '.join(sorted(models))}")
