"""The background thread that runs a cycle every POLLING_INTERVAL seconds, or at once when triggered or woken.

Every process polls, and one cycle runs per interval for all of them: a scheduled cycle runs only if no cycle
started, anywhere, within the interval, and a woken one only if none started since the wake-up (the cycle
lease keeps the time, see lease.py). A manual trigger always gets a cycle.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from domain import CycleResult
    from listener import Listener

log = logging.getLogger(__name__)

# How long stop() waits for the current batch; gunicorn's graceful_timeout must be longer.
STOP_TIMEOUT = 10.0
# The least time between the end of one cycle and the start of the next when woken early: a stream of
# notifications then costs at most one cycle (or skipped turn) per worker every 50 ms, not one per commit.
WAKE_MIN_GAP = 0.05


class Progress:
    """What a cycle and its poller share: when the cycle last made progress, and whether it should stop.

    Liveness reads the first to tell a slow cycle from a stuck one; the cycle reads the second between batches.
    """

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.paused = False  # the running cycle found applying paused by an operator (consistency.pause)
        self._busy = False
        self._last = time.monotonic()

    def halted(self) -> bool:
        """Tell whether the running cycle should apply no more: the poller is stopping, or applying is paused."""
        return self.stopping.is_set() or self.paused

    def beat(self) -> None:
        """Note progress: a cycle started, or finished a batch."""
        self._last = time.monotonic()

    def set_busy(self, busy: bool) -> None:
        """Note that a cycle started (True) or ended (False)."""
        self._busy = busy
        self.beat()

    def stalled_for(self) -> float:
        """Return the seconds a running cycle has gone without progress; 0 between cycles."""
        return time.monotonic() - self._last if self._busy else 0.0


class Poller:
    """Runs `cycle(lock_wait, progress, fresh_for)` in a daemon thread; stop(), trigger() and the wake event wake it.

    The cycle owns its unexpected errors: it returns a result whatever happens.
    """

    def __init__(
        self,
        cycle: Callable[[float, Progress, float], CycleResult],
        interval: float,
        trigger_wait: float,
        wake: threading.Event,
        listener: Listener | None = None,
    ) -> None:
        self._cycle = cycle
        self._interval = interval
        self._trigger_wait = trigger_wait
        self._wake = wake  # set by wake() and by the listener, on a notification
        self.listener = listener
        self.progress = Progress()
        self._done = threading.Condition()
        self._requested = 0
        self._served = 0
        self._thread: threading.Thread | None = None
        self.last_result: CycleResult | None = None

    def start(self) -> None:
        """Start the thread, and the listener if there is one; the first cycle runs at once."""
        if self.is_alive():
            return
        self.progress.stopping.clear()
        if self.listener is not None:
            self.listener.start()
        self._thread = threading.Thread(target=self._loop, name="consistency-poller", daemon=True)
        self._thread.start()
        # A daemon thread runs on while the interpreter shuts down, until it is frozen wherever it is: a process
        # that exits without stop() would leave its cycle running through the teardown, the lease not given back.
        atexit.register(self.stop)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask the thread to stop after its current batch and wait for it; safe from any thread, any time."""
        atexit.unregister(self.stop)
        self.progress.stopping.set()
        self._wake.set()
        if self.listener is not None:
            self.listener.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """Tell whether the poller thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def run_once(self, lock_wait: float = 0.0, fresh_for: float = 0.0) -> CycleResult:
        """Run one cycle in the calling thread, unless one started within fresh_for seconds; remember its result."""
        self.progress.set_busy(True)
        try:
            result = self._cycle(lock_wait, self.progress, fresh_for)
        finally:
            self.progress.set_busy(False)
        self.last_result = result
        return result

    def wake(self) -> None:
        """Have the next cycle start now, or right after the running one; many calls before it make one cycle."""
        self._wake.set()

    def trigger(self) -> CycleResult | None:
        """Run a cycle now and return its result, or None if it is still running after the wait."""
        if not self.is_alive():
            return self.run_once(self._trigger_wait)
        with self._done:
            self._requested += 1
            ticket = self._requested
        self._wake.set()
        with self._done:
            # The cycle itself waits up to trigger_wait for its turn; allow a moment to report back.
            if self._done.wait_for(lambda: self._served >= ticket, self._trigger_wait + 1.0):
                return self.last_result
        return None

    def _loop(self) -> None:
        """Run cycles until stopped, waiting the polling interval between them."""
        log.info("poller started: a cycle every %gs", self._interval)
        fresh_for = self._interval  # at start too: another process may have run one a moment ago
        while not self.progress.stopping.is_set():
            with self._done:
                ticket = self._requested
            if ticket > self._served:  # a manual trigger waits for its turn, and runs however recent the last
                self.run_once(self._trigger_wait)
            else:
                self.run_once(0.0, fresh_for)
            with self._done:
                self._served = ticket
                self._done.notify_all()
            fresh_for = self._wait_for_next()
        log.info("poller stopped")

    def _wait_for_next(self) -> float:
        """Wait for the interval or a wake-up; return how recent a cycle started elsewhere may be to serve it."""
        ended = time.monotonic()
        fresh_for = self._interval
        if self._wake.wait(self._interval):
            woken = time.monotonic()  # at or after the wake-up: a cycle that started before it missed it
            self.progress.stopping.wait(max(0.0, WAKE_MIN_GAP - (woken - ended)))
            fresh_for = time.monotonic() - woken
        # A wake-up before this point is served by the cycle about to start, one after it by the next.
        self._wake.clear()
        return fresh_for
