"""Training views from shard sets: the dataset, its endless seeded sampler and the loader.

:class:`ViewDataset` turns a sample of a :class:`~matting_pipeline.shards.ShardReader` into
the training views (:func:`matting_core.training.make_views`); :class:`PositionSampler`
draws an endless seeded sequence of epochs. The augmentation randomness of the ``p``-th
sample of a run is ``default_rng([seed, p])``, so a resumed run sees exactly the batches
an uninterrupted run would, whatever ``num_workers`` (:func:`make_loader`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from matting_core.training import collate_views, make_views, sample_rng
from matting_pipeline.shards import ShardReader

__all__ = ["PositionSampler", "Prefetcher", "ViewDataset", "make_loader"]


class ViewDataset(Dataset):
    """Map-style dataset of training views, indexed by ``(sample index, draw position)``.

    ``dataset[(i, p)]`` reads sample ``keys[i]`` and returns
    ``make_views(sample, default_rng([seed, p]), crop, scale_range, roles, strong)``.
    With ``guidance`` (a related method's input, see :mod:`matting_pipeline.jobs`) the view also
    gets ``views[guidance_key] = guidance(views["alpha"], rng)``, drawn from the same
    generator after the geometry, so it is as reproducible as the crop (and made from the
    cropped GT alpha, as the methods make theirs).
    """

    def __init__(
        self,
        reader: ShardReader,
        roles: Sequence[str],
        crop: int,
        scale_range: tuple[float, float],
        seed: int,
        strong: bool = False,
        guidance_key: str | None = None,
        guidance: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ):
        self.reader = reader
        self.roles = list(roles)
        self.crop = int(crop)
        self.scale_range = tuple(scale_range)
        self.seed = int(seed)
        self.strong = bool(strong)
        if (guidance_key is None) != (guidance is None):
            raise ValueError("guidance_key and guidance go together")
        if guidance is not None and "alpha" not in self.roles:
            raise ValueError("guidance is made from the GT alpha: add 'alpha' to the roles")
        self.guidance_key = guidance_key
        self.guidance = guidance
        self.cache_bytes = 0
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.reader)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # a worker starts with an empty cache of its own
        state["_cache"], state["_cached_bytes"] = OrderedDict(), 0
        return state

    def enable_cache(self, max_bytes: int) -> None:
        """Keep up to ``max_bytes`` of decoded samples in memory (least recently used go
        first; per process, so each DataLoader worker has its own). Decoding the PNG
        members is about half of a view's cost; the views, and so the results, are the
        same. The cached arrays are read-only: an augmentation that wrote into its input
        would fail instead of changing later epochs."""
        self.cache_bytes = max(0, int(max_bytes))
        self._evict_to(self.cache_bytes)

    def _evict_to(self, limit: int) -> None:
        """Drop the least recently used samples until at most ``limit`` bytes are cached."""
        while self._cache and self._cached_bytes > limit:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= _sample_bytes(old)

    def _read(self, key: str) -> dict:
        sample = self._cache.get(key)
        if sample is not None:
            self._cache.move_to_end(key)
            return sample
        sample = self.reader.read(key, roles=["image", *self.roles])
        size = _sample_bytes(sample)
        if self.cache_bytes and size <= self.cache_bytes:
            for value in sample.values():
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
            self._evict_to(self.cache_bytes - size)
            self._cache[key] = sample
            self._cached_bytes += size
        return sample

    def __getitem__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        index, position = item
        sample = self._read(self.reader.keys[index])
        rng = sample_rng(self.seed, position)
        views = make_views(sample, rng, self.crop, self.scale_range, self.roles, self.strong)
        if self.guidance is not None:
            views[self.guidance_key] = np.ascontiguousarray(self.guidance(views["alpha"], rng), dtype=np.float32)
        return views


def _sample_bytes(sample: dict) -> int:
    return sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray))


class PositionSampler(Sampler):
    """Endless ``(sample index, position)`` pairs starting at ``start``.

    Position ``p`` belongs to epoch ``e = p // n``, whose order is
    ``default_rng([seed, e, 1]).permutation(n)``: a pure function of ``(seed, p)``, so
    starting at ``step · batch_size`` resumes the exact sequence.
    """

    def __init__(self, num_samples: int, seed: int, start: int = 0):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty training set")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.start = int(start)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        epoch = position // self.num_samples
        order = self._epoch_order(epoch)
        while True:
            e, offset = divmod(position, self.num_samples)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield int(order[offset]), position
            position += 1


def _worker_init(_: int) -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def make_loader(dataset: ViewDataset, batch_size: int, start_step: int, num_workers: int) -> DataLoader:
    """Endless loader of collated batches, resuming at ``start_step``.

    Workers start from a fork server, not a plain fork: forking a process whose OpenCV or
    OpenMP thread pools are live (any process that already decoded or trained) can
    deadlock the child on its first threaded call.
    """
    import multiprocessing

    sampler = PositionSampler(len(dataset), dataset.seed, start=start_step * batch_size)
    return DataLoader(
        dataset,
        multiprocessing_context=multiprocessing.get_context("forkserver") if num_workers > 0 else None,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_views,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=False,
    )


class Prefetcher:
    """Iterate ``iterator`` one batch ahead in a background thread.

    With ``num_workers: 0`` the loader decodes and augments in the training process, on
    the training thread, between steps. PNG decoding, OpenCV and NumPy release the GIL, so
    a thread can make batch ``k + 1`` while the step of batch ``k`` runs (measured by
    ``benchmarks/bench_training.py``). The batches and their order are the iterator's, so
    results do not change; an exception of the iterator is raised by ``next`` here, in
    order. Use as a context manager (or call :meth:`close`): the thread stops and its
    pending batch is dropped.
    """

    _DONE = object()

    def __init__(self, iterator: Iterator, depth: int = 1, name: str = "batch-prefetch"):
        import queue
        import threading

        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._iterator:
                if not self._put((item, None)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, err))
            return
        self._put((self._DONE, None))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item, err = self._queue.get()
        if err is not None:
            self._finished = True
            raise err
        if item is self._DONE:
            self._finished = True
            raise StopIteration
        return item

    def close(self) -> None:
        import queue

        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
