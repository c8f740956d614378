"""ROCM_ATTN: TRITON_ATTN's kernels with launch settings for AMD Instinct GPUs (the ROCm platform's default).

What differs from the NVIDIA settings: a wavefront is 64 threads, so 4 warps are 256 threads; a compute unit has
64 KiB of LDS (shared memory), so the key/value tiles of wide heads are smaller and software pipelining is shallower
(AMD's Triton pipelines in registers and LDS, num_stages 1 or 2); matrix-core (MFMA) dots need each dimension to be
at least 16, which every tile here keeps.

Never run on AMD hardware: the kernels' code paths with these settings run in Triton's interpreter on the CPU
(tests/test_triton_attn.py), and the settings follow AMD's published Triton guidance, not a measurement. AMD's aiter
kernels are not used yet.
"""
from llmserve.backends.triton_attn import TileConfig, TritonAttnBackend, next_pow2
from llmserve.plugins import hookimpl

LDS_BYTES = 64 << 10


def amd_tile_config(head_dim: int, group: int, itemsize: int, decode: bool) -> TileConfig:
    width = next_pow2(head_dim)
    block_m = max(16 if decode else 64 if width > 128 else 128, next_pow2(group))
    tile_n, stages = (32 if width > 128 else 64), 2

    def lds(m: int, n: int, s: int) -> int:  # a q tile and s stages of k and v tiles
        return (m + 2 * n * s) * width * itemsize

    while lds(block_m, tile_n, stages) > LDS_BYTES:  # shrink: pipelining first, then keys, then query rows
        if stages > 1:
            stages -= 1
        elif tile_n > 16:
            tile_n //= 2
        elif block_m > max(16, next_pow2(group)):
            block_m //= 2
        else:
            break
    return TileConfig(block_m, tile_n, 4, stages)


class RocmAttnBackend(TritonAttnBackend):
    name = "ROCM_ATTN"
    platforms = ("rocm",)

    def tile_config(self, head_dim: int, group: int, itemsize: int, decode: bool) -> TileConfig:
        return amd_tile_config(head_dim, group, itemsize, decode)


@hookimpl
def llmserve_attention_backends():
    return {RocmAttnBackend.name: f"{__name__}:{RocmAttnBackend.__name__}"}
