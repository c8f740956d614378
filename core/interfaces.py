"""The plugin contracts: what an attention backend, a model and a platform provide."""
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch


class HostUploads(Protocol):
    """Pinned host buffers used in turn per step (plugins/cuda.py's PinnedUploads)."""

    def __call__(self, array: np.ndarray) -> torch.Tensor: ...

    def stage(self, array: np.ndarray) -> torch.Tensor: ...

    def next_step(self, wait: Callable[[Any], None] | None = None) -> None:
        """A new step begins: buffers used two steps ago are reused once `wait` (default: block) says they are free."""


@dataclass
class BatchLayout:
    """The common description of one step's flat batch, from which a backend builds its metadata.

    Request i owns the flat tokens query_start_loc[i]:query_start_loc[i+1]; its first new token
    sits at position num_computed[i] and after this step it has seq_lens[i] tokens in the cache.
    """

    query_lens: np.ndarray  # [B] int64
    num_computed: np.ndarray  # [B] int64
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor  # [T] int64, on the device
    block_size: int
    device: torch.device
    upload: HostUploads | None = None  # host arrays to the device without a sync

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A copy of `array` on the device; through pinned memory when the runner offers it, so that it does
        not wait for the GPU work already queued."""
        if self.upload is not None:
            return self.upload(array)
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def pinned(self, array: np.ndarray) -> torch.Tensor:
        """`array` as a host tensor that a library may copy to the device asynchronously: in the runner's pinned
        memory (left untouched until two steps later) when it offers it."""
        return self.upload.stage(array) if self.upload is not None else torch.from_numpy(array)

    @property
    def seq_lens(self) -> np.ndarray:
        return self.num_computed + self.query_lens

    @property
    def query_start_loc(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.query_lens)])


@dataclass
class AttentionSpec:
    """What the model asks of attention; one per model (layers may differ in sliding window)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    sliding_window: int | None = None  # the widest window of any layer (None: no layer has one)
    logit_softcap: float | None = None  # every layer's scores become cap * tanh(scores / cap) (Gemma 2)
    # the KV cache's storage dtype when it is not `dtype` (float8_e4m3fn: stored = x / scale, read = stored * scale,
    # with each layer's k_scale and v_scale); None: the model's dtype (EngineConfig.kv_cache_dtype "auto")
    kv_cache_dtype: torch.dtype | None = None
    attention_sinks: bool = False  # a learned logit per head joins every softmax's denominator (gpt-oss)

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype or self.dtype


