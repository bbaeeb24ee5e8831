"""`GaugeSampler`: a running process's gauges, written into its data folder's trace store so an
observer in another process can chart them (the engine's KV bytes and scheduler queue).

A background thread reads the gauges every `interval_s` and writes them when they changed, and at
least every `heartbeat_s` so observers know the process is alive; on `stop` it writes zeros, as
the process then holds nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

from pyagent.observe.traces import TraceStore

Reading = Iterable[tuple[str, dict[str, str], float]]

log = logging.getLogger(__name__)


class GaugeSampler:
    """Samples `read()` into `store` under this process's source name (host:pid)."""

    def __init__(self, store: TraceStore, read: Callable[[], Reading], interval_s: float = 0.5,
                 heartbeat_s: float = 5.0, keep_s: float = 6 * 3600):
        self.store = store
        self.read = read
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.keep_s = keep_s
        self.source = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._last: list[tuple[str, dict[str, str], float]] | None = None
        self._written = 0.0
        self._thread = threading.Thread(target=self._run, name="pyagent-gauges", daemon=True)

    def start(self) -> GaugeSampler:
        self._thread.start()
        return self

    def sample(self, force: bool = False) -> None:
        """Read the gauges and write them if they changed (or `force`, or the heartbeat is due)."""
        values = [(name, dict(labels), float(value)) for name, labels, value in self.read()]
        now = time.time()
        if force or values != self._last or now - self._written >= self.heartbeat_s:
            self.store.record_samples(self.source, now, values, keep_s=self.keep_s)
            self._last, self._written = values, now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a failed sample must not end the run; the next one retries
                log.exception("sampling gauges into %s failed", self.store.path)

    def stop(self) -> None:
        """Stop sampling and write zeros for every gauge; calling it again is harmless."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._last:
            self.store.record_samples(self.source, time.time(),
                                      [(name, labels, 0.0) for name, labels, _ in self._last])
