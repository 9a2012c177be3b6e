"""Fault injection for the fault-tolerance tests: kill the process at a named point of a training run.

``NORMSOFTMAX_FAILPOINT=name`` (or ``name:N``, the N-th time; ``name:N:SIGTERM`` for another signal) makes
:func:`failpoint` send SIGKILL to this process when the run reaches that point -- no cleanup, no handler,
as a crash or an out-of-memory kill (or the given signal, as a scheduler's pre-emption).
Points: ``step`` (after an optimizer step), ``checkpoint`` (a checkpoint fully written to its temporary
file, not yet renamed), ``evaluation`` (embeddings computed, metrics not yet written). Unset, it costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAILPOINT_ENV = "NORMSOFTMAX_FAILPOINT"
_reached: dict[str, int] = {}


def failpoint(name: str) -> None:
    wanted = os.environ.get(FAILPOINT_ENV)
    if not wanted:
        return
    point, _, rest = wanted.partition(":")
    if point != name:
        return
    times, _, signal_name = rest.partition(":")
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(times or 1):
        os.kill(os.getpid(), getattr(signal, signal_name or "SIGKILL"))
