"""CPU_ATTN (opt-in: `--attention-backend CPU_ATTN`): decode rows go through a C++ kernel that reads each request's keys and values
straight from the paged cache (no gather into a padded copy, no conversion of the whole context to fp32: half
precision is widened a vector at a time), one task per (request, KV head) across torch's threads; prefill rows take
TORCH_SDPA's padded groups.

The kernel is compiled when the backend is first built in a process, for this machine (`-march=native`: AVX-512,
AVX2 or what the CPU has; cached by torch under ~/.cache/torch_extensions, about 30 s the first time). Not yet the
CPU's default: its loops rely on the compiler's vectorization, and on a 2-core AVX2 machine the end-to-end
throughput stayed level with TORCH_SDPA's (docs/benchmarks.md); explicit SIMD over whole blocks and a vectorized exp
are what it needs next.
"""
import functools
import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.backends.torch_sdpa import SdpaMetadata, TorchSdpaBackend
from llmserve.interfaces import AttentionSpec, BatchLayout
from llmserve.plugins import hookimpl

logger = logging.getLogger(__name__)

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cfloat>
#include <cmath>
#include <vector>

template <typename T> inline float widen(T x) { return static_cast<float>(x); }
template <> inline float widen<at::BFloat16>(at::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);  // bf16 is the top half of an fp32
}

template <typename T>
void decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
            const torch::Tensor& tokens, const torch::Tensor& block_table, const torch::Tensor& seq_lens, float scale,
            int64_t sliding_window) {
  const int64_t rows = tokens.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = key_cache.size(1), kv_heads = key_cache.size(2), group = heads / kv_heads;
  const int64_t q_token = q.stride(0), q_head = q.stride(1), o_token = out.stride(0), o_head = out.stride(1);
  const int64_t cache_block = key_cache.stride(0), cache_slot = key_cache.stride(1);
  const int64_t table_row = block_table.stride(0);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* kp = key_cache.data_ptr<T>();
  const T* vp = value_cache.data_ptr<T>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(group * dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, kv_head = task % kv_heads, token = tok[row], length = lens[row];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, length - sliding_window) : 0;
      const int64_t* blocks = table + row * table_row;
      for (int64_t g = 0; g < group; ++g) {
        const T* src = qp + token * q_token + (kv_head * group + g) * q_head;
        for (int64_t d = 0; d < dim; ++d) query[g * dim + d] = widen(src[d]) * scale;
      }
      scores.assign(group * (length - first), 0.f);
      for (int64_t t = first; t < length; ++t) {
        const T* key = kp + blocks[t / block_size] * cache_block + (t % block_size) * cache_slot + kv_head * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query.data() + g * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qg[d] * widen(key[d]);
          scores[g * (length - first) + (t - first)] = dot;
        }
      }
      std::vector<float> total(group, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * (length - first);
        const int64_t n = length - first;
        float top = -FLT_MAX, sum = 0.f;
        for (int64_t i = 0; i < n; ++i) top = std::max(top, s[i]);
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) { s[i] = std::exp(s[i] - top); sum += s[i]; }
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < length; ++t) {
        const T* value = vp + blocks[t / block_size] * cache_block + (t % block_size) * cache_slot + kv_head * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * (length - first) + (t - first)];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += w * widen(value[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = op + token * o_token + (kv_head * group + g) * o_head;
        const float inv = 1.f / total[g];
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[g * dim + d] * inv);
      }
    }
  });
}

