"""SIGTERM at any moment of a run: stop with everything needed to resume, and say so with exit code 75.

One :class:`PreemptionGuard` covers a whole run (``main.run``) and every training job inside it. Where there is state
to save (a training job, and the writing of results) the signal is *deferred*: it sets a flag that the loop reads
after each step and epoch, saves, and raises :class:`Preempted`. Everywhere else (start-up, loading data or a teacher,
between jobs, the final evaluation) nothing is lost by stopping at once, so the handler raises :class:`Preempted`
immediately and the re-run redoes only the unfinished part (finished jobs are reused from their checkpoints).

With several processes the signal is JAX's business: its preemption notifier (started by ``jax.distributed``)
catches SIGTERM in any one process, and :meth:`PreemptionGuard.should_stop` asks the coordination service whether
every process has reached the agreed sync point, so all of them stop at the same call. Every process makes the same
sequence of calls (same steps, same stages); the guard counts them, so the counter only grows, across jobs too.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import jax

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: state saved, run the same command again to resume

logger = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """Raised after SIGTERM, once whatever was in progress has been saved (or needed no saving)."""


class PreemptionGuard:
    """Turns SIGTERM into :class:`Preempted`: at once outside :meth:`deferred` blocks, at the next check inside."""

    def __init__(self):
        self.requested = False
        self._synchronized = jax.process_count() > 1
        self._deferred_depth = 0
        self._calls = 0
        self._previous = None

    def install(self) -> None:
        """Installs the handler (one process, main thread only: Python delivers signals there)."""
        if not self._synchronized and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        if self._deferred_depth == 0:
            raise Preempted("preempted (SIGTERM) with nothing in progress that needed saving")
        logger.warning("SIGTERM received: finishing the current step, saving a checkpoint and stopping")

    @contextlib.contextmanager
    def deferred(self):
        """A block whose state must be saved before stopping: SIGTERM only sets the flag read by :meth:`should_stop`."""
        self._deferred_depth += 1
        try:
            yield self
        finally:
            self._deferred_depth -= 1

    def should_stop(self) -> bool:
        """Whether to save and stop now; every process calls it at the same points (after each step, ...)."""
        self._calls += 1
        if self._synchronized:
            from jax.experimental import multihost_utils

            # Sticky: the stop may be carried to a later check (the end of the epoch), and the sync point is reached once.
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(self._calls)
        return self.requested

    def stop_if_requested(self, where: str) -> None:
        """Raises :class:`Preempted` ("preempted <where>") when a stop was requested; a check between phases."""
        if self.should_stop():
            raise Preempted(f"preempted {where}")


_active: PreemptionGuard | None = None


@contextlib.contextmanager
def guard():
    """The run's guard: installs one on first use, and nested uses (a job inside a run) share it."""
    global _active
    if _active is not None:
        yield _active
        return
    _active = PreemptionGuard()
    _active.install()
    try:
        yield _active
    finally:
        _active.uninstall()
        _active = None
