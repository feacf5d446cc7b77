"""One model, many clients: requests' images are queued and run through the model together in batches.

The queue is bounded: when it is full the server answers 503 instead of growing."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

API_KEY_HEADER = "X-API-Key"


class QueueFull(Exception):
    """More images are waiting for the model than the server holds."""


class Batcher:
    """Runs model inputs from any number of requests through the model in shared batches.

    ``submit`` queues a request's items and waits for their probabilities; one task
    takes up to ``max_batch`` queued items (waiting at most ``max_wait_s`` for more
    once one has arrived) and runs them on the model's single thread. The queue holds
    at most ``max_queue`` items: a request that would overflow it is refused whole.
    """

    def __init__(self, predictor, max_batch: int = 32, max_queue: int = 512, max_wait_s: float = 0.005):
        self.predictor, self.max_batch, self.max_queue, self.max_wait_s = predictor, max_batch, max_queue, max_wait_s
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")  # one batch at a time on the model
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # how many model calls, and how many images they held (for /healthz and the bench)
        self.images = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def submit(self, items: list) -> list[float]:
        if self.waiting + len(items) > self.max_queue:
            raise QueueFull(f"{self.waiting} images are waiting for the model (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures):
            self._queue.put_nowait((item, fut))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(x, f) for x, f in batch if not f.done()]  # a client that went away cancels its futures
            if not live:
                continue
            try:
                probs = await loop.run_in_executor(self.model_thread, self._infer, [x for x, _ in live])
            except Exception as exc:  # noqa: BLE001 - reported to each waiting request, the loop goes on
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(live)
            for (_, fut), p in zip(live, probs):
                if not fut.done():
                    fut.set_result(p)

    def _infer(self, items: list) -> list[float]:
        x = self.predictor.collate([(item, -1, i, "") for i, item in enumerate(items)]).x
        return self.predictor.probabilities(x).tolist()
