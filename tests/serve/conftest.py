"""Fixtures for the serve tests: a tiny random Llama with a tiny BPE tokenizer saved to disk, and real server
processes (``python -m megacontext.cli serve``) on free ports, driven over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_llama

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
CORPUS = ("User: hello, how are you today?\nAssistant: I am fine, thank you.\nSystem: be brief.\n"
          "The ship sailed north past the harbour. Locker code 4711. Tool: result 42.\n") * 20


def build_tiny_model(path: Path, chat_template: str | None = None) -> Path:
    """A 2-layer, 32-wide random Llama with a byte-level BPE tokenizer of ~300 tokens, saved like a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    tiny_llama(vocab=len(fast)).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-base")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``megacontext serve`` subprocess; ``client()`` gives an httpx client carrying the token."""

    def __init__(self, data_root: Path, model: Path, *extra: str, token: str | None = TOKEN):
        self.data_root = data_root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_root.parent / f"server-{self.port}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.env.pop("MEGACONTEXT_TOKEN", None)
        if token:
            self.env["MEGACONTEXT_TOKEN"] = token
        self.token = token
        self.cmd = [sys.executable, "-m", "megacontext.cli", "serve", "--data-root", str(data_root), "--port",
                    str(self.port), "--models", str(model), "--device", "cpu", "--engine.wc.w-max", "160",
                    "--engine.wc.recent-raw", "64", *extra]
        self.start()

    def start(self) -> None:
        """(Re)start the process: same data root, port and flags."""
        out = self.log.open("a")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self, timeout: float = 60.0) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def client(self, token: str | None = "default", **kw):
        import httpx

        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers={**headers, **kw.pop("headers", {})}, timeout=60, **kw)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode
