"""What code that the main thread may run must allow for: a signal handler
(KeyboardInterrupt, an alarm's exception) may raise at any bytecode in it.

The muxado modules keep the main thread away from work that the whole
session depends on (reading frames, finishing a frame half written) and
make each of its own steps commit by one store; see docs/DESIGN.md,
"Signals".
"""

import threading

MAIN_THREAD = threading.main_thread()
MAIN_IDENT = MAIN_THREAD.ident


def hold_again(lock):
    """Hold ``lock`` (an RLock) again after a Condition wait, whatever was raised in it.

    In the main thread a signal handler's exception can leave Condition.wait
    between releasing the lock and taking it back; the caller's ``with``
    must still find it held.
    """
    while not lock._is_owned():
        try:
            lock.acquire()
        except BaseException:   # another signal: the first exception goes on
            pass
