"""Third-party plugins: the example package installed with pip, listed by `llm plugins`, used by LLM; plugin errors.

Packages are pip-installed into --target folders, never into the shared environment (a plugin that is always
installed would change every other test's registry). The registry is loaded once per process, so each plugin
environment other than the example's own is tested in a subprocess.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, greedy

from llmserve import LLM
from llmserve.interfaces import AttentionSpec
from llmserve.loader import find_model, load_tokenizer
from llmserve.plugins.manager import registry
from llmserve.plugins.platforms import CpuPlatform
from llmserve.plugins.select import select_attention_backend

EXAMPLE = Path(__file__).parents[1] / "examples" / "plugins"
LLM_COMMAND = shutil.which("llm", path=os.path.dirname(sys.executable)) or "llm"  # the console script
SPEC = AttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, dtype=torch.float32, block_size=16)  # SmolLM2's
GPU_ONLY = ("triton", "flashinfer", "flash_attn", "aiter", "vllm")
MISSING = "ModuleNotFoundError: No module named 'llmserve_missing_dependency'"
BROKEN = '''import llmserve_missing_dependency  # raises on import, like a plugin whose native library is missing
'''
DUPLICATE = '''from llmserve.plugins import hookimpl


@hookimpl
def llmserve_attention_backends():
    return {"EXAMPLE_ATTN": "llmserve_duplicate_plugin.attention:Backend"}
'''


def pip_install(target: Path, *sources: Path) -> Path:
    # offline: --no-deps (llmserve is already here) and --no-build-isolation (the installed setuptools builds it)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--root-user-action=ignore", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), *map(str, sources)], check=True)
    return target


def write_plugin(root: Path, distribution: str, entry_point: str, source: str) -> Path:
    package = distribution.replace("-", "_")
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(source)
    (root / "pyproject.toml").write_text(f'''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{distribution}"
version = "1.0"

[project.entry-points."llmserve.plugins"]
{entry_point} = "{package}"
''')
    return root


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    """The example package, pip-installed (from a copy, so no build files land in the repository)."""
    tmp = tmp_path_factory.mktemp("example")
    source = shutil.copytree(EXAMPLE, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    return pip_install(tmp / "site", source)


@pytest.fixture(scope="session")
def bad_site(tmp_path_factory) -> Path:
    """A plugin that raises on import ("broken") and one that registers EXAMPLE_ATTN again ("duplicate")."""
    tmp = tmp_path_factory.mktemp("bad")
    return pip_install(tmp / "site", write_plugin(tmp / "broken", "llmserve-broken-plugin", "broken", BROKEN),
                       write_plugin(tmp / "duplicate", "llmserve-duplicate-plugin", "duplicate", DUPLICATE))


@pytest.fixture(scope="module")
def example_plugin(example_site):
    """The example plugin loaded in this process."""
    sys.path.insert(0, str(example_site))
    registry.cache_clear()
    yield
    sys.path.remove(str(example_site))
    registry.cache_clear()


def run(args: list[str], *sites: Path, plugins: str | None = None) -> subprocess.CompletedProcess:
    """A subprocess on the CPU platform that sees the packages installed in `sites`, allowlisted by `plugins`."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(map(str, sites)), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LLMSERVE_PLUGINS", None)
    if plugins is not None:
        env["LLMSERVE_PLUGINS"] = plugins
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def save_config(folder: Path, architecture: str) -> str:
    """A tiny Llama config naming `architecture`, with the default model's tokenizer (weights: load_format="dummy")."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, architectures=[architecture]).save_pretrained(folder)
    load_tokenizer(find_model(None)).save_pretrained(folder)
    return str(folder)


def test_llm_plugins_lists_the_example_with_its_package(example_site):
    out = run([LLM_COMMAND, "plugins"], example_site)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert ["*", "cpu", "llmserve", "0.1.0"] in rows
    assert "9 heads, 3 KV heads, head_dim 64, float32, block size 16" in out.stdout
    assert ["ok", "EXAMPLE_ATTN", "llmserve-example-plugin", "0.1.0"] in rows
    assert ["no", "EXAMPLE_COMPILED_ATTN", "llmserve-example-plugin", "0.1.0"] in rows
    assert "- runs on cuda, not on the cpu platform".split() in rows
    assert ["ExampleLlamaForCausalLM", "llmserve-example-plugin", "0.1.0"] in rows


def test_listing_imports_no_gpu_module_nor_model(example_site):
    code = f"""import json, sys
