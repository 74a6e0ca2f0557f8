"""A pool of reusable threads for per-connection tasks (the relay's pumps).

Starting a thread is a round trip with the new thread (``Thread.start``
waits until it runs), which costs more than relaying a short connection;
handing a task to an idle thread is a single wake-up. Idle threads end
after ``idle_timeout`` seconds, so the thread count returns to where it
was once the load is gone. There is no upper bound: every connection still
gets its own thread while it lives.
"""

import itertools
import logging
import threading

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT = 2.0   # seconds an idle thread waits for a task before it ends


class _Worker(object):
    __slots__ = ("task", "wake")

    def __init__(self):
        self.task = None
        self.wake = threading.Lock()
        self.wake.acquire()   # released to hand this worker a task


class WorkerPool(object):
    """Runs each task on an idle thread, or on a new one if none is idle."""

    def __init__(self, name="worker", idle_timeout=DEFAULT_IDLE_TIMEOUT):
        self._name = name
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle = []
        self._threads = set()
        self._closed = False
        self._ids = itertools.count(1)

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on a thread of the pool. Raises RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if self._idle:
                worker = self._idle.pop()
                worker.task = (fn, args)
                worker.wake.release()
                return
            thread = threading.Thread(target=self._run, args=((fn, args),),
                                      name="%s-%d" % (self._name, next(self._ids)))
            thread.daemon = True
            self._threads.add(thread)
        thread.start()

    def close(self):
        """Let running tasks finish, then end every thread."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for worker in idle:
            worker.task = None
            worker.wake.release()
        for thread in threads:
            thread.join()

    @property
    def size(self):
        with self._lock:
            return len(self._threads)

    def _run(self, task):
        worker = _Worker()
        me = threading.current_thread()
        name = me.name
        try:
            while task is not None:
                fn, args = task
                try:
                    fn(*args)
                except Exception:
                    log.exception("%s: task %r failed", name, fn)
                me.name = name
                task = None
                with self._lock:
                    if self._closed:
                        return
                    self._idle.append(worker)
                if worker.wake.acquire(True, self._idle_timeout):
                    task, worker.task = worker.task, None
                    continue
                with self._lock:
                    if worker in self._idle:
                        self._idle.remove(worker)
                        return   # idle too long
                # A task was handed over just as we timed out: take it.
                worker.wake.acquire()
                task, worker.task = worker.task, None
        finally:
            with self._lock:
                self._threads.discard(me)
