"""SIGTERM and SIGINT stop a run with an error that says so, never with a silent exit status 0.

Lightning turns SIGTERM into ``SIGTERMException``, a ``SystemExit`` with no code, so a run preempted by
SLURM, ``timeout`` or ``docker stop`` used to look like a success; SIGINT became Lightning's own
``sys.exit(1)`` without a word. Inside :func:`stop_on_signals` both signals raise
:class:`~exprae.errors.RunInterrupted` where the main thread is, so the usual unwinding runs (atomic writes
remove their temporary files, the run-directory lock is released) and the entry point reports what was
kept. Lightning composes an already installed SIGTERM handler into its own, so this one still fires
during ``trainer.fit``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from exprae.errors import RunInterrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(describe: Callable[[str], str]) -> Iterator[None]:
    """Raise :class:`RunInterrupted` on SIGTERM/SIGINT inside the block; ``describe(name)`` writes its message.

    Only the first signal raises (a second one while the first unwinds is ignored, so clean-up finishes);
    SIGKILL cannot be caught and is what stops a stuck process. Outside the main thread this is a no-op,
    because Python delivers signals to the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        name = signal.Signals(signum).name
        raise RunInterrupted(describe(name), signum=signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