class AttentionBackend(ABC):
    name: ClassVar[str]
    platforms: ClassVar[tuple[str, ...]]
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    head_sizes: ClassVar[tuple[int, ...] | None] = None  # None: any
    block_sizes: ClassVar[tuple[int, ...] | None] = None
    supports_sliding_window: ClassVar[bool] = True
    supports_logit_softcap: ClassVar[bool] = False
    supports_attention_sinks: ClassVar[bool] = False  # reads layer.sinks ([heads] logits in the model dtype, or None)
    supports_cuda_graphs: ClassVar[bool] = False  # True: implements build_graph_metadata
    # scaled cache dtypes (AttentionSpec.kv_cache_dtype) its kernels write and read besides the model's own dtype, and
    # why it has no others
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    kv_cache_dtypes_why: ClassVar[str] = "its kernels read a KV cache in the model's dtype only"
    required_packages: ClassVar[dict[str, str]] = {}  # import name -> pip requirement

    @classmethod
    def why_unsupported(cls, spec: AttentionSpec, platform: str) -> list[str]:
        """Every reason this backend cannot run `spec` on `platform` (empty: it can)."""
        import importlib.util

        reasons = []
        if platform not in cls.platforms:
            reasons.append(f"runs on {'/'.join(cls.platforms)}, not on the {platform} platform")
        if spec.dtype not in cls.dtypes:
            reasons.append(f"does not support dtype {spec.dtype}")
        if cls.head_sizes is not None and spec.head_dim not in cls.head_sizes:
            reasons.append(f"supports head sizes {cls.head_sizes}, not {spec.head_dim}")
        if cls.block_sizes is not None and spec.block_size not in cls.block_sizes:
            reasons.append(f"supports block sizes {cls.block_sizes}, not {spec.block_size}")
        if spec.sliding_window and not cls.supports_sliding_window:
            reasons.append("does not support sliding-window attention")
        if spec.logit_softcap and not cls.supports_logit_softcap:
            reasons.append("does not support attention logit soft-capping")
        if spec.attention_sinks and not cls.supports_attention_sinks:
            reasons.append("does not support attention sinks")
        if spec.kv_cache_dtype is not None and spec.kv_cache_dtype not in cls.kv_cache_dtypes:
            reasons.append(f"does not support kv_cache_dtype {str(spec.kv_cache_dtype).removeprefix('torch.')}: "
                           + cls.kv_cache_dtypes_why)
        for module, requirement in cls.required_packages.items():
            if importlib.util.find_spec(module) is None:
                reasons.append(f"needs the package {requirement!r}: pip install {requirement}")
        return reasons

    @classmethod
    def details(cls, spec: AttentionSpec, platform: str) -> list[str]:
        """Lines for `llm plugins` and the log when it is picked: e.g. which of several implementations it uses."""
        return []

    @classmethod
    def prepare(cls) -> list[str]:
        """Called once it is chosen, before an engine builds it: costly set-up that why_unsupported (also run by
        `llm plugins`) must not do, such as compiling a kernel. The reasons it cannot run after all (empty: it can);
        a platform's default then moves on to its next backend."""
        return []

    def __init__(self, spec: AttentionSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's cache; the default is [2 (K, V), blocks, block_size, kv_heads, head_dim]."""
        s = self.spec
        return (2, num_blocks, s.block_size, s.num_kv_heads, s.head_dim)

    @abstractmethod
    def build_metadata(self, batch: BatchLayout) -> Any: ...

    def build_graph_metadata(self, batch: BatchLayout, max_blocks: int, out: Any = None) -> Any:
        """Metadata of a decode batch whose tensors keep their shapes for every batch of this size (block tables
        padded to max_blocks), for a CUDA graph; with `out`, write into out's tensors in place and return it."""
        raise NotImplementedError(f"{self.name} does not support CUDA graphs")

    @abstractmethod
    def forward(self, layer: "AttentionLayer", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: Any) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads, head_dim]; writes k/v to the cache.

        q, k and v may be views into one projection output: only their last dimension is contiguous."""


class AttentionLayer(Protocol):
    layer_index: int
    scale: float  # the softmax scale, per model (1/sqrt(head_dim) unless the model says otherwise)
    sliding_window: int | None  # a query sees itself and the window - 1 keys before it
    logit_softcap: float | None  # scores (after scale) become cap * tanh(scores / cap)
    k_scale: torch.Tensor  # [1] fp32 on the device: a scaled cache (AttentionSpec.kv_cache_dtype) holds k / k_scale
    v_scale: torch.Tensor  # [1] fp32, likewise for v; read by the kernels from the device, never as host numbers


class DecodeGraphs(Protocol):
    """A platform's captured graphs of decode steps, one per padded batch size, and of steps with prompt tokens in
    pieces between the attention layers, one set per padded token count (see plugins/cuda.py)."""

    def padded_size(self, query_lens: np.ndarray) -> int | None:
        """The captured size a decode batch runs at, or None when it is not one that a decode graph runs."""

    def padded_tokens(self, num_tokens: int) -> int | None:
        """The token count a step with prompt tokens runs its graph pieces at, or None when it runs eagerly."""

    def run_pieces(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def capture(self) -> None: ...

    def run_each_size(self) -> None:
        """Each size once without capturing (enforce_eager): its kernels compile now, not in the first steps."""

    def run(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def release(self) -> None:
        """Free the graphs; the engine is shutting down."""


class Platform(ABC):
    """A kind of device: everything device-specific the engine needs, so that core/ names no device."""

    name: ClassVar[str]
    device_type: ClassVar[str]
    attention_backends: ClassVar[tuple[str, ...]]  # preference order
    max_num_batched_tokens: ClassVar[int] = 2048  # the default token budget of a step
    distributed_backend: ClassVar[str] = "gloo"  # torch.distributed's, between the ranks of one model
    async_scheduling: ClassVar[bool] = False  # the default: launch step N+1 before step N's tokens are read
    ray_resource: ClassVar[str | None] = None  # the Ray resource of one device ("GPU"); None: a rank takes a CPU

    @classmethod
    @abstractmethod
    def is_current(cls) -> bool: ...

    @classmethod
    def default_dtype(cls) -> torch.dtype:
        return torch.bfloat16

    @classmethod
    def device(cls) -> torch.device:
        return torch.device(cls.device_type)

    @classmethod
    def device_count(cls) -> int | None:
        """How many ranks this machine can hold, one device each (None: any number share it)."""
        return None

    @classmethod
    def bind_rank(cls, local_index: int, ranks_here: int) -> torch.device:
        """This process's device as local rank `local_index` of `ranks_here` on the machine, made current."""
        return cls.device()

    @classmethod
    def prepare_model(cls, model) -> None:
        """Last changes to a loaded model for this platform (e.g. weight layouts for its kernels)."""

    @classmethod
    def zeroed_kv_cache(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A KV cache tensor of zeros, so that never-written slots hold no NaN that masking could not hide."""
        return torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    @abstractmethod
    def kv_cache_bytes(cls, config, profile_step: Callable[[], None]) -> int:
        """Bytes to give the KV cache, once weights are loaded. `profile_step` runs the largest step the engine
        will run (max_num_batched_tokens), for a platform that measures its peak memory."""

    @classmethod
    def memory_info(cls, device: torch.device) -> tuple[int, int] | None:
        """(free, total) bytes of the device, for error messages (None: not known)."""
        return None

    @classmethod
    def host_uploads(cls, device: torch.device) -> HostUploads | None:
        """Buffers through which host arrays reach the device without waiting for queued work (None: plain copies)."""
        return None

    @classmethod
    def decode_graphs(cls, model, backend: AttentionBackend, max_batch: int, max_model_len: int, block_size: int,
                      device: torch.device, max_prefill_tokens: int = 0) -> DecodeGraphs | None:
        """Graphs for decode steps, and pieces for steps with prompt tokens up to `max_prefill_tokens`, when the
        platform has them (the backend supports_cuda_graphs)."""
        return None

    @classmethod
    def synchronize(cls, device: torch.device | None) -> None:
        """Wait for the work queued on the device (None: the current one)."""


class ModelArchitecture(Protocol):
    """A model written for the flat token batch; registered under its HF `architectures` name."""

    def __init__(self, hf_config, dtype: torch.dtype) -> None: ...

    def attention_spec(self, block_size: int) -> AttentionSpec: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights) -> None: ...


class QuantizationMethod(ABC):
    """How linear layers hold and multiply quantized weights, registered by name: `--quantization NAME` (a method
    that quantizes a float checkpoint as it loads), or the `quant_method` of a checkpoint's quantization_config (a
    method that reads that format). One instance per model. The model runner calls, in order: `create_weights` on each
    layer `quantizes` accepts, the checkpoint's tensors go in through `checkpoint_rows` (and `input_dim` where ranks
    split the input features), `process_weights` once all are loaded, then `apply` at every forward pass."""

    name: ClassVar[str]
    quantizes_at_load: ClassVar[bool] = False  # True: for float checkpoints (fp8); False: reads a quantized format
    # True: a mixture of experts' quantized experts become float as they load (checkpoint_tensors), so models with
    # experts are not refused
    dequantizes_experts: ClassVar[bool] = False

    def __init__(self, quant_config: dict, dtype: torch.dtype, platform: str) -> None:
        self.quant_config, self.dtype, self.platform = quant_config, dtype, platform

    @classmethod
    def why_unsupported(cls, quant_config: dict, dtype: torch.dtype, platform: str) -> list[str]:
        """Why this method cannot run with this configuration here (empty: it can)."""
        return []

    def quantizes(self, prefix: str) -> bool:
        """Whether the linear layer named `prefix` (model.layers.0.mlp.down_proj) is quantized; the LM head never is."""
        return True

    @abstractmethod
    def create_weights(self, layer) -> None:
        """Give `layer` (a models.layers.linear.Linear, `out_features` x `in_features` on this rank; a row-parallel
        one has `full_in` input features in all) this method's parameters in place of its float weight. Every
        parameter has the output rows first, so that layers stacking projections or splitting outputs slice dim 0."""

    def checkpoint_rows(self, kind: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """The checkpoint's tensor `kind` (qweight, scales, weight_scale, ...) of a projection with `rows` output
        rows, in the layout of the layer's parameter of that name."""
        return tensor

    def input_dim(self, kind: str) -> tuple[int, int] | None:
        """Where ranks split the input features (a row-parallel layer): (the dim of `kind` that follows them, input
        features per index of it); None: each rank keeps all of `kind`. A float weight is (1, 1)."""
        return (1, 1) if kind == "weight" else None

    def unsplit(self, kind: str) -> bool:
        """Whether `kind` is indexed by input features only (the same for every stacked projection: GPTQ's g_idx)."""
        return False

    def checkpoint_tensors(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) stream as the model's loader takes it: a format dequantized at load turns
        its tensors into float ones here (MXFP4's experts). Default: as it is."""
        return weights

    def dummy_weights(self, layer, generator: torch.Generator | None) -> None:
        """Random values for the method's own non-float parameters (`--load-format dummy`; float ones are random)."""

    def process_weights(self, layer) -> None:
        """After loading: quantize, repack for this platform's kernels."""

    @abstractmethod
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features], plus `bias` when given."""

    def describe(self) -> str:
        """One line for the log: what is quantized and how."""
        return self.name
