"""Ctrl-C as a KeyboardInterrupt in the main thread for the whole run, MindSpore or not.

MindSpore's C++ runtime installs its own SIGINT handler once graphs run; it ends the process with
status 143 and no message, and putting Python's handler back after MindSpore's set-up does not
stick. So SIGINT is blocked in every thread instead (threads inherit the mask of the thread that
starts them, so this must run before any import starts one: numpy's BLAS starts its pool at import),
and one watcher thread takes each SIGINT with `sigwait` and raises KeyboardInterrupt in the main
thread, which closes the engine (and its prefetch thread) on its way out. The raise is an
asynchronous exception (`PyThreadState_SetAsyncExc`): `_thread.interrupt_main` from another thread
did not wake CPython 3.11's main thread here. It lands at the main thread's next bytecode, so after
the graph launch in progress returns. Imports nothing heavy, for that reason.
"""
from __future__ import annotations

import ctypes
import signal
import threading


def take() -> None:
    """Route every later SIGINT to `KeyboardInterrupt` in the main thread; call first thing."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    main = ctypes.c_ulong(threading.main_thread().ident)

    def watch() -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            ctypes.pythonapi.PyThreadState_SetAsyncExc(main, ctypes.py_object(KeyboardInterrupt))

    threading.Thread(target=watch, name="ferry-sigint", daemon=True).start()
