"""Common random numbers: one independent random stream per purpose, derived from the run's seed.

A stream's generator depends only on (seed, stream name, epoch), never on what other code drew
before it. So for one seed every model sees the same batches in the same order with the same
augmentations whatever its parameter count (initial weights draw from a stream of their own),
and a run resumed at an epoch boundary draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib

import torch

WEIGHTS = "weights"  # initial weights
ORDER = "order"  # which examples form each batch, in which order (and textgen's window offsets)
AUGMENT = "augment"  # training-time augmentation (speech's SpecAugment masks)
LOADER = "loader"  # a DataLoader's base seed for its workers, drawn at each epoch's start
NOISE = "noise"  # dropout and any other noise drawn during training: torch's global generator, reseeded each epoch


def stream_seed(seed: int, stream: str, epoch: int = 0) -> int:
    """A 63-bit seed for `stream` in `epoch` of the run seeded `seed`.

    Hashed, not `seed + offset`: nearby seeds or streams must not give overlapping sequences.
    """
    digest = hashlib.sha256(f"rnnlab/{seed}/{stream}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, stream: str, epoch: int = 0) -> torch.Generator:
    """A CPU generator for `stream` in `epoch`, independent of torch's global one."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, epoch))
