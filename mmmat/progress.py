"""Progress of long steps (evaluation stages, embedding), reported to whoever listens.

The command line shows a bar with the time left.

Library code calls :func:`report` (``task``, items done, items in all) and :func:`note` (a line for the user);
both do nothing unless a listener was installed with :func:`listening`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_listener: Callable[[str, int, int], None] | None = None
_noter: Callable[[str], None] | None = None


def report(task: str, done: int, total: int) -> None:
    """Say that ``done`` of ``total`` items of ``task`` are finished."""
    if _listener is not None:
        _listener(task, int(done), int(total))


def note(message: str) -> None:
    """Tell the user something about the work ahead (what a stage will cost)."""
    if _noter is not None:
        _noter(message)


@contextmanager
def listening(on_progress: Callable[[str, int, int], None] | None,
              on_note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Install listeners for the duration of a ``with`` block."""
    global _listener, _noter
    old = (_listener, _noter)
    _listener, _noter = on_progress, on_note
    try:
        yield
    finally:
        _listener, _noter = old
