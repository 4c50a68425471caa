"""The driver's progress line: written rows counted, one log line every few seconds."""

from __future__ import annotations

import logging
import threading
import time
from typing import Self

logger = logging.getLogger(__name__)


class Progress:
    """Counts written rows; a daemon thread logs one progress line every ``interval`` seconds."""

    def __init__(self, total: int | None, interval: float):
        self.total = total
        self.interval = interval
        self.rows = self.ok = self.error = self.shards = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipdiy-progress", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add(self, record: dict) -> None:
        self.rows += record["rows"]
        self.ok += record["ok"]
        self.error += record["error"]
        self.shards += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            elapsed = time.monotonic() - self.started
            logger.info(
                "progress: %d/%s images written (%d ok, %d errors) in %d shards, %.2f images/s",
                self.rows, "?" if self.total is None else self.total, self.ok, self.error, self.shards, self.rows / max(elapsed, 1e-9),
            )
