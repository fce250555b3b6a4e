"""The threads that read and decode request media, kept apart from everything else the server does.

Reading an image or video can block for as long as its source wants (a slow remote server, a pipe, a large
decode). In their own bounded pool such reads can only occupy that pool: text-only requests never wait for it,
a full pool answers 503 at once instead of queueing without bound, and each request's media have one wall-clock
deadline. A read that overruns its deadline keeps its thread until it returns (Python cannot interrupt it), and
keeps counting against the pool's capacity until then, so a source that never answers cannot grow the process.
The threads are daemons: such a read must not keep the stopped server from exiting (a `ThreadPoolExecutor`
joins its threads at interpreter exit).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Callable, TypeVar

from launch.serving.messages import APIError

T = TypeVar("T")


class MediaPool:
    def __init__(self, workers: int, queue_limit: int, deadline: float):
        self.capacity, self.deadline = workers + queue_limit, deadline
        self._tasks: queue.Queue = queue.Queue()
        for i in range(workers):
            threading.Thread(target=self._work, name=f"qwen2vl-ap-media-{i}", daemon=True).start()
        self.busy = 0  # tasks submitted and not finished (running or queued); written on the event loop only

    def _work(self) -> None:
        while True:
            task, fn, args = self._tasks.get()
            if task.set_running_or_notify_cancel():  # False: its request gave up while it was queued
                try:
                    task.set_result(fn(*args))
                except BaseException as e:  # handed to the request, which raises it
                    task.set_exception(e)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on a media thread; 503 when the pool is full, 504 past the deadline."""
        if self.busy >= self.capacity:
            raise APIError(503, f"the server is busy preparing other requests' images and videos ({self.busy} "
                                "waiting); retry later", None, "server_busy")
        loop = asyncio.get_running_loop()
        self.busy += 1
        task: concurrent.futures.Future = concurrent.futures.Future()
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(self._finished))
        self._tasks.put((task, fn, args))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(task), self.deadline)
        except asyncio.TimeoutError:
            raise APIError(504, f"messages: reading the images and videos took longer than the server's limit of "
                                f"{self.deadline:g} s", "messages", "timeout_error") from None

    def _finished(self) -> None:
        self.busy -= 1
