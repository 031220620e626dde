"""Textgen's baseline `kn_ngram`: an interpolated Kneser-Ney character n-gram model, its order chosen on validation
loss, scoring each test chunk row from the same context the language model has (its row of the test stream, from the
row's start)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlab.baselines.common import Outputs
from rnnlab.data.base import SPLITS, SplitTensorDataModule
from rnnlab.errors import ConfigError


@dataclass
class _NgramCounts:
    """Counts of the n-grams of one length, as int64 keys (character ids in base V), sorted for searchsorted lookups,
    with their contexts' totals and numbers of distinct following characters, and the order's discount."""

    keys: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray
    followers: np.ndarray
    discount: float

    @classmethod
    def of(cls, keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> _NgramCounts:
        contexts, inverse = np.unique(keys // vocab_size, return_inverse=True)
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        # Ney, Essen and Kneser's estimate D = n1 / (n1 + 2 n2), from the counts of counts 1 and 2.
        discount = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
        return cls(keys, counts, contexts, np.bincount(inverse, weights=counts), np.bincount(inverse), discount)

    def interpolate(self, context_keys: np.ndarray, targets: np.ndarray, lower: np.ndarray, vocab_size: int) -> np.ndarray:
        """P(target | context): the discounted count of the n-gram plus the discount's mass spread by the lower order's
        P, or the lower order's P alone where the context was never seen."""
        gram = _lookup(self.keys, self.counts, context_keys * vocab_size + targets)
        total = _lookup(self.contexts, self.totals, context_keys)
        followers = _lookup(self.contexts, self.followers, context_keys)
        seen = total > 0
        safe_total = np.where(seen, total, 1.0)
        mixed = (np.maximum(gram - self.discount, 0) + self.discount * followers * lower) / safe_total
        return np.where(seen, mixed, lower)


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[keys == query] for each query, 0 where the key is absent (keys sorted)."""
    if not len(keys):
        return np.zeros(len(queries))
    index = np.searchsorted(keys, queries).clip(max=len(keys) - 1)
    return np.where(keys[index] == queries, values[index], 0).astype(np.float64)


class KneserNey:
    """Interpolated Kneser-Ney character n-gram model (Chen and Goodman, 1999, section 3.5), one discount per order:
    the highest order interpolates raw counts, every lower one continuation counts (the number of distinct
    characters each n-gram follows), down to a uniform distribution over the vocabulary.

    Written here because nltk's KneserNeyInterpolated scores one n-gram at a time in Python, hours for the test
    set; this counts with np.unique over int64 keys and scores all positions at once.
    """

    def __init__(self, train: np.ndarray, vocab_size: int, max_order: int) -> None:
        if max_order < 1 or vocab_size**max_order >= 2**62:
            longest = max(n for n in range(1, 63) if vocab_size**n < 2**62)
            raise ConfigError(
                f"task.baselines.orders: order {max_order} with {vocab_size} characters does not fit an int64 key; "
                f"choose orders from 1 to {longest}."
            )
        self.vocab_size, self.max_order = vocab_size, max_order
        self.raw = {n: _NgramCounts.of(*np.unique(self._grams(train, n), return_counts=True), vocab_size) for n in range(1, max_order + 1)}
        # n-grams of length n, counted once per distinct preceding character: the suffixes of the distinct (n+1)-grams.
        self.continuation = {
            n: _NgramCounts.of(*np.unique(self.raw[n + 1].keys % vocab_size**n, return_counts=True), vocab_size)
            for n in range(1, max_order)
        }

    def _grams(self, stream: np.ndarray, n: int) -> np.ndarray:
        keys = np.zeros(len(stream) - n + 1, dtype=np.int64)
        for offset in range(n):
            keys = keys * self.vocab_size + stream[offset : len(stream) - n + 1 + offset]
        return keys

    def log_probabilities(self, stream: np.ndarray, positions: np.ndarray, history: np.ndarray, order: int) -> np.ndarray:
        """ln P(stream[p] | up to order - 1 characters before p) for each of `positions`, using no more than
        `history` characters before each (where its text starts for the model being matched)."""
        if not 1 <= order <= self.max_order:
            raise ConfigError(f"order {order} is outside the model's 1..{self.max_order}.")
        return self.log_probabilities_by_order(stream, positions, history, order)[order]

    def log_probabilities_by_order(
        self, stream: np.ndarray, positions: np.ndarray, history: np.ndarray, max_order: int
    ) -> dict[int, np.ndarray]:
        """log_probabilities for every order from 1 to `max_order` in one pass up the orders: the order-n model's
        estimate at a position is the raw-count one at context length min(history, n - 1), interpolated with the
        continuation estimates below it, which the pass computes once for all orders (validation scores every order)."""
        targets = stream[positions].astype(np.int64)
        lower = np.full(len(positions), 1.0 / self.vocab_size)  # order 0: uniform
        contexts = np.zeros(len(positions), dtype=np.int64)
        chosen, by_order = lower, {}
        for length in range(max_order):  # context length 0 .. max_order - 1
            if length:
                contexts = contexts + stream[np.maximum(positions - length, 0)].astype(np.int64) * self.vocab_size ** (length - 1)
            top = self.raw[length + 1].interpolate(contexts, targets, lower, self.vocab_size)
            # The highest order a position may use (its history allows): raw counts there.
            chosen = np.where(history >= length, top, chosen)
            by_order[length + 1] = np.log(chosen)
            if length + 1 < max_order:
                lower = self.continuation[length + 1].interpolate(contexts, targets, lower, self.vocab_size)
        return by_order


def kneser_ney_ngram(raw_dir: Path, data: SplitTensorDataModule, orders: list[int]) -> Outputs:
    """Count n-grams of the training stream, choose the order with the lowest validation loss (nats per character,
    each character predicted from the validation stream before it), and score every test chunk row as the language
    model does: the characters it predicts, each from its row's text since the row's start."""
    if not orders or min(orders) < 1:
        raise ConfigError(f"task.baselines.orders must be n-gram lengths of at least 1, got {orders}.")
    data.setup()
    stream = {split: data.chunks[split].stream.numpy().astype(np.int64) for split in SPLITS}
    model = KneserNey(stream["train"], len(data.vocabulary), max(orders))
    val_positions = np.arange(1, len(stream["val"]))
    by_order = model.log_probabilities_by_order(stream["val"], val_positions, val_positions, max(orders))
    val_loss = {n: float(-by_order[n].mean()) for n in orders}
    order = min(orders, key=lambda n: (val_loss[n], n))
    # The characters the test loader's chunk rows ask for, each from its row's text since the row's start.
    chunks, n_chunks = data.chunks["test"], len(data.test_dataloader())
    positions, history, unit = chunks.predicted(n_chunks)
    nats = -model.log_probabilities(stream["test"], positions, history, order)
    characters = np.bincount(unit, minlength=n_chunks * chunks.rows)
    units = data.test_units()
    outputs = units.assign(loss=np.bincount(unit, weights=nats) / characters, characters=characters)
    metrics = {
        "test_loss": float(nats.mean()),
        "test_bpc": float(nats.mean() / np.log(2)),
        "val_loss": val_loss[order],
        "order": order,
        **{f"val_loss_order{n}": loss for n, loss in val_loss.items()},
    }
    return {"kn_ngram": (outputs, metrics)}
