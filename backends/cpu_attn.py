"""CPU_ATTN (the CPU's default where its kernel can build): decode rows, and prefill chunks of up to 16 tokens (each
token a row seeing the keys up to itself), go through a C++ kernel that reads each request's keys and values straight from the
paged cache (no gather into a padded copy, no conversion of the whole context to fp32); longer prefill chunks take
TORCH_SDPA's padded groups.

The kernel, per decode row (rows of more than 256 keys cut into chunks of blocks merged after, the same cut in any
batch), walks the row's blocks a tile of up to 16 keys at a time with an online softmax, keys and values of a tile read
while hot in cache:
- scores: for each KV head, its query heads up to 4 at a time against a few keys at a time, each key vector loaded
  (bf16 widened by a shift, fp16 by F16C) once for those heads, into one vector register per (head, key); 8 (AVX2) or
  16 (AVX-512) such dot products are then summed across lanes at once by a transposing tree of adds;
- softmax: a polynomial exp over whole vectors; the running max is moved (and what was summed so far rescaled) only
  when a score passes it by 8, so most tiles take no horizontal max, no rescale and no scalar exp;
- values: each value vector loaded once and added into register accumulators of those query heads;
- the next tile's keys and values prefetched in memory order, a few lines between each step of the current one;
- tasks handed out to torch's threads one at a time (at::parallel_for, built with OpenMP).
Explicit AVX2/FMA/F16C code, AVX-512 where the compiler targets it (`-march=native`: picked by the compiler's macros),
and portable loops elsewhere (other CPUs, or head sizes not a multiple of the vector width); fp32 accumulation always.
Those vector types and the exp are cpu_ops.VECTORS (models/layers/cpu_ops.py), shared with the layers' CPU kernels.

The kernel is compiled when the backend is first built in a process, for this machine (cached by torch under
~/.cache/torch_extensions, about 40 s the first time, said in the log). Without a compiler, ninja or Python's
headers the CPU platform takes TORCH_SDPA instead, and its log line says why. benchmarks/cpu_attn_kernel.py times it
against TORCH_SDPA's decode path and in GB/s of K/V read.
"""
import functools
import logging
import os
import shutil
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.backends.torch_sdpa import SdpaMetadata, TorchSdpaBackend
from llmserve.interfaces import AttentionSpec, BatchLayout
from llmserve.models.layers import cpu_ops
from llmserve.plugins import hookimpl

logger = logging.getLogger(__name__)