void paged_decode(torch::Tensor out, torch::Tensor q, torch::Tensor key_cache, torch::Tensor value_cache,
                  torch::Tensor tokens, torch::Tensor block_table, torch::Tensor seq_lens, double scale,
                  int64_t sliding_window) {
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_decode: the head dimension must be contiguous");
  if (q.scalar_type() == at::kFloat) {
    decode<float>(out, q, key_cache, value_cache, tokens, block_table, seq_lens, scale, sliding_window);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode<at::BFloat16>(out, q, key_cache, value_cache, tokens, block_table, seq_lens, scale, sliding_window);
  } else if (q.scalar_type() == at::kHalf) {
    decode<at::Half>(out, q, key_cache, value_cache, tokens, block_table, seq_lens, scale, sliding_window);
  } else {
    TORCH_CHECK(false, "paged_decode: unsupported dtype ", q.scalar_type());
  }
}
"""


@functools.cache
def kernel():
    """The compiled module, or the error that kept it from compiling."""
    from torch.utils.cpp_extension import load_inline

    try:
        module = load_inline("llmserve_cpu_attn", cpp_sources=KERNEL, functions=["paged_decode"],
                             extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno",
                                                "-fno-trapping-math"],
                             extra_ldflags=["-lmvec"], verbose=False)
    except Exception as e:  # no compiler, no ninja, no Python headers: TORCH_SDPA does the work instead
        logger.warning("CPU_ATTN's C++ kernel did not build (%s: %s); falling back", type(e).__name__, e)
        return e
    return module


@dataclass
class CpuAttnMetadata(SdpaMetadata):
    decode_tokens: torch.Tensor  # [D] the flat token of each decode row
    decode_table: torch.Tensor  # [D, max_blocks] int64
    decode_seq_lens: torch.Tensor  # [D] int64


class CpuAttnBackend(TorchSdpaBackend):
    name = "CPU_ATTN"
    platforms = ("cpu",)
    supports_logit_softcap = False
    kv_cache_dtypes = ()  # its C++ decode kernel reads 16- and 32-bit caches only

    @classmethod
    def why_unsupported(cls, spec: AttentionSpec, platform: str) -> list[str]:
        reasons = super().why_unsupported(spec, platform)
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            reasons.append(f"needs a C++ compiler ({compiler}) to build its kernel")
        return reasons

    def __init__(self, spec: AttentionSpec, device: torch.device) -> None:
        super().__init__(spec, device)
        if isinstance(kernel(), Exception):
            raise ValueError(f"CPU_ATTN's C++ kernel did not build: {type(kernel()).__name__}: {kernel()}")

    @classmethod
    def details(cls, spec: AttentionSpec, platform: str) -> list[str]:
        flags = open("/proc/cpuinfo").read() if platform == "cpu" else ""
        isa = next((name for name in ("avx512_bf16", "avx512f", "avx2") if f" {name}" in flags), "baseline x86-64")
        return [f"decode: a C++ kernel, built for this CPU ({isa}) on first use; prefill: torch SDPA"]

    def packed_rows(self, query_lens: np.ndarray, seq_lens: np.ndarray, max_keys: int) -> list[np.ndarray]:
        return [rows for rows in super().packed_rows(query_lens, seq_lens, max_keys) if query_lens[rows[0]] > 1]

    def build_metadata(self, batch: BatchLayout) -> CpuAttnMetadata:
        sdpa = super().build_metadata(batch)
        rows = np.flatnonzero(batch.query_lens == 1)
        width = max([len(batch.block_tables[r]) for r in rows], default=0)
        table = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            table[i, :len(batch.block_tables[row])] = batch.block_tables[row]
        to = lambda a: batch.to_device(np.ascontiguousarray(a, dtype=np.int64))
        return CpuAttnMetadata(sdpa.slot_mapping, sdpa.groups, to(batch.query_start_loc[rows]), to(table),
                               to(batch.seq_lens[rows]))

    def forward(self, layer, q, k, v, kv_cache, metadata: CpuAttnMetadata) -> torch.Tensor:
        out = super().forward(layer, q, k, v, kv_cache, metadata)  # writes the new keys and values; prefill rows
        if len(metadata.decode_tokens):
            kernel().paged_decode(out, q, kv_cache[0], kv_cache[1], metadata.decode_tokens, metadata.decode_table,
                                  metadata.decode_seq_lens, layer.scale, layer.sliding_window or 0)
        return out


@hookimpl
def llmserve_attention_backends():
    return {CpuAttnBackend.name: f"{__name__}:{CpuAttnBackend.__name__}"}
