"""Shared fixtures: a tiny random-weight Gemma 3 (no download, instant), the real embedded model
(loaded once per session, tests marked `model`), real servers on loopback, and the chromium that
browser tests drive."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from pyagent.engine import avx512
from pyagent.engine.generate import Engine
from pyagent.engine.model import load
from pyagent.engine.registry import resolve_model
from pyagent.engine.server import create_app

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Agents call tools, read files and run tests; the auditor reports.",
    "Paged attention keeps key and value blocks of sixteen tokens.",
] * 20


def build_tiny_model(directory: Path, layer_types: tuple[str, ...] = (
        "sliding_attention", "full_attention") * 2, context: int = 256) -> Path:
    """Save a 4-layer random-weight Gemma 3 text model and a byte-level BPE tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    config = Gemma3TextConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
        layer_types=list(layer_types), max_position_embeddings=context,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session", autouse=True)
def avx512_kernels() -> None:
    """Build the AVX-512 kernels into the user cache once, before a test points the cache
    elsewhere (where the CPU has them)."""
    avx512.kernels()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Engine:
    return Engine(load(resolve_model(str(tiny_model_dir))))


@pytest.fixture(scope="session")
def agent_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with room for agent transcripts and tool descriptions (8k positions)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-agent"), context=8192)


@pytest.fixture(scope="session")
def agent_engine(agent_model_dir: Path) -> Engine:
    return Engine(load(resolve_model(str(agent_model_dir))))


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The real embedded Gemma 3 270M in float32, the reference precision (prepared into the
    user cache on first use)."""
    return Engine.load(dtype="float32")


class LoopbackServer:
    """A uvicorn server in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_engine: Engine) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(tiny_engine)) as server:
        yield server


@pytest.fixture(scope="session")
def agent_server(agent_engine: Engine) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(agent_engine)) as server:
        yield server


@pytest.fixture(scope="session")
def model_server(engine: Engine) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(engine)) as server:
        yield server


class DictSource:
    """A MetricSource answering from `values` (by metric name) and recording every query."""

    def __init__(self, **values: float | None):
        self.values = values
        self.calls: list[tuple[str, str, dict[str, str] | None, float | None]] = []

    def query(self, name: str, stat: str, labels: Mapping[str, str] | None = None,
              window_s: float | None = None) -> float | None:
        self.calls.append((name, stat, None if labels is None else dict(labels), window_s))
        return self.values.get(name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty workspace folder for tools."""
    directory = tmp_path / "workspace"
    directory.mkdir()
    return directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the workspace holding a secret no tool may read."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_text("secret")
    return directory


# -- the browser for browser tests ------------------------------------------------------------

CHROMIUM = os.environ.get("PYAGENT_CHROMIUM", "/usr/bin/chromium")
BROWSER_MISSING = "BROWSER TESTS SKIPPED"


def chromium_executable() -> str:
    """The chromium that Playwright drives (Debian's, `PYAGENT_CHROMIUM` to use another).

    When it or Playwright is missing, the calling test is skipped, and the session ends with a
    banner saying how many browser tests did not run; with `CI=true` it fails instead, so a CI
    image without a browser cannot pass silently."""
    problem = None
    path = shutil.which(CHROMIUM)
    if path is None:
        problem = f"chromium is not installed at {CHROMIUM} (set PYAGENT_CHROMIUM to another)"
    elif importlib.util.find_spec("playwright") is None:
        problem = "the playwright package is not installed"
    if problem is None:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{problem}: browser tests cannot run, and CI=true requires them",
                    pytrace=False)
    pytest.skip(f"{BROWSER_MISSING}: {problem}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium executable for Playwright's `executable_path` (see chromium_executable)."""
    return chromium_executable()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if BROWSER_MISSING in str(getattr(report, "longrepr", ""))]
    if not skipped:
        return
    longrepr = skipped[0].longrepr
    message = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    reason = message.partition(f"{BROWSER_MISSING}: ")[2]
    terminalreporter.section(BROWSER_MISSING, sep="!", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} browser test(s) did NOT run: {reason}",
                                red=True, bold=True)
    terminalreporter.write_line("Install chromium (apt-get install chromium) to run them; "
                                "with CI=true they fail instead of being skipped.", red=True)


def pyagent(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The `pyagent` command run as a user runs it, in a new process."""
    return subprocess.run([sys.executable, "-m", "pyagent", *args], capture_output=True,
                          text=True, timeout=timeout)


def fails_with(result: subprocess.CompletedProcess, message: str) -> None:
    """The command failed with one clear line holding `message`, and no traceback."""
    assert result.returncode == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
