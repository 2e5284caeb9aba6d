"""Aspect-ratio buckets: train on pictures at their own shape instead of a centre square.

A bucket is a (width, height) of about `resolution`² pixels, both sides multiples of `step` (64 at 512: the
latent is then a multiple of 8, what the UNet's three downsamplings need). Every picture goes to the bucket
whose aspect ratio is nearest its own (compared in log space, so 2:1 and 1:2 are as far from 1:1), is
resized to cover it and centre- (or randomly) cropped to it (`ldm.data.transforms.plan_cover_crop`), so at most a thin strip of the long side is
lost, never half the picture as with a square crop. Each batch holds pictures of one bucket only.

`BucketQueue` is the per-worker buffer that turns a stream of pictures into one-bucket batches: bounded,
so a rare bucket cannot hold memory for ever (when the buffer is full its fullest bucket goes out as a
short batch), and described by `state()` so that a stream stopped between two batches goes on exactly.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(
    resolution: int, step: int = 64, max_ratio: float = 2.0, min_side: int | None = None
) -> list[Bucket]:
    """The buckets of about `resolution`² pixels: for each width that is a multiple of `step`, the
    tallest height (a multiple of `step`) that keeps width × height within `resolution`², both ways round,
    while the long side is at most `max_ratio` times the short one. Sorted by aspect ratio, square included.

    At 512 with `max_ratio=2`: 512×512, 576×448, 640×384 and their transposes; `max_ratio=4` adds 704×320,
    768×320, 832×256, ... 1024×256, the buckets the common SD fine-tuning tools make at 512.
    """
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio {max_ratio} < 1: it is the long side over the short side")
    area = resolution * resolution
    min_side = min_side if min_side is not None else step
    found: set[Bucket] = {(resolution, resolution)}
    width = resolution
    while True:
        width += step
        height = (area // width) // step * step
        if height < min_side or width > max_ratio * height:
            break
        found.update({(width, height), (height, width)})
    return sorted(found, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(size: tuple[int, int], buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest to that of a picture of `size` (width, height).

    Ratios are compared in log space; a tie goes to the bucket with more pixels, then the wider one, so
    the choice never depends on the order of `buckets`.
    """
    if not buckets:
        raise ValueError("no buckets to choose from")
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"picture size {width}x{height}")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 12), -b[0] * b[1], -b[0]))


@dataclass
class _Held(Generic[T]):
    order: int  # when it came in: batches keep arrival order
    item: T
    tag: Any  # what `state()` reports for it (e.g. the sample's place in the stream)


class BucketQueue(Generic[T]):
    """Items sorted into per-bucket queues, handed out as batches of one bucket.

    `push(bucket, item, tag)` returns the batches that became ready: the bucket's, once it holds
    `batch_size` items, and when the queue then holds more than `capacity` items (None: no bound), the fullest bucket's
    (ties: the one whose oldest item came first) as a short batch. `drain()` hands out what is left at the
    end of a pass, fullest first. Every decision depends only on how many items each bucket holds and on
    the order they came in, and `state()` records both (with each item's tag), so `restore` with the items
    found again for those tags makes the same decisions from there on as the queue that was saved.
    """

    def __init__(self, batch_size: int, capacity: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} < 1")
        self.batch_size = batch_size
        self.capacity = math.inf if capacity is None else max(capacity, batch_size)
        self.queues: dict[Hashable, list[_Held[T]]] = {}
        self.arrivals = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def push(self, bucket: Hashable, item: T, tag: Any = None) -> list[tuple[Hashable, list[T]]]:
        ready = [self.put(bucket, item, tag), self.overflow()]
        return [batch for batch in ready if batch is not None]

    def put(self, bucket: Hashable, item: T, tag: Any = None) -> tuple[Hashable, list[T]] | None:
        """`push`'s first half: hold `item`; the bucket's batch once it holds `batch_size` items."""
        queue = self.queues.setdefault(bucket, [])
        queue.append(_Held(self.arrivals, item, tag))
        self.arrivals += 1
        return (bucket, self._take(bucket)) if len(queue) >= self.batch_size else None

    def overflow(self) -> tuple[Hashable, list[T]] | None:
        """`push`'s second half: the fullest bucket as a short batch when more than `capacity` items are held.
        Never after a `put` that gave a batch (that took `batch_size` items out), so a stream that saves
        `state()` after each batch it hands out never saves a queue that owes one."""
        return self._take_fullest() if len(self) > self.capacity else None

    def drain(self) -> Iterator[tuple[Hashable, list[T]]]:
        while self.queues:
            yield self._take_fullest()

    def state(self) -> dict[str, Any]:
        """What is held, as `{"arrivals": n, "held": [(bucket, order, tag), ...]}` in arrival order."""
        held = sorted((h.order, bucket, h.tag) for bucket, queue in self.queues.items() for h in queue)
        return {"arrivals": self.arrivals, "held": [(bucket, order, tag) for order, bucket, tag in held]}

    def restore(self, state: dict[str, Any], items: Sequence[T]) -> None:
        """Hold again what `state()` listed, `items[i]` being the item found again for `state["held"][i]`."""
        if len(items) != len(state["held"]):
            raise ValueError(f"{len(items)} items for {len(state['held'])} held places")
        self.queues, self.arrivals = {}, int(state["arrivals"])
        for (bucket, order, tag), item in zip(state["held"], items, strict=True):
            self.queues.setdefault(_hashable(bucket), []).append(_Held(int(order), item, tag))

    def _by_age(self) -> list[tuple[Hashable, list[_Held[T]]]]:
        return sorted(self.queues.items(), key=lambda kv: kv[1][0].order)

    def _take(self, bucket: Hashable) -> list[T]:
        queue = self.queues[bucket]
        batch, rest = queue[: self.batch_size], queue[self.batch_size :]
        if rest:
            self.queues[bucket] = rest
        else:
            del self.queues[bucket]
        return [held.item for held in batch]

    def _take_fullest(self) -> tuple[Hashable, list[T]]:
        bucket = max(self._by_age(), key=lambda kv: len(kv[1]))[0]  # max keeps the first (oldest) of a tie
        return bucket, self._take(bucket)


def _hashable(bucket: Any) -> Hashable:
    """A bucket read back from a checkpoint (a list after serialisation) as the tuple it was."""
    return tuple(bucket) if isinstance(bucket, list) else bucket
