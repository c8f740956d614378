"""Running `llm` commands and `llm serve` as real subprocesses (on a free loopback port), and reading /metrics."""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmserve.cli.bench import wait_for_server

SERVER_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20), "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None, scheme: str = "http", verify: bool | str = True) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        command = [sys.executable, "-m", "llmserve.cli", "serve", "--port", str(self.port), *SERVER_ARGS, *args]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}))
        self.wait_ready(verify=verify)

    def wait_ready(self, timeout: float = 120, verify: bool | str = True) -> None:
        try:
            wait_for_server(f"{self.url}/health", timeout, self.process, verify=verify)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}:\n{self.output()}") from None

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8") as f:
            return f.read()

    def children(self, parent: int | None = None) -> list[int]:
        """Pids of the processes `parent` (default: the server) started."""
        parent = self.process.pid if parent is None else parent
        return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and os.path.exists(f"/proc/{pid}/stat")
                and open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[-1].split()[1] == str(parent)]

    def engine_process(self) -> int:
        """The pid of the server's engine process (the child that runs llmserve's engine loop)."""
        found = [pid for pid in self.children() if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(found) == 1, found
        return found[0]

    def health_until_exit(self, seconds: float) -> list[int]:
        """/health's status codes, polled until the server exits (or `seconds` pass)."""
        statuses, deadline = [], time.monotonic() + seconds
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(f"{self.url}/health", timeout=5).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return statuses

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`llm ARGS...` run to completion (wide help output, so Typer does not cut option names)."""
    return subprocess.run([sys.executable, "-m", "llmserve.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"COLUMNS": "250"})


def metric(url: str, name: str) -> float:
    """One sample of the server's Prometheus metrics (summed over labels)."""
    text = httpx.get(f"{url}/metrics").text
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert values, f"{name} not in /metrics"
    return sum(float(v) for v in values)
