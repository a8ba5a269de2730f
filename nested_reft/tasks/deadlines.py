"""Wall-clock deadlines for a call, in the main thread and in worker threads alike.

`run_with_deadline(fn, timeout_s)` runs `fn` and raises :class:`DeadlineExceeded` once `timeout_s` has
passed. The reward uses it to bound a symbolic answer check (`rewards.is_equivalent`): model output
can make sympy run for hours, and a reward must neither hang training nor depend on which thread
computes it. Library timeouts built on ``signal.alarm`` raise when called off the main thread, so:

- main thread (POSIX, no SIGALRM timer already armed by someone else): ``setitimer`` fires at the
  deadline, and every 50 ms after it until the call returns, with a handler that raises
  :class:`DeadlineExceeded` (repeated because library code may swallow one). CPython checks signals
  inside long integer ``pow``, so this also interrupts huge powers computed in C.
- any other thread: the call runs in a daemon helper thread; the caller waits ``timeout_s`` and, if
  the helper is still busy, injects :class:`DeadlineExceeded` into it (``PyThreadState_SetAsyncExc``,
  repeated on later calls while it lives) and raises at once. An async exception is only delivered
  between bytecodes, so a single long C call cannot be stopped this way (and it holds the GIL
  meanwhile): callers bound such work before they start it (as `rewards` does for huge numbers).
  Past :data:`_MAX_ABANDONED_THREADS` helpers still alive, calls are refused outright.

Importing this module changes nothing (no signal handler, no thread); a handler is set only for the
length of a main-thread call and restored after it.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_ABANDONED_THREADS = 4
"""Circuit breaker: if this many timed-out helper threads are still alive, refuse further calls (each
raises DeadlineExceeded at once) rather than pile up more threads burning CPU."""


class DeadlineExceeded(BaseException):
    """Raised when a call runs past its deadline.

    A ``BaseException`` on purpose: sympy and math_verify wrap much of their work in ``except Exception``,
    which would otherwise swallow the timeout and let the next (unguarded) step run on.
    """


_ALARM_REPEAT_S = 0.05
"""After the deadline the alarm keeps firing at this interval until the check returns: a timeout
exception can be swallowed (``except BaseException`` somewhere, or an "Exception ignored in" weakref
callback / ``__del__`` that happened to be running), and a one-shot alarm would then never fire again."""


class _AlarmState:
    """Whether a SIGALRM deadline of ours is live; ticks arriving after it is cleared do nothing."""

    active = False


def _on_alarm(signum: int, frame: object) -> None:
    """SIGALRM handler: abort the running check (but only while one is running)."""
    if _AlarmState.active:
        raise DeadlineExceeded()


def _unraisable_hook_during(previous: Callable[[object], None]) -> Callable[[object], None]:
    """The `sys.unraisablehook` of a deadline's window: a DeadlineExceeded that landed in a finalizer
    (``__del__``, a weakref callback) is the expected cost of interrupting and is not reported; anything else
    goes to the previous hook with our ticks held off, so that no tick interrupts that hook itself (pytest's
    records unraisable exceptions and fails the test when its own recording is interrupted)."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, DeadlineExceeded):
            return
        was_active, _AlarmState.active = _AlarmState.active, False
        try:
            previous(unraisable)
        finally:
            _AlarmState.active = was_active

    return hook


def _alarm_available() -> bool:
    """Whether a SIGALRM timer may be used: main thread, POSIX, and nobody else's timer is armed."""
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and not _AlarmState.active  # not re-entrant
        and signal.getsignal(signal.SIGALRM) is not None  # a C-level handler we could not restore
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # e.g. pytest-timeout's own alarm
    )


def _run_with_alarm(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` in this (main) thread; from the deadline on, SIGALRM raises :class:`DeadlineExceeded`.

    Clearing ``_AlarmState.active`` is the first statement of the ``finally``: a single attribute store
    with no point where a signal handler can run before it, so no tick can escape this function.
    """
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    previous_unraisable_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook_during(previous_unraisable_hook)
    try:
        _AlarmState.active = True
        signal.setitimer(signal.ITIMER_REAL, timeout_s, _ALARM_REPEAT_S)
        return fn()
    finally:
        _AlarmState.active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.unraisablehook = previous_unraisable_hook


def _interrupt_thread(thread: threading.Thread) -> None:
    """Ask ``thread`` to raise :class:`DeadlineExceeded` at its next bytecode (best effort)."""
    try:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(DeadlineExceeded))
    except Exception:  # no ctypes.pythonapi (non-CPython): the daemon thread just runs to completion
        logger.debug("could not interrupt a timed-out check thread", exc_info=True)


class _HelperThreadCheck:
    """One check running in a daemon helper thread, interruptible only while the check itself runs.

    The ``finished`` flag, set and read under a lock, keeps a late interrupt from landing in unrelated
    code after the check has ended.
    """

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._finished = False
        self.value: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._target, name="deadline-check", daemon=True)

    def _target(self) -> None:
        try:
            try:
                self.value = self._fn()
            except BaseException as error:  # noqa: BLE001 - handed back to the waiting caller
                self.error = error
            finally:
                with self._lock:
                    self._finished = True
        except DeadlineExceeded:
            pass  # the interrupt landed just as the check ended: nothing is left to stop

    def interrupt(self) -> bool:
        """Stop the check if it is still running; returns whether it was."""
        with self._lock:
            if not self._finished:
                _interrupt_thread(self.thread)
            return not self._finished


_abandoned_checks: list[_HelperThreadCheck] = []
_abandoned_lock = threading.Lock()


def _too_many_abandoned() -> bool:
    """Re-interrupt timed-out checks still running (an interrupt can be swallowed), drop finished ones,
    and say whether too many are still alive to start another."""
    with _abandoned_lock:
        _abandoned_checks[:] = [check for check in _abandoned_checks if check.thread.is_alive()]
        for check in _abandoned_checks:
            check.interrupt()
        return len(_abandoned_checks) >= _MAX_ABANDONED_THREADS


def _run_in_helper_thread(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` in a daemon thread, wait ``timeout_s``, and give up (interrupting it) past that."""
    if _too_many_abandoned():
        raise DeadlineExceeded()
    check = _HelperThreadCheck(fn)
    check.thread.start()
    check.thread.join(timeout_s)
    if check.thread.is_alive() and check.interrupt():
        with _abandoned_lock:
            _abandoned_checks.append(check)
        raise DeadlineExceeded()
    if check.error is not None:
        raise check.error
    return check.value  # type: ignore[return-value]


def run_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` with a wall-clock limit; raises :class:`DeadlineExceeded` when it is exceeded.

    ``timeout_s`` is clamped to at least 1 ms: ``setitimer(0)`` would mean "no limit at all".
    """
    timeout_s = max(float(timeout_s), 1e-3)
    if _alarm_available():
        return _run_with_alarm(fn, timeout_s)
    return _run_in_helper_thread(fn, timeout_s)
