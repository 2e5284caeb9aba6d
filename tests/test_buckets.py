"""Aspect-ratio buckets: the bucket sizes, which bucket a picture goes to, the cover crop, and the
per-worker queue that makes one-bucket batches and goes on exactly from its saved state."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image

from ldm.data.buckets import BucketQueue, bucket_sizes, nearest_bucket
from ldm.data.transforms import apply_crop, plan_cover_crop


@pytest.mark.parametrize(
    ("resolution", "step", "max_ratio"),
    [(512, 64, 2.0), (512, 64, 4.0), (768, 64, 2.0), (1024, 64, 2.0), (64, 8, 2.0)],
)
def test_buckets_hold_about_the_resolutions_pixels(resolution, step, max_ratio):
    buckets = bucket_sizes(resolution, step, max_ratio)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    assert [w / h for w, h in buckets] == sorted(w / h for w, h in buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w, h) <= max_ratio * min(w, h)
        assert (h, w) in buckets
        # the tallest height for this width: one step more would pass the pixel budget
        if w >= resolution:
            assert w * (h + step) > resolution * resolution
    # the 512 buckets the common tools list (576x448, 640x384, and at 4:1 down to 1024x256)
    if (resolution, max_ratio) == (512, 2.0):
        assert buckets == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    if (resolution, max_ratio) == (512, 4.0):
        assert {(704, 320), (768, 320), (1024, 256)} <= set(buckets)


def test_bucket_sizes_refuse_what_cannot_be_bucketed():
    with pytest.raises(ValueError, match="multiple of the bucket step"):
        bucket_sizes(500)
    with pytest.raises(ValueError, match="long side over the short side"):
        bucket_sizes(512, max_ratio=0.5)
    with pytest.raises(ValueError, match="no buckets"):
        nearest_bucket((10, 10), [])


def test_each_picture_goes_to_the_bucket_of_nearest_aspect_ratio():
    buckets = bucket_sizes(512, max_ratio=4.0)
    rng = random.Random(0)
    for _ in range(300):
        size = (rng.randint(50, 4000), rng.randint(50, 4000))
        chosen = nearest_bucket(size, buckets)
        ratio = math.log(size[0] / size[1])
        best = min(abs(math.log(w / h) - ratio) for w, h in buckets)
        assert abs(math.log(chosen[0] / chosen[1]) - ratio) == pytest.approx(best)
        # the choice does not depend on the order of the list, and a transposed picture gets the transposed bucket
        assert nearest_bucket(size, rng.sample(buckets, len(buckets))) == chosen
        assert nearest_bucket(size[::-1], buckets) == chosen[::-1]
    assert nearest_bucket((1920, 1080), bucket_sizes(512)) == (640, 384)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    # beyond the widest bucket: the widest bucket
    assert nearest_bucket((10000, 100), buckets) == (1024, 256)


def test_cover_crop_fills_the_bucket_and_loses_only_the_long_sides_excess():
    rng = random.Random(1)
    buckets = bucket_sizes(256, step=32, max_ratio=3.0)
    for _ in range(40):
        size = (rng.randint(40, 900), rng.randint(40, 900))
        bucket = nearest_bucket(size, buckets)
        plan = plan_cover_crop(size, bucket, random_crop=True, random_flip=True, rng=random.Random(7))
        image = Image.new("RGB", size)
        out = apply_crop(image, plan)
        assert out.size == bucket
        rw, rh = plan.size
        assert rw >= bucket[0] and rh >= bucket[1]
        assert rw == bucket[0] or rh == bucket[1]  # resized to cover: one side fits exactly
        # the aspect ratio is kept by the resize (to the rounding of one pixel)
        assert abs(rw / rh - size[0] / size[1]) <= size[0] / size[1] * (1 / min(rw, rh) + 1 / min(size))
        left, top, right, bottom = plan.box
        assert 0 <= left and right <= rw and 0 <= top and bottom <= rh
        # the same seed draws the same crop and flip
        assert plan == plan_cover_crop(size, bucket, random_crop=True, random_flip=True, rng=random.Random(7))
    # a centre crop takes equal strips from both ends
    plan = plan_cover_crop((1920, 1080), (640, 384))
    assert plan.size == (683, 384) and plan.box == (21, 0, 661, 384) and not plan.flip


def test_cover_crop_keeps_the_picture_where_a_square_crop_would_cut_it():
    """A wide picture with a mark at each end: the bucket keeps both, a square crop neither."""
    image = Image.new("RGB", (1920, 1080), "black")
    for x in (150, 1770):
        image.paste((255, 0, 0), (x - 30, 500, x + 30, 580))
    bucket = nearest_bucket(image.size, bucket_sizes(512))

    def red(box):  # red pixels in the left and the right half
        pixels = torch.tensor(list(apply_crop(image, plan_cover_crop(image.size, box)).getdata()))
        pixels = pixels.reshape(box[1], box[0], 3)
        is_red = (pixels[..., 0] > 128) & (pixels[..., 1] < 64)
        return int(is_red[:, : box[0] // 2].sum()), int(is_red[:, box[0] // 2 :].sum())

    assert bucket == (640, 384)
    left, right = red(bucket)
    assert left > 400 and right > 400  # each mark, 60x80 pixels resized by 0.36: some 600 pixels
    assert red((512, 512)) == (0, 0)


def _run(queue: BucketQueue, arrivals: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    out = []
    for bucket, item in arrivals:
        out.extend(queue.push(bucket, item, tag=item))
    return out


@pytest.mark.parametrize("capacity", [None, 6, 10])
def test_queue_hands_out_every_item_once_in_one_bucket_batches(capacity):
    rng = random.Random(capacity or 0)
    arrivals = [(rng.choice([0, 0, 0, 1, 1, 2, 3]), i) for i in range(500)]
    queue = BucketQueue(batch_size=4, capacity=capacity)
    batches = _run(queue, arrivals)
    check = BucketQueue(batch_size=4, capacity=capacity)
    for bucket, item in arrivals:
        check.push(bucket, item)
        # the bound holds after every push; unbounded, each of the 4 buckets holds at most a batch less one
        assert len(check) <= (capacity if capacity is not None else 4 * 3)
    batches += list(queue.drain())
    assert len(queue) == 0
    assert sorted(i for _, batch in batches for i in batch) == list(range(500))
    bucket_of = dict((i, b) for b, i in arrivals)
    for bucket, batch in batches:
        assert {bucket_of[i] for i in batch} == {bucket}
        assert batch == sorted(batch)  # arrival order within a batch
        assert 1 <= len(batch) <= 4
    short = sum(len(batch) < 4 for _, batch in batches)
    if capacity is None:
        assert short <= 4  # only what the drain hands out at the end
    else:
        assert short > 4  # the bound forced short batches out of the rare buckets


def _naive_restore(queue: BucketQueue, state: dict, items: list) -> None:
    """A restore that forgets which bucket came first (buckets sorted by size, as a dict saved sorted would be)."""
    queue.queues, queue.arrivals = {}, 0
    by_bucket: dict = {}
    for (bucket, _, tag), item in zip(state["held"], items, strict=True):
        by_bucket.setdefault(bucket, []).append((item, tag))
    for bucket, pairs in sorted(by_bucket.items()):
        for item, tag in pairs:
            queue.push(bucket, item, tag)


def test_queue_goes_on_from_its_state_exactly_as_the_uninterrupted_one():
    rng = random.Random(3)
    naive_differed = 0
    for trial in range(60):
        arrivals = [(rng.choice([0, 0, 1, 2, 3]), i) for i in range(120)]
        cut = rng.randint(1, 119)
        whole = BucketQueue(batch_size=3, capacity=7)
        expected = _run(whole, arrivals)
        expected += list(whole.drain())

        first = BucketQueue(batch_size=3, capacity=7)
        got = _run(first, arrivals[:cut])
        state = first.state()
        # what a checkpoint holds: the tags (places); the items are read again from the stream
        items = [tag for _, _, tag in state["held"]]
        second = BucketQueue(batch_size=3, capacity=7)
        second.restore(state, items)
        rest = _run(second, arrivals[cut:]) + list(second.drain())
        assert got + rest == expected, f"trial {trial}, cut at {cut}"

        naive = BucketQueue(batch_size=3, capacity=7)
        held_before = len(items)
        _naive_restore(naive, state, items)
        if len(naive) == held_before:  # nothing handed out while refilling
            naive_rest = _run(naive, arrivals[cut:]) + list(naive.drain())
            naive_differed += got + naive_rest != expected
    assert naive_differed > 0  # the arrival order in the state matters: this test would catch its loss


def test_queue_state_survives_a_checkpoint_round_trip(tmp_path):
    queue = BucketQueue(batch_size=2, capacity=5)
    _run(queue, [((640, 384), 1), ((512, 512), 2), ((640, 384), 3), ((384, 640), 4)])
    torch.save({"queue": queue.state()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["queue"]
    again = BucketQueue(batch_size=2, capacity=5)
    again.restore(state, [tag for _, _, tag in state["held"]])
    assert again.state() == queue.state()
    assert list(again.drain()) == list(queue.drain())
    with pytest.raises(ValueError, match="2 items for 1 held places"):
        again.restore({"arrivals": 1, "held": [((1, 1), 0, "a")]}, ["a", "b"])