from llmserve.cli.plugins import collect
listing = collect()
imported = [m for m in sys.modules if m.split(".")[0] in {GPU_ONLY!r} or m == "llmserve_example_plugin.model"]
print(json.dumps([listing, imported]))"""
    out = run([sys.executable, "-c", code], example_site)
    assert out.returncode == 0, out.stderr
    listing, imported = json.loads(out.stdout)
    assert imported == []
    backends = {b["name"]: b for b in listing["attention_backends"]}
    assert backends["EXAMPLE_ATTN"]["available"]
    assert backends["EXAMPLE_ATTN"]["distribution"] == "llmserve-example-plugin"
    assert not backends["EXAMPLE_COMPILED_ATTN"]["available"]


def test_example_backend_matches_the_default(example_plugin, llm):
    assert llm.engine.runner.backend.name == "CPU_ATTN"
    example = LLM(dtype="float32", attention_backend="EXAMPLE_ATTN")
    assert example.engine.runner.backend.name == "EXAMPLE_ATTN"
    prompts = [PROMPTS[i] for i in (0, 3, 6, 8)]  # short and long (several cache blocks), batched together
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(10), use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in example.generate(prompts, greedy(10), use_tqdm=False)] == expected


def test_example_architecture_loads(example_plugin, tmp_path):
    llm = LLM(model=save_config(tmp_path, "ExampleLlamaForCausalLM"), load_format="dummy", dtype="float32")
    assert type(llm.engine.runner.model).__module__ == "llmserve_example_plugin.model"
    assert len(llm.generate([[5, 17, 300]], greedy(4), use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_unknown_architecture_and_backend(example_plugin, tmp_path):
    with pytest.raises(ValueError, match=r"\['NoSuchForCausalLM'\] is not supported; supported: .*ExampleLlama"):
        LLM(model=save_config(tmp_path / "unknown", "NoSuchForCausalLM"), load_format="dummy")
    with pytest.raises(ValueError, match="unknown attention backend 'NO_SUCH_ATTN'; registered: CPU_ATTN, "
                                         "EXAMPLE_ATTN, "):
        LLM(model=save_config(tmp_path / "example", "ExampleLlamaForCausalLM"), load_format="dummy",
            attention_backend="NO_SUCH_ATTN")


def test_backend_from_environment(example_plugin, monkeypatch):
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "EXAMPLE_ATTN")
    assert select_attention_backend(None, SPEC, CpuPlatform).name == "EXAMPLE_ATTN"


def test_unusable_backend_gives_every_reason(example_plugin):
    with pytest.raises(ValueError, match="EXAMPLE_COMPILED_ATTN cannot run this model here: "
                                         "runs on cuda, not on the cpu platform") as error:
        select_attention_backend("EXAMPLE_COMPILED_ATTN", SPEC, CpuPlatform)
    if importlib.util.find_spec("triton") is None:
        assert "needs the package 'triton': pip install triton" in str(error.value)


def test_broken_plugin_is_reported_and_skipped(example_site, bad_site):
    code = ("from llmserve.plugins.select import select_attention_backend\n"
            "from llmserve.plugins.platforms import CpuPlatform\n"
            "select_attention_backend('BROKEN_ATTN', None, CpuPlatform)")
    out = run([sys.executable, "-c", code], example_site, bad_site, plugins="example,broken")
    assert "ValueError: unknown attention backend 'BROKEN_ATTN'" in out.stderr
    assert f"plugin 'broken' failed to load ({MISSING})" in out.stderr
    out = run([LLM_COMMAND, "plugins"], example_site, bad_site, plugins="example,broken")
    assert f"  broken (llmserve-broken-plugin 1.0): {MISSING}" in out.stdout.splitlines()
    assert "EXAMPLE_ATTN" in out.stdout and "duplicate" not in out.stdout  # the others load; the allowlist holds


def test_duplicate_name_names_both_distributions(example_site, bad_site):
    out = run([LLM_COMMAND, "plugins"], example_site, bad_site)
    assert out.returncode == 1
    assert "attention_backend 'EXAMPLE_ATTN' is registered twice: by llmserve-" in out.stderr
    assert "llmserve-example-plugin" in out.stderr and "llmserve-duplicate-plugin" in out.stderr


def test_empty_allowlist_loads_no_third_party_plugin(example_site, bad_site):
    out = run([LLM_COMMAND, "plugins", "--json"], example_site, bad_site, plugins="")
    listing = json.loads(out.stdout)
    kinds = ("platforms", "attention_backends", "models")
    assert {e["distribution"] for kind in kinds for e in listing[kind]} == {"llmserve"}
    assert listing["failures"] == []


CLAIMING_PLATFORM = '''from llmserve.plugins import hookimpl
from llmserve.plugins.platforms import CpuPlatform


class {name}(CpuPlatform):
    name = "{key}"

    @classmethod
    def is_current(cls) -> bool:
        return True


@hookimpl
def llmserve_platforms():
    return {{"{key}": __name__ + ":{name}"}}
'''


def test_platform_plugins_claim_the_machine(tmp_path):
    sources = [write_plugin(tmp_path / key, f"llmserve-{key}-platform", key,
                            CLAIMING_PLATFORM.format(name=key.title() + "Platform", key=key)) for key in ("npu", "xpu")]
    site = pip_install(tmp_path / "site", *sources)
    code = "from llmserve.plugins.select import current_platform; print(current_platform().name)"
    one = run([sys.executable, "-c", code], site, plugins="npu")
    assert one.stdout.strip() == "npu", one.stderr
    both = run([sys.executable, "-c", code], site)
    assert "more than one platform plugin claims this machine: " in both.stderr
    assert "llmserve-npu-platform" in both.stderr and "llmserve-xpu-platform" in both.stderr


SCALE_IGNORED = '''from llmserve.plugins import hookimpl
from llmserve_example_plugin.attention import ExampleAttentionBackend, attend


class ScaleIgnoringBackend(ExampleAttentionBackend):
    """A backend with a bug the conformance kit must catch: it always scales by 1/sqrt(head_dim)."""

    name = "SCALE_IGNORED_ATTN"
    attend = staticmethod(lambda q, keys, values, scale, window: attend(q, keys, values, q.shape[-1] ** -0.5, window))


@hookimpl
def llmserve_attention_backends():
    return {"SCALE_IGNORED_ATTN": f"{__name__}:ScaleIgnoringBackend"}
'''


def test_conformance_kit_passes_the_example_backend_and_catches_a_broken_one(example_site, tmp_path):
    passed = run([LLM_COMMAND, "plugins", "check", "EXAMPLE_ATTN"], example_site)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "EXAMPLE_ATTN on cpu:" in passed.stdout and " 0 failed, 6 refused" in passed.stdout
    assert re.search(r"sinks +refused: does not support attention sinks", passed.stdout)
    assert re.search(r"softcap=20.0 scale=0.3 +refused: does not support attention logit soft-capping", passed.stdout)
    assert re.search(r"block 16 kv_cache_dtype=float8_e4m3fn +refused: does not support kv_cache_dtype float8_e4m3fn: "
                     r"its kernels read a KV cache in the model's dtype only", passed.stdout)
    assert "engine   Qwen3ForCausalLM float32 eager" in passed.stdout
    broken_site = pip_install(tmp_path / "site", write_plugin(tmp_path / "broken", "llmserve-scale-ignored",
                                                              "scale_ignored", SCALE_IGNORED))
    broken = run([LLM_COMMAND, "plugins", "check", "SCALE_IGNORED_ATTN"], example_site, broken_site)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert re.search(r"block 16 window=21 +passed", broken.stdout)
    assert re.search(r"block 16 scale=0.3 +failed: AssertionError", broken.stdout)
    unknown = run([LLM_COMMAND, "plugins", "check", "NO_SUCH_ATTN"])
    assert unknown.returncode == 2 and "unknown attention backend 'NO_SUCH_ATTN'" in unknown.stderr


def test_every_builtin_backend_says_why_it_cannot_run_here():
    """On the CPU platform each GPU backend is refused with all its reasons, and selecting it says them."""
    backends = registry().of("attention_backend")
    reasons = {name: backends[name].load().why_unsupported(SPEC, "cpu") for name in
               ("TRITON_ATTN", "ROCM_ATTN", "FLASHINFER", "FLASH_ATTN", "TORCH_SDPA")}
    assert reasons["TORCH_SDPA"] == []
    assert reasons["TRITON_ATTN"][0] == "runs on cuda/rocm, not on the cpu platform"
    assert reasons["ROCM_ATTN"][0] == "runs on rocm, not on the cpu platform"
    assert reasons["FLASHINFER"][:2] == ["runs on cuda, not on the cpu platform",
                                         "does not support dtype torch.float32"]
    assert reasons["FLASH_ATTN"][:2] == reasons["FLASHINFER"][:2]
    assert reasons["FLASH_ATTN"][2].startswith("no FlashAttention implementation can run it: flash_attn (FlashAttention-2"
                                               "): not installed: pip install flash-attn --no-build-isolation | ")
    for name in ("TRITON_ATTN", "ROCM_ATTN", "FLASH_ATTN"):
        with pytest.raises(ValueError, match=f"attention backend {name} cannot run this model here: runs on "):
            select_attention_backend(name, SPEC, CpuPlatform)