ATTENTION = r"""
namespace {

constexpr int TILE = 16;               // keys per online-softmax step: a block of 16, or a part of a block
constexpr int64_t CHUNK_KEYS = 256;    // rows with more keys are cut into chunks of this many (rounded to blocks)
constexpr float RESCALE_AT = 8.f;      // the running max is moved only when a score passes it by this (e^8 < 3000)

struct Task {
  int64_t row, begin, end;  // keys [begin, end) of this row, for all its heads
  int64_t partial;          // -1: the task has the row's whole window and writes the output; else its slot
};

template <typename T>
struct Problem {
  const T *q, *k, *v;
  T* out;
  const int64_t *tokens, *table;
  int64_t dim, group, kv_heads, block_size, cache_block, cache_slot, q_token, q_head, o_token, o_head, table_row;
  float scale;
};

// Calls fn(first head, heads) for the query heads of one KV head taken up to 4 at a time (one at a time on scalars).
template <int W, class F>
inline void head_groups(int64_t G, F&& fn) {
  if constexpr (W == 1) {
    for (int64_t g = 0; g < G; ++g) fn(g, std::integral_constant<int, 1>());
  } else {
    int64_t g = 0;
    for (; G - g > 4 || G - g == 4; g += 4) fn(g, std::integral_constant<int, 4>());
    if (G - g == 3) fn(g, std::integral_constant<int, 3>());
    else if (G - g == 2) fn(g, std::integral_constant<int, 2>());
    else if (G - g == 1) fn(g, std::integral_constant<int, 1>());
  }
}

// Keys per head in one vector of scores for GT heads: W / GT rounded down to a power of 2 (lanes j * KT + k).
template <int W, int GT>
constexpr int keys_per_head() { return GT == 1 ? W : GT == 2 ? W / 2 : W / 4; }

// The next tile's keys and values (all KV heads: one stretch of the cache each), prefetched a few lines at a time in
// memory order between the steps of the current tile (its score blocks and its value rows), so that the loads overlap
// the arithmetic rather than stall it in one burst.
template <class S>
struct Ahead {
  const char *k = nullptr, *v = nullptr;
  int64_t at = 0, end = 0, step = 1;
  void some() {
    for (int64_t i = 0; i < step && at < end; ++i, at += 64) {
      S::prefetch(k + at);
      S::prefetch(v + at);
    }
  }
};

// One task: a row's keys [begin, end), online softmax a tile (at most TILE keys of one block) at a time. For each KV
// head of the tile, its query heads in groups of GT (up to 4): the scores of GT heads x KT keys in W accumulators
// (each key vector loaded and widened once for the GT heads), summed across lanes all at once; a tile's scores are
// checked against the running maxima (moved only when passed by RESCALE_AT, the accumulators then rescaled),
// exponentiated, and summed lane-wise; then the values are added, each value vector loaded once for the GT heads.
template <class S, typename T>
struct Worker {
  using V = typename S::V;
  static constexpr int W = S::W;
  const Problem<T>& p;
  const int64_t G, H, D;
  std::vector<float> buf;
  float *query, *acc, *keys, *probs, *limits, *refs, *lsums, *top, *sum;
  int64_t calls_per_tile = 0;  // Ahead::some() calls for a full tile

  explicit Worker(const Problem<T>& p) : p(p), G(p.group), H(p.group * p.kv_heads), D(p.dim) {
    buf.resize(2 * H * D + TILE * D + 4 * TILE + 2 * H * W + 2 * H + 64);
    query = buf.data(); acc = query + H * D; keys = acc + H * D; probs = keys + TILE * D; refs = probs + 4 * TILE;
    lsums = refs + H * W; top = lsums + H * W; sum = top + H;
    head_groups<W>(G, [&](int64_t, auto gt) {  // a call per score block and per value row
      calls_per_tile += TILE / keys_per_head<W, decltype(gt)::value>() + TILE;
    });
    calls_per_tile *= p.kv_heads;
  }

  // Scores of heads g0.. g0+GT-1 (queries at q) against KT keys (rows at `rows`, `stride` apart): lane j * KT + k =
  // q_j . key k (lanes past GT * KT: 0).
  template <int GT, typename K>
  V dots(const float* q, const K* rows, int64_t stride) {
    constexpr int KT = keys_per_head<W, GT>();
    V a[W];
    for (int i = 0; i < W; ++i) a[i] = S::zero();
    for (int64_t d = 0; d < D; d += W) {
      V qv[GT];
      for (int j = 0; j < GT; ++j) qv[j] = S::load(q + j * D + d);
      for (int k = 0; k < KT; ++k) {
        const V x = GT > 1 ? S::keep(S::load(rows + k * stride + d)) : S::load(rows + k * stride + d);
        for (int j = 0; j < GT; ++j) a[j * KT + k] = S::fma(qv[j], x, a[j * KT + k]);
      }
    }
    return S::sums(a);
  }

  // acc[heads] += probs x values, for the n keys at `values` (rows cache_slot apart), UD vectors of the head size at
  // a time from d on; the rest with UD / 2, ...
  template <int GT, int UD>
  void add_values(const T* values, int n, float* a0, int64_t d, Ahead<S>& ahead) {
    constexpr int KT = keys_per_head<W, GT>();
    const int64_t stride = p.cache_slot;
    for (; d + UD * W <= D; d += UD * W) {
      V a[GT][UD];
      for (int j = 0; j < GT; ++j)
        for (int u = 0; u < UD; ++u) a[j][u] = S::load(a0 + j * D + d + u * W);
      const T* row = values + d;
      for (int i = 0; i < n; ++i, row += stride) {
        if (d == 0) ahead.some();  // once for each key of the tile
        V x[UD];
        for (int u = 0; u < UD; ++u) x[u] = GT > 1 ? S::keep(S::load(row + u * W)) : S::load(row + u * W);
        const float* pi = probs + (i / KT) * W + (i % KT);
        for (int j = 0; j < GT; ++j) {
          const V pj = S::set1(pi[j * KT]);
          for (int u = 0; u < UD; ++u) a[j][u] = S::fma(pj, x[u], a[j][u]);
        }
      }
      for (int j = 0; j < GT; ++j)
        for (int u = 0; u < UD; ++u) S::store(a0 + j * D + d + u * W, a[j][u]);
    }
    if constexpr (UD > 1) if (d < D) add_values<GT, UD / 2>(values, n, a0, d, ahead);
  }

  // Moves the running maxima of heads h0.. h0+GT-1 up to this tile's (scores sc), rescaling what was summed so far.
  template <int GT>
  void raise(const V* sc, int blocks, int64_t h0) {
    constexpr int KT = keys_per_head<W, GT>();
    float lanes[TILE / KT * W];
    for (int b = 0; b < blocks; ++b) S::store(lanes + b * W, sc[b]);
    float* ref = refs + h0 * W;
    float* lsum = lsums + h0 * W;
    for (int j = 0; j < GT; ++j) {
      float m = ref[j * KT];
      for (int b = 0; b < blocks; ++b)
        for (int k = 0; k < KT; ++k) m = std::max(m, lanes[b * W + j * KT + k]);
      if (!(m > ref[j * KT])) continue;
      const float shrink = exp_approx(ref[j * KT] - m);  // 0 the first time (from -inf)
      float* a = acc + (h0 + j) * D;
      for (int64_t d = 0; d < D; ++d) a[d] *= shrink;
      for (int k = 0; k < KT; ++k) {
        lsum[j * KT + k] *= shrink;
        ref[j * KT + k] = m;
      }
    }
  }

  template <int GT, typename K>
  void group_tile(const K* krows, int64_t kstride, const T* vbase, int n, int64_t h0, Ahead<S>& ahead) {
    constexpr int KT = keys_per_head<W, GT>();
    const int blocks = (n + KT - 1) / KT;
    V sc[TILE / KT];
    const V limit = S::add(S::load(refs + h0 * W), S::set1(RESCALE_AT));
    bool grow = false;
    for (int b = 0; b < blocks; ++b) {
      sc[b] = dots<GT>(query + h0 * D, krows + b * KT * kstride, kstride);
      if ((b + 1) * KT > n || GT * KT < W) sc[b] = S::mask_lanes(sc[b], KT, n - b * KT, GT * KT);
      grow |= S::any_greater(sc[b], limit);
      ahead.some();
    }
    if (grow) raise<GT>(sc, blocks, h0);
    const V ref = S::load(refs + h0 * W);
    V lsum = S::load(lsums + h0 * W);
    for (int b = 0; b < blocks; ++b) {
      const V e = S::exp(S::sub(sc[b], ref));  // lanes masked above: 0
      S::store(probs + b * W, e);
      lsum = S::add(lsum, e);
    }
    S::store(lsums + h0 * W, lsum);
    constexpr int UD = GT == 1 ? 8 : (W == 8 ? (GT == 2 ? 4 : 2) : (GT == 2 ? 8 : 4));  // GT * UD accumulators
    add_values<GT, UD>(vbase, n, acc + h0 * D, 0, ahead);
  }

  // One tile of KV head h: n keys at kbase, kbase + cache_slot, ...; values likewise.
  void tile(const T* kbase, const T* vbase, int n, int64_t h, Ahead<S>& ahead) {
    if (n % W == 0) {  // the keys straight from the cache (widened as loaded)
      head_groups<W>(G, [&](int64_t g0, auto gt) {
        group_tile<decltype(gt)::value>(kbase, p.cache_slot, vbase, n, h * G + g0, ahead);
      });
      return;
    }
    // a part of a block: its keys padded with zero keys to whole vectors of keys (their scores are masked)
    for (int i = 0; i < n; ++i)
      for (int64_t d = 0; d < D; d += W) S::store(keys + i * D + d, S::load(kbase + i * p.cache_slot + d));
    for (int i = n; i < (n + W - 1) / W * W; ++i)
      for (int64_t d = 0; d < D; d += W) S::store(keys + i * D + d, S::zero());
    head_groups<W>(G, [&](int64_t g0, auto gt) {
      group_tile<decltype(gt)::value>(static_cast<const float*>(keys), D, vbase, n, h * G + g0, ahead);
    });
  }

  // Runs a task; leaves the unnormalized accumulators, max and sum of each head in acc, top, sum.
  void run(const Task& t) {
    const int64_t bs = p.block_size, token = p.tokens[t.row];
    const int64_t* blocks = p.table + t.row * p.table_row;
    for (int64_t h = 0; h < H; ++h) {
      const T* src = p.q + token * p.q_token + h * p.q_head;
      for (int64_t d = 0; d < D; d += W) S::store(query + h * D + d, S::mul(S::load(src + d), S::set1(p.scale)));
    }
    std::fill(acc, acc + H * D, 0.f);
    std::fill(refs, refs + H * W, -INFINITY);
    std::fill(lsums, lsums + H * W, 0.f);
    auto where = [&](int64_t pos, int64_t& offset, int& n) {
      const int64_t slot = pos % bs;
      offset = blocks[pos / bs] * p.cache_block + slot * p.cache_slot;
      n = static_cast<int>(std::min<int64_t>({TILE, bs - slot, t.end - pos}));
    };
    int64_t offset = 0, next_offset = 0;
    int n = 0, next_n = 0;
    Ahead<S> ahead;
    if (t.begin < t.end) {
      where(t.begin, offset, n);
      ahead.k = reinterpret_cast<const char*>(p.k + offset);  // the first tile at once
      ahead.v = reinterpret_cast<const char*>(p.v + offset);
      ahead.end = ((n - 1) * p.cache_slot + p.kv_heads * D) * static_cast<int64_t>(sizeof(T));
      ahead.step = ahead.end;
      ahead.some();
    }
    for (int64_t pos = t.begin; pos < t.end; pos += n, offset = next_offset, n = next_n) {
      ahead.at = ahead.end = 0;
      if (pos + n < t.end) {
        where(pos + n, next_offset, next_n);
        ahead.k = reinterpret_cast<const char*>(p.k + next_offset);
        ahead.v = reinterpret_cast<const char*>(p.v + next_offset);
        ahead.end = ((next_n - 1) * p.cache_slot + p.kv_heads * D) * static_cast<int64_t>(sizeof(T));
        ahead.step = std::max<int64_t>(1, ((ahead.end + 63) / 64 + calls_per_tile - 1) / calls_per_tile);
      }
      for (int64_t h = 0; h < p.kv_heads; ++h) tile(p.k + offset + h * D, p.v + offset + h * D, n, h, ahead);
    }
    for (int64_t h = 0; h < p.kv_heads; ++h)  // per head: its reference max, and its sum gathered from its lanes
      head_groups<W>(G, [&](int64_t g0, auto gt) {
        constexpr int GT = decltype(gt)::value, KT = keys_per_head<W, GT>();
        const int64_t h0 = h * G + g0;
        for (int j = 0; j < GT; ++j) {
          top[h0 + j] = refs[h0 * W + j * KT];
          float s = 0.f;
          for (int k = 0; k < KT; ++k) s += lsums[h0 * W + j * KT + k];
          sum[h0 + j] = s;
        }
      });
  }

  void write(int64_t row) {
    T* dst = p.out + p.tokens[row] * p.o_token;
    for (int64_t h = 0; h < H; ++h) {
      const float inv = sum[h] > 0.f ? 1.f / sum[h] : 0.f;  // no keys (an empty window): zeros
      for (int64_t d = 0; d < D; ++d) dst[h * p.o_head + d] = static_cast<T>(acc[h * D + d] * inv);
    }
  }
};

template <class S, typename T>
void decode(const Problem<T>& p, const torch::Tensor& seq_lens, int64_t rows, int64_t sliding_window) {
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t H = p.group * p.kv_heads, D = p.dim, bs = p.block_size;
  const int64_t slot_size = 2 * H + H * D;  // a partial result: max, sum, accumulators
  auto first_key = [&](int64_t r) { return sliding_window > 0 ? std::max<int64_t>(0, lens[r] - sliding_window) : 0; };
  // Rows with windows longer than CHUNK_KEYS are cut into chunks of whole blocks (so that a few long rows keep every
  // thread busy): each chunk's max, sum and accumulators are merged after. The cut depends on the row alone, never on
  // the rest of the batch or the thread count: a row's result is the same in any batch.
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = (CHUNK_KEYS + bs - 1) / bs * bs;
  std::vector<Task> tasks;
  std::vector<std::pair<int64_t, int64_t>> merged;  // (first task, task count) of each split row
  int64_t partials = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t length = lens[r], first = first_key(r);
    if (length - first <= chunk) {
      tasks.push_back({r, first, length, -1});
      continue;
    }
    const int64_t start = static_cast<int64_t>(tasks.size());
    for (int64_t b = first / bs * bs; b < length; b += chunk)
      tasks.push_back({r, std::max(b, first), std::min(b + chunk, length), partials++});
    merged.push_back({start, static_cast<int64_t>(tasks.size()) - start});
  }
  std::vector<float> part(partials * slot_size);
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min(threads, count), 1, [&](int64_t, int64_t) {  // tasks handed out one at a time
    Worker<S, T> w(p);
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      const Task& t = tasks[i];
      w.run(t);
      if (t.partial < 0) {
        w.write(t.row);
      } else {
        float* slot = part.data() + t.partial * slot_size;
        std::copy(w.top, w.top + H, slot);
        std::copy(w.sum, w.sum + H, slot + H);
        std::copy(w.acc, w.acc + H * D, slot + 2 * H);
      }
    }
  });
  at::parallel_for(0, static_cast<int64_t>(merged.size()), 1, [&](int64_t begin, int64_t end) {
    Worker<S, T> w(p);
    for (int64_t m = begin; m < end; ++m) {
      const auto [first, n] = merged[m];
      for (int64_t h = 0; h < H; ++h) {
        float top = -INFINITY, total = 0.f;
        for (int64_t c = 0; c < n; ++c) top = std::max(top, part[tasks[first + c].partial * slot_size + h]);
        std::fill(w.acc + h * D, w.acc + (h + 1) * D, 0.f);
        for (int64_t c = 0; c < n; ++c) {
          const float* slot = part.data() + tasks[first + c].partial * slot_size;
          const float f = exp_approx(slot[h] - top);
          total += f * slot[H + h];
          for (int64_t d = 0; d < D; ++d) w.acc[h * D + d] += f * slot[2 * H + h * D + d];
        }
        w.sum[h] = total;
      }
      w.write(tasks[first].row);
    }
  });
}

template <typename T>
void dispatch(const Problem<T>& p, const torch::Tensor& seq_lens, int64_t rows, int64_t window) {
#ifdef CPU_AVX512
  if (p.dim % 16 == 0) return decode<Avx512, T>(p, seq_lens, rows, window);
#endif
#ifdef CPU_AVX2
  if (p.dim % 8 == 0) return decode<Avx2, T>(p, seq_lens, rows, window);
#else
  if (p.dim % 8 == 0) return decode<Generic<8>, T>(p, seq_lens, rows, window);
#endif
  decode<Generic<1>, T>(p, seq_lens, rows, window);
}

template <typename T>
void run(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
         const torch::Tensor& tokens, const torch::Tensor& block_table, const torch::Tensor& seq_lens, double scale,
         int64_t sliding_window) {
  Problem<T> p;
  p.q = q.data_ptr<T>(); p.k = key_cache.data_ptr<T>(); p.v = value_cache.data_ptr<T>(); p.out = out.data_ptr<T>();
  p.tokens = tokens.data_ptr<int64_t>(); p.table = block_table.data_ptr<int64_t>();
  p.dim = q.size(2); p.kv_heads = key_cache.size(2); p.group = q.size(1) / p.kv_heads; p.block_size = key_cache.size(1);
  p.cache_block = key_cache.stride(0); p.cache_slot = key_cache.stride(1);
  p.q_token = q.stride(0); p.q_head = q.stride(1); p.o_token = out.stride(0); p.o_head = out.stride(1);
  p.table_row = block_table.stride(0);
  p.scale = static_cast<float>(scale);
  dispatch<T>(p, seq_lens, tokens.size(0), sliding_window);
}

}  // namespace

const char* isa() {
#if defined(CPU_AVX512)
  return "avx512";
#elif defined(CPU_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

void paged_decode(torch::Tensor out, torch::Tensor q, torch::Tensor key_cache, torch::Tensor value_cache,
                  torch::Tensor tokens, torch::Tensor block_table, torch::Tensor seq_lens, double scale,
                  int64_t sliding_window) {
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_decode: the head dimension must be contiguous");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && key_cache.scalar_type() == q.scalar_type() &&
              value_cache.scalar_type() == q.scalar_type(), "paged_decode: q, out and the caches must share a dtype");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes() && q.size(2) == key_cache.size(3) &&
              q.size(1) % key_cache.size(2) == 0, "paged_decode: shapes do not match");
  TORCH_CHECK(tokens.size(0) == seq_lens.size(0) && block_table.size(0) == tokens.size(0) &&
              block_table.stride(1) == 1, "paged_decode: tokens, block_table and seq_lens must have a row each");
  if (q.scalar_type() == at::kFloat) {
    run<float>(out, q, key_cache, value_cache, tokens, block_table, seq_lens, scale, sliding_window);
  } else if (q.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(out, q, key_cache, value_cache, tokens, block_table, seq_lens, scale, sliding_window);
  } else if (q.scalar_type() == at::kHalf) {
    run<at::Half>(out, q, key_cache, value_cache, tokens, block_table, seq_lens, scale, sliding_window);
  } else {
    TORCH_CHECK(false, "paged_decode: unsupported dtype ", q.scalar_type());
  }
}
"""


