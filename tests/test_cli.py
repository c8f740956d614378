"""The `llm` command line: generate, chat and the offline benchmarks on a local engine; help and argument errors."""
import json
from pathlib import Path

from server_utils import run_cli

from llmserve import SamplingParams

SMOLLM2_CONFIG = Path(__file__).parent.parent / "benchmarks" / "models" / "SmolLM2-135M"


def test_help_lists_commands_and_defaults():
    top = run_cli("--help").stdout
    assert all(command in top for command in ("serve", "generate", "chat", "bench", "plugins"))
    serve = run_cli("serve", "--help").stdout
    for flag in ("--host", "127.0.0.1", "--port", "--api-key", "--served-model-name", "--attention-backend", "--dtype",
                 "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--load-format", "--seed", "--chat-template",
                 "--generation-config", "--log-level"):
        assert flag in serve, flag
    assert "--attention-backend" in run_cli("generate", "--help").stdout
    assert "--num-prompts" in run_cli("bench", "serve", "--help").stdout


def test_bad_engine_argument_is_a_clear_error():
    done = run_cli("generate", "Hi", "--dtype", "float8")
    assert done.returncode == 2 and "dtype" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("generate", "Hi", "--attention-backend", "NOPE")
    assert done.returncode == 2 and "NOPE" in done.stderr and "Traceback" not in done.stderr


def test_generate_streams_the_offline_greedy_text(llm):
    prompt = "The capital of France is"
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0].text
    done = run_cli("generate", prompt, "--max-tokens", "10", "--temperature", "0", "--dtype", "float32",
                   "--attention-backend", "TORCH_SDPA")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_chat_on_a_local_engine():
    done = run_cli("chat", "--temperature", "0", "--max-tokens", "16", "--dtype", "float32",
                   stdin="What is the capital of France?\n\n")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_bench_throughput_and_latency(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n" + json.dumps({"prompt": "Once upon a time"}) + "\n")
    result = tmp_path / "throughput.json"
    done = run_cli("bench", "throughput", "--dataset", str(prompts), "--num-prompts", "4", "--output-len", "3:6",
                   "--dtype", "float32", "--output-json", str(result))
    assert done.returncode == 0, done.stderr
    assert "Fraction of roofline" in done.stdout
    numbers = json.loads(result.read_text())
    assert numbers["num_requests"] == 4 and 12 <= numbers["output_tokens"] <= 24 and numbers["roofline_fraction"] > 0
    done = run_cli("bench", "latency", "--model", str(SMOLLM2_CONFIG), "--load-format", "dummy",
                   "--skip-tokenizer-init", "--dtype", "float32", "--batch-size", "2", "--input-len", "8",
                   "--output-len", "4", "--num-iters", "1", "--max-model-len", "256")
    assert done.returncode == 0, done.stderr
    assert "Time per output token (ms)" in done.stdout and "Weight-read floor (ms)" in done.stdout
    assert run_cli("bench", "throughput", "--input-len", "9:3").returncode == 2  # LO > HI
