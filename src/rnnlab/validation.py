"""Types and ranges of the training settings users override most, checked on the composed config.

Hydra composes untyped YAML: `trainer.max_epochs=abc` or `optimizer.lr=fast` would reach Lightning or
torch as text and fail with a traceback after the MLflow run was created, and `trainer.max_epochs=0` or
`optimizer.lr=0` would "train" and report an untrained model. `check_run_config` refuses them first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rnnlab.errors import ConfigError


def is_int(value: object) -> bool:
    """A whole number; bool is an int subclass, but max_epochs=true is a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float: inf and nan pass a range check like `> 0` but train nothing usable."""
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass(frozen=True)
class Accepts:
    """What a setting accepts: in words, for the error message, and as a test."""

    words: str
    test: Callable[[Any], bool]

    def or_null(self) -> Accepts:
        return Accepts(f"{self.words} or null", lambda value: value is None or self.test(value))


POSITIVE_INT = Accepts("a positive whole number", lambda value: is_int(value) and value > 0)
NON_NEGATIVE_INT = Accepts("a whole number >= 0", lambda value: is_int(value) and value >= 0)
POSITIVE_NUMBER = Accepts("a finite number > 0", lambda value: is_number(value) and value > 0)
NON_NEGATIVE_NUMBER = Accepts("a finite number >= 0", lambda value: is_number(value) and value >= 0)
FRACTION = Accepts("in [0, 1)", lambda value: is_number(value) and 0 <= value < 1)
BOOLEAN = Accepts("true or false", lambda value: isinstance(value, bool))


def _flag_or(word: str | None = None) -> Accepts:
    """A Lightning flag: true, false, null (Lightning's default) or the one word it also takes."""
    return Accepts(
        f"true, false{f', {word}' if word else ''} or null", lambda value: value is None or isinstance(value, bool) or value == word
    )


MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed_everything's range
# A limit of batches: a count, or a fraction of the split (Lightning's rule); 0 trains or checks nothing.
BATCH_LIMIT = Accepts("a positive whole number or a fraction in (0, 1]", lambda v: (is_int(v) and v > 0) or (is_number(v) and 0 < v <= 1))

# key -> (what it accepts, a valid example). A key the composed config does not have is skipped: the trainer
# keys that are not in conf/trainer are those a user adds with `+`.
SETTINGS: dict[str, tuple[Accepts, str]] = {
    "seed": (Accepts(f"a whole number in [0, {MAX_SEED}]", lambda value: is_int(value) and 0 <= value <= MAX_SEED), "42"),
    "resume": (BOOLEAN, "true"),
    "trainer.max_epochs": (POSITIVE_INT, "4"),
    # Zero optimizer steps would record an untrained model as a result, whatever setting caused it.
    "trainer.max_steps": (Accepts("a positive whole number, or -1 for no limit", lambda v: is_int(v) and (v > 0 or v == -1)), "1000"),
    "trainer.limit_train_batches": (BATCH_LIMIT, "0.5"),
    "trainer.limit_val_batches": (BATCH_LIMIT, "0.5"),
    "trainer.limit_test_batches": (BATCH_LIMIT, "0.5"),
    "trainer.gradient_clip_val": (NON_NEGATIVE_NUMBER.or_null(), "1.0"),
    # Lightning takes text here as "true" without a word (`deterministic=no` would not make runs deterministic), or torch
    # fails with a traceback once training starts (`benchmark=yes`).
    "trainer.deterministic": (_flag_or("warn"), "true"),
    **{f"trainer.{key}": (_flag_or(), "false") for key in ("enable_model_summary", "benchmark")},
    # Not "link": Lightning's link points at the best epoch's file, and resume=true continues from last.ckpt.
    "callbacks.checkpoint.save_last": (_flag_or(), "true"),
    "optimizer.lr": (POSITIVE_NUMBER, "2e-3"),
    "optimizer.weight_decay": (NON_NEGATIVE_NUMBER, "0.01"),
    "model.encoder.hidden_size": (POSITIVE_INT, "128"),
    "model.encoder.num_layers": (POSITIVE_INT, "2"),
    "model.encoder.dropout": (FRACTION, "0.2"),
    "model.encoder.bidirectional": (BOOLEAN, "true"),
    "model.encoder.cell_options.recurrent_dropout": (FRACTION, "0.2"),
    "task.data.batch_size": (POSITIVE_INT, "64"),
    "task.data.num_workers": (NON_NEGATIVE_INT, "2"),
    # A negative limit would silently drop the last examples (a slice), 0 would leave the split empty.
    **{f"task.data.limit_{split}": (POSITIVE_INT.or_null(), "200") for split in ("train", "val", "test")},
    "task.front_end.embedding_dim": (POSITIVE_INT, "128"),
    "task.front_end.dropout": (FRACTION, "0.1"),
    "callbacks.early_stopping.patience": (NON_NEGATIVE_INT, "2"),
}
_ABSENT = object()


def _shown(value: object) -> str:
    """The value as the message quotes it, with its type when that is what is wrong (Hydra reads `abc` as text)."""
    return repr(value) if is_number(value) or value is None else f"{value!r} ({type(value).__name__})"


# The top-level keys of a training's config (conf/config.yaml and the groups it composes, and Hydra's own node where
# a caller composed it); `+foo=1` adds another, which nothing would read.
RUN_KEYS = (
    "seed",
    "profile_name",
    "resume",
    "paths",
    "optimizer",
    "callbacks",
    "tracking",
    "search",
    "task",
    "model",
    "scheduler",
    "trainer",
)
HYDRA_NODE = "hydra"  # Hydra's own settings, in a config composed with return_hydra_config
# Settings of the stages before training: a training reads their outputs, so overriding them there changes nothing but
# what MLflow records. The same holds for the baseline stage's settings (task.baselines).
DATA_STAGES = {"fetch": "rnnlab.fetch", "preprocess": "rnnlab.preprocess"}


# Config nodes whose own keys rnnlab reads by name: a key added to one of them (`+task.foo=1`) is read by nothing.
# Deeper additions (`+task.data.num_workers=2`, `+trainer.<Trainer argument>`) reach a constructor, which checks them.
NAMED_NODES = ("task", "model", "paths", "search", "tracking")


def check_overrides(overrides: list[str], task: str, cfg: DictConfig | None = None) -> None:
    """Refuse command-line overrides of a training that it would not apply: fetch, preprocess and baseline settings
    (task.baselines), and keys added (with +) to a node whose keys rnnlab reads by name (given the composed `cfg`, to
    list the node's keys)."""
    for override in overrides:
        added = override.startswith("+") and not override.startswith("++")
        node, _, name = override.split("=", 1)[0].lstrip("+~").partition(".")
        if added and node in NAMED_NODES and name and "." not in name:
            known = f"; the settings of {node} are {', '.join(k for k in cfg[node] if k != name)}" if cfg is not None else ""
            raise ConfigError(f"{node}.{name} is not a setting of a training (added with +): nothing would read it{known}.")
        key = override.split("=", 1)[0].lstrip("+~")
        stage = key.split(".")[1] if key.startswith("task.") and key.count(".") >= 2 else None
        if stage == "baselines":
            raise ConfigError(
                f"{key} is a setting of the baseline stage, which training does not use. Run `python -m rnnlab.baselines "
                f"task={task} {override.lstrip('+')}`, or change it in conf/task/{task}.yaml and run `dvc repro`; then train without it."
            )
        if stage in DATA_STAGES:
            raise ConfigError(
                f"{key} is a {stage} setting, which training does not apply (it reads data/processed/{task}). Run "
                f"`python -m {DATA_STAGES[stage]} task={task} {override.lstrip('+')}` first (and preprocess after a fetch), "
                f"or change it in conf/task/{task}.yaml and run `dvc repro`; then train without it."
            )


def check_run_config(cfg: DictConfig) -> None:
    """Refuse a training config whose usual overrides have the wrong type or range, naming the key, the value
    and what is accepted; called before any data is loaded or MLflow run created."""
    unknown = [str(key) for key in cfg if key not in (*RUN_KEYS, HYDRA_NODE)]
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)} is not a setting of a training (added with +?): nothing would read it. "
            f"The top-level settings are {', '.join(RUN_KEYS)}."
        )
    for key, (accepts, example) in SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not accepts.test(value):
            raise ConfigError(f"{key} must be {accepts.words}, got {_shown(value)}; e.g. {key}={example}.")