@functools.cache
def kernel():
    """The compiled module, or the error that kept it from compiling."""
    return cpu_ops.build("llmserve_cpu_attn", cpu_ops.VECTORS + ATTENTION, ["paged_decode", "isa"])


@dataclass
class CpuAttnMetadata(SdpaMetadata):
    decode_tokens: torch.Tensor  # [D] the flat token of each kernel row (a decode row, or one token of a short chunk)
    decode_table: torch.Tensor  # [D, max_blocks] int64: its request's block table
    decode_seq_lens: torch.Tensor  # [D] int64: the keys it sees (its own included)


class CpuAttnBackend(TorchSdpaBackend):
    name = "CPU_ATTN"
    platforms = ("cpu",)
    supports_logit_softcap = False
    supports_attention_sinks = False  # its C++ kernel's softmax has no sink term
    kv_cache_dtypes = ()  # its C++ decode kernel reads 16- and 32-bit caches only

    @classmethod
    def why_unsupported(cls, spec: AttentionSpec, platform: str) -> list[str]:
        reasons = super().why_unsupported(spec, platform)
        from torch.utils.cpp_extension import is_ninja_available

        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            reasons.append(f"needs a C++ compiler ({compiler}) to build its kernel")
        if not is_ninja_available():
            reasons.append("needs ninja to build its kernel (pip install ninja)")
        if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
            reasons.append("needs Python's headers to build its kernel (Python.h)")
        return reasons

    @classmethod
    def prepare(cls) -> list[str]:
        if kernel.cache_info().currsize == 0:
            logger.info("CPU_ATTN: loading its C++ kernel (built for this CPU the first time: about a minute)")
        built = kernel()
        return [f"its C++ kernel did not build ({type(built).__name__}: {built})"] if isinstance(built, Exception) \
            else []

    def __init__(self, spec: AttentionSpec, device: torch.device) -> None:
        super().__init__(spec, device)
        if reasons := self.prepare():
            raise ValueError(f"CPU_ATTN cannot run: {reasons[0]}")

    @classmethod
    def details(cls, spec: AttentionSpec, platform: str) -> list[str]:
        flags = open("/proc/cpuinfo").read() if platform == "cpu" else ""
        isa = next((name for name in ("avx512_bf16", "avx512f", "avx2") if f" {name}" in flags), "baseline x86-64")
        return [f"decode and prefill chunks of up to {cls.max_kernel_query} tokens: a C++ kernel, built for this CPU "
                f"({isa}) on first use; longer prefill chunks: torch SDPA"]

    # requests with up to this many new tokens (decode rows, short prompts or prefill chunks) go through the
    # kernel, each new token as a row of its own seeing the keys up to itself; longer chunks take SDPA's matmuls
    # (benchmarks/cpu_attn_kernel.py --query-lens on 2 AVX2 cores: the kernel 1.1-1.3x SDPA at 16 tokens, 0.85-1.05x
    # at 32)
    max_kernel_query = 16

    def packed_rows(self, query_lens: np.ndarray, seq_lens: np.ndarray, max_keys: int) -> list[np.ndarray]:
        # the kernel's rows as empty ones (query length 0), which pack_groups leaves out of every group
        return super().packed_rows(np.where(query_lens > self.max_kernel_query, query_lens, 0), seq_lens, max_keys)

    def build_metadata(self, batch: BatchLayout) -> CpuAttnMetadata:
        sdpa = super().build_metadata(batch)
        rows = np.flatnonzero(batch.query_lens <= self.max_kernel_query)
        width = max([len(batch.block_tables[r]) for r in rows], default=0)
        table = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            table[i, :len(batch.block_tables[row])] = batch.block_tables[row]
        lens = batch.query_lens[rows]
        request = np.repeat(np.arange(len(rows)), lens)  # the request of each kernel row
        within = np.arange(len(request)) - np.repeat(np.cumsum(lens) - lens, lens)  # its token's index in the request
        to = lambda a: batch.to_device(np.ascontiguousarray(a, dtype=np.int64))
        return CpuAttnMetadata(sdpa.slot_mapping, sdpa.groups, to(batch.query_start_loc[rows][request] + within),
                               to(table[request]), to(batch.num_computed[rows][request] + within + 1))

    def forward(self, layer, q, k, v, kv_cache, metadata: CpuAttnMetadata) -> torch.Tensor:
        out = super().forward(layer, q, k, v, kv_cache, metadata)  # writes the new keys and values; prefill rows
        if len(metadata.decode_tokens):
            kernel().paged_decode(out, q, kv_cache[0], kv_cache[1], metadata.decode_tokens, metadata.decode_table,
                                  metadata.decode_seq_lens, layer.scale, layer.sliding_window or 0)
        return out


@hookimpl
def llmserve_attention_backends():
    return {CpuAttnBackend.name: f"{__name__}:{CpuAttnBackend.__name__}"}
