"""Parts of the training step that must not read device values back to the host (a GPU stall every step),
checked on the CPU by making every such read raise: the EMA update, the UNet's timestep embedding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from ldm.lightning.ema import EMA
from ldm.models.unet import timestep_embedding


@contextmanager
def no_device_reads() -> Iterator[None]:
    """Tensor -> Python value conversions raise inside the block (what `.item()`, `int(t)`, `if t:` do)."""

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a tensor value was read on the host")

    names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_the_detector_catches_a_read() -> None:
    with pytest.raises(AssertionError, match="read on the host"), no_device_reads():
        int(torch.tensor(3))


def test_ema_updates_read_no_device_values_and_follow_ldm_warm_up() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    saved = ema.state_dict()
    saved["num_updates"] = torch.tensor(10, dtype=torch.int32)
    ema.load_state_dict(saved)  # a resumed run: the host copies come from the loaded buffers
    int(ema.num_updates)
    shadow = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.current_decay()  # the one read after a load happens outside the step
    with no_device_reads():
        for _ in range(3):
            ema.update(model)
    assert int(ema.num_updates) == 13
    expected = shadow
    for n in (11, 12, 13):  # LDM's LitEma: decay min(0.99, (1 + n) / (10 + n)) at update n
        d = min(0.99, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.detach()
    assert torch.allclose(ema.weight, expected, atol=1e-6)


def test_timestep_embedding_builds_its_frequencies_where_the_timesteps_are() -> None:
    t = torch.tensor([0, 10, 999])
    with no_device_reads():
        emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
