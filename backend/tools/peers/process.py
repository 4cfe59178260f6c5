"""A peer worker (llama_worker.py, vllm_worker.py) as a child process of the benchmark: started with the peer
environment's own Python, spoken to over the line protocol of wire.py. Its other output goes to a log file."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from backend.tools.peers.wire import parse_reply

PEERS_DIR = Path(__file__).resolve().parent


class PeerError(RuntimeError):
    """A peer worker that did not start, died, timed out or answered with an error."""


class PeerProcess:
    """One running worker. `start()` waits for its ready reply (the model loaded and warmed up)."""

    def __init__(
        self, python: Path, script: str, settings: dict, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.python = python
        self.env = env or {}
        self.script = PEERS_DIR / script
        self.settings = settings
        self.log_path = log_path
        self.ready: dict = {}
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue = queue.Queue()

    def start(self, timeout_s: float) -> dict:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self._proc = subprocess.Popen(
            [str(self.python), str(self.script), json.dumps(self.settings)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=PEERS_DIR,
            env={**os.environ, **self.env},
        )
        threading.Thread(target=self._read, args=(self._proc.stdout, log), daemon=True).start()
        self.ready = self._wait(timeout_s, "start")
        return self.ready

    def request(self, payload: dict, timeout_s: float) -> dict:
        if self._proc is None or self._proc.poll() is not None or self._proc.stdin is None:
            raise PeerError(f"{self.script.name} is not running{self._log_hint()}")
        self._proc.stdin.write(json.dumps(payload) + "\n")
        self._proc.stdin.flush()
        return self._wait(timeout_s, payload.get("op", "?"))

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.poll() is None and self._proc.stdin is not None:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.flush()
            self._proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _read(self, stdout: IO[str], log: IO[str]) -> None:
        for line in stdout:
            payload = parse_reply(line)
            if payload is not None:
                self._replies.put(payload)
            else:
                log.write(line)
                log.flush()
        log.close()
        self._replies.put(None)  # end of output: the worker exited

    def _wait(self, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                payload = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close_hard()
                raise PeerError(f"{self.script.name}: no answer to {what} within {timeout_s:.0f} s{self._log_hint()}")
            if payload is None:
                raise PeerError(f"{self.script.name} exited during {what}{self._log_hint()}")
            if "error" in payload:
                raise PeerError(f"{self.script.name}: {what} failed: {payload['error']}")
            return payload

    def close_hard(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _log_hint(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln]  # the exception's line, not its footnotes
        last = (errors or lines or ["no output"])[-1].strip()[:300]
        return f" ({self.log_path}: {last})"
