"""How the sandboxed user process ends: Python's exit semantics, without interpreter teardown.

A normal interpreter exit (``Py_FinalizeEx``) clears and frees every module and object. In a
fork of the zygote nearly all of them live on pages shared with the zygote, so the teardown
writes to each of those pages and the kernel copies them one by one: most of a short task's
CPU went there (issue 8). The sandbox is about to vanish with its PID namespace, so nothing
needs freeing; :func:`call_and_exit` keeps what a program can observe of an exit and skips the
rest:

* the return value or ``SystemExit`` code maps to the exit status as in CPython: ``None`` → 0,
  an int → that int, anything else is printed to ``stderr`` and gives 1; an uncaught exception
  prints its traceback through ``sys.excepthook`` and gives 1 (``KeyboardInterrupt``: the
  process then re-raises ``SIGINT`` on itself, which a PID 1 ignores, and gives 130);
* then, in CPython's order: non-daemon threads are joined (``threading._shutdown``), ``atexit``
  handlers run, buffered files still open are flushed, ``stdout``/``stderr`` are flushed (a
  failed flush makes the status 120, as in CPython);
* then ``os._exit``.

What is skipped: ``__del__`` methods and weakref callbacks of objects still alive at exit
(CPython does not promise to run them either), and the teardown itself.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

_FLUSH_FAILED = 120  # CPython's status when flushing stdout/stderr at exit fails


def call_and_exit(func: Callable[[], object]) -> NoReturn:
    """Run ``func``, then end the process the way ``sys.exit(func())`` would. Never returns."""
    interrupted = False
    try:
        result = func()
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:  # the interpreter's own top level does this
        _print_uncaught()
        interrupted = isinstance(exc, KeyboardInterrupt)
        status = 130 if interrupted else 1
    else:
        status = exit_status(result)
    finish(status, sigint=interrupted)


def exit_status(code: object) -> int:
    """The process status for ``sys.exit(code)``; prints a non-int ``code`` like CPython."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        stream = sys.stderr
        if stream is not None:
            stream.write(f"{code}\n")
        else:
            os.write(2, f"{code}\n".encode(errors="replace"))
    return 1


def finish(status: int, *, sigint: bool = False) -> NoReturn:
    """Join non-daemon threads, run ``atexit``, flush, and ``os._exit(status)``.

    ``sigint``: end by ``SIGINT`` first, as CPython does after an uncaught ``KeyboardInterrupt``.
    """
    threading = sys.modules.get("threading")
    if threading is not None:
        _guarded(threading._shutdown)
    atexit = sys.modules.get("atexit")
    if atexit is not None:
        _guarded(atexit._run_exitfuncs)
    _guarded(_flush_open_files)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except Exception:  # reported as CPython does, then status 120
            _guarded(_print_uncaught)
            status = _FLUSH_FAILED
    if sigint:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def _flush_open_files() -> None:
    """Flush writable file objects still open: teardown would have closed them.

    Only objects created since the zygote's ``gc.freeze()`` are visited (frozen ones are not
    in any generation), so this looks at the task's own objects, not the preloaded modules'.
    """
    for obj in gc.get_objects():
        if isinstance(obj, io.BufferedWriter | io.BufferedRandom | io.TextIOWrapper):
            if obj is sys.stdout or obj is sys.stderr:
                continue
            with contextlib.suppress(Exception):
                if not obj.closed and obj.writable():
                    obj.flush()


def _guarded(step: Callable[[], object]) -> None:
    """Run one exit step; an exception in it is reported and does not stop the others."""
    try:
        step()
    except BaseException:  # e.g. SystemExit from the SIGTERM handler
        with contextlib.suppress(BaseException):
            _print_uncaught()


def _print_uncaught() -> None:
    exc_type, exc, tb = sys.exc_info()
    if exc_type is None or exc is None:
        return
    try:
        sys.excepthook(exc_type, exc, tb)
    except BaseException:  # a broken excepthook must not stop the exit
        with contextlib.suppress(BaseException):
            os.write(2, "".join(traceback.format_exception(exc)).encode(errors="replace"))
