"""Common random numbers (rnnlab.streams): for one seed, every model sees the same batches, augmentations and noise."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from helpers import isolated_outputs, record_batches, recorded_batches

from rnnlab import streams
from rnnlab.data.base import EpochShuffle
from rnnlab.data.speech import SpeechDataModule
from rnnlab.training import train


def test_stream_seeds_depend_on_seed_stream_and_epoch_only() -> None:
    seeds = {streams.stream_seed(seed, stream, epoch) for seed in (0, 1) for stream in (streams.ORDER, streams.NOISE) for epoch in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert streams.stream_seed(7, streams.ORDER, 2) == streams.stream_seed(7, streams.ORDER, 2)
    first, second = streams.generator(7, streams.ORDER), streams.generator(7, streams.ORDER)
    torch.rand(5)  # the global generator is not theirs
    assert torch.equal(torch.rand(3, generator=first), torch.rand(3, generator=second))


def test_epoch_shuffle_is_a_function_of_seed_and_epoch() -> None:
    sampler = EpochShuffle(50, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3  # a new order each epoch
    resumed = EpochShuffle(50, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]  # a fresh sampler at epoch 2 (a resumed run) draws what the first one did
    other = EpochShuffle(50, seed=4)
    other.set_epoch(2)
    assert list(other) != orders[2]


def test_two_cells_with_one_seed_train_on_the_same_batches_and_noise(compose_cfg, tiny_overrides: list[str], tmp_path: Path) -> None:
    def batches(name: str, *overrides: str) -> list[dict]:
        record = tmp_path / f"{name}.jsonl"
        run = [*tiny_overrides, *isolated_outputs(tmp_path / name), *record_batches(record), "trainer.max_epochs=2"]
        train(compose_cfg(*run, "callbacks.early_stopping=null", *overrides))
        return recorded_batches(record)

    gru = batches("gru", "model=gru", "seed=3")
    lstm = batches("lstm", "model=lstm", "model.encoder.hidden_size=12", "seed=3")  # other parameters, drawn from the same seed
    other_seed = batches("gru4", "model=gru", "seed=4")
    assert [b["epoch"] for b in gru] == [0] * (len(gru) // 2) + [1] * (len(gru) // 2)
    assert gru == lstm  # batch by batch: the same examples in the same order, and the same noise at each epoch's start
    assert [b["data"] for b in gru[: len(gru) // 2]] != [b["data"] for b in gru[len(gru) // 2 :]]  # reshuffled each epoch
    assert [b["data"] for b in other_seed] != [b["data"] for b in gru]
    assert [b["noise"] for b in other_seed if b["noise"]] != [b["noise"] for b in gru if b["noise"]]


def test_speech_masks_come_from_the_augmentation_stream(tmp_path: Path) -> None:
    def masked(seed: int, epoch: int) -> torch.Tensor:
        data = SpeechDataModule(tmp_path, spec_augment={"freq_mask": 3, "time_mask": 4}, seed=seed)
        data.trainer = SimpleNamespace(training=True, current_epoch=epoch)
        torch.rand(int(torch.randint(1, 50, ())))  # a model that drew more or less before: it must not matter
        batches = []
        for _ in range(2):
            global_state = torch.get_rng_state()
            batches.append(data.on_after_batch_transfer([torch.ones(2, 20, 8), torch.zeros(2)], 0)[0])
            assert torch.equal(torch.get_rng_state(), global_state)  # the global generator (dropout's) is left alone
        return torch.stack(batches)

    first = masked(3, 0)
    assert torch.equal(first, masked(3, 0)) and (first == 0).any()
    assert not torch.equal(first[0], first[1])  # each batch its own masks
    assert not torch.equal(first, masked(3, 1)) and not torch.equal(first, masked(4, 0))
