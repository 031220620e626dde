"""Speech commands: espeak-ng synthesis, speaker-disjoint splits, features, SpecAugment, the
Speech Commands folder loader, bad input, and learning on the features."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fit_one_batch, quiet_trainer, write_tone
from omegaconf import DictConfig
from scipy.io import wavfile
from sklearn.metrics import accuracy_score, f1_score

from rnnlab.data.speech import (
    FEATURE_GRID,
    SAMPLE_RATE,
    SpeechDataModule,
    assign_splits,
    check_voices,
    espeak_version,
    fetch,
    log_mel,
    preprocess,
    read_wav,
    reference_check,
    split_sizes,
)
from rnnlab.errors import DataError
from rnnlab.models.lit import SequenceClassifier

# Five speakers saying two commands and one other word each, and three noise clips.
TINY_ESPEAK = {
    "accents": ["en-us", "en-gb-scotland"],
    "variants": ["m1", "f2"],
    "rates": [150, 190],
    "pitches": [40, 60],
    "num_speakers": 5,
    "unknown_words": ["bed", "cat"],
    "unknown_per_speaker": 1,
    "takes": 1,
    "silence_clips": 3,
    "split_by": "speaker",  # five speakers may share fewer than three voices; the voice split has its own test
}
TINY_COMMANDS = ["yes", "no"]


def fetch_tiny(out_dir: Path, **espeak: object) -> None:
    fetch(str(out_dir), commands=TINY_COMMANDS, seed=3, espeak={**TINY_ESPEAK, **espeak})


def read_manifest(raw: Path) -> pd.DataFrame:
    return pd.read_csv(raw / "manifest.csv", dtype=str, keep_default_na=False)


def test_fetch_synthesises_one_second_16khz_clips_of_every_class(speech_dirs: tuple[Path, Path]) -> None:
    raw, _ = speech_dirs
    manifest = read_manifest(raw)
    source = json.loads((raw / "source.json").read_text())
    assert source["classes"] == ["yes", "no", "unknown", "silence"]
    # The version, not where this machine keeps espeak-ng's data: the raw data hold no path of the machine.
    assert source["espeak_ng"].startswith("eSpeak NG") and "/" not in source["espeak_ng"]
    assert len(manifest) == 5 * (2 + 1) + 3
    assert manifest["label"].value_counts().to_dict() == {"yes": 5, "no": 5, "unknown": 5, "silence": 3}
    assert set(manifest.loc[manifest["label"] == "unknown", "word"]) <= {"bed", "cat"}
    assert manifest["speaker"].replace("", np.nan).dropna().nunique() == 5
    for file in manifest["file"]:
        rate, samples = wavfile.read(raw / "wav" / file)
        assert (rate, samples.shape, samples.dtype) == (SAMPLE_RATE, (SAMPLE_RATE,), np.int16)
    levels = {file: read_wav(raw / "wav" / file, convert=False)[0] for file in manifest["file"]}
    is_silence = manifest.set_index("file")["label"] == "silence"
    # Words peak between -18 and -1 dBFS (plus noise); silence clips are noise at -60 to -20 dBFS RMS.
    assert all(np.abs(audio).max() > 10 ** (-18 / 20) for file, audio in levels.items() if not is_silence[file])
    assert all(np.sqrt(np.mean(audio**2)) < 10 ** (-20 / 20) * 1.01 for file, audio in levels.items() if is_silence[file])


def test_synthesis_is_deterministic_for_a_seed(speech_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    raw, _ = speech_dirs
    fetch_tiny(tmp_path / "again")
    first, second = read_manifest(raw), read_manifest(tmp_path / "again")
    pd.testing.assert_frame_equal(first, second)
    for file in first["file"]:
        assert (raw / "wav" / file).read_bytes() == (tmp_path / "again" / "wav" / file).read_bytes()


def source_of(raw: Path) -> dict:
    return json.loads((raw / "source.json").read_text())


def test_a_synthesis_hashes_its_steps_and_names_the_first_that_differs_from_its_reference(
    speech_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    first = source_of(speech_dirs[0])
    assert set(first["steps"]) == {"espeak_output", "resampled_16k", "clips"} and first["reference"].startswith("no reference")
    reference = {key: first[key] for key in ("espeak_ng", "fingerprint", "steps")}
    fetch(str(tmp_path / "same"), commands=TINY_COMMANDS, seed=3, espeak=TINY_ESPEAK, reference=reference)
    assert source_of(tmp_path / "same")["reference"] == f"same data as the reference ({first['espeak_ng']})"
    # Another espeak-ng build, as a louder one stands for it here: its first step differs, and fetch says so.
    louder = tmp_path / "espeak-ng"
    louder.write_text(f'#!/bin/sh\nexec {shutil.which("espeak-ng")} -a 60 "$@"\n')
    louder.chmod(0o755)
    fetch(str(tmp_path / "louder"), commands=TINY_COMMANDS, seed=3, espeak={**TINY_ESPEAK, "binary": str(louder)}, reference=reference)
    other = source_of(tmp_path / "louder")
    assert other["fingerprint"] == first["fingerprint"]  # where espeak-ng lies is not a setting of the data
    assert all(other["steps"][step] != first["steps"][step] for step in first["steps"])
    assert other["reference"].startswith(
        "DIFFERS from the reference from step espeak_output on (made with the same espeak-ng version): this machine's espeak-ng build"
    )
    fetch(str(tmp_path / "more"), commands=TINY_COMMANDS, seed=4, espeak=TINY_ESPEAK, reference=reference)
    assert source_of(tmp_path / "more")["reference"].startswith("no reference for these settings")
    # Same espeak-ng output, other numerics after it: the step named is the resampler's.
    resampled = {**first["steps"], "resampled_16k": "0" * 64, "clips": "1" * 64}
    assert "from step resampled_16k on" in reference_check(reference, first["fingerprint"], "eSpeak NG 2.0", resampled)
    assert "made with " + first["espeak_ng"] in reference_check(reference, first["fingerprint"], "eSpeak NG 2.0", resampled)


def test_splits_are_speaker_disjoint(speech_dirs: tuple[Path, Path]) -> None:
    manifest = read_manifest(speech_dirs[0])
    speakers = manifest[manifest["speaker"] != ""].groupby("split")["speaker"].agg(set)
    assert set(speakers.index) == {"train", "val", "test"}
    assert not (speakers["train"] & speakers["val"] or speakers["train"] & speakers["test"] or speakers["val"] & speakers["test"])
    assert set(manifest.loc[manifest["label"] == "silence", "split"]) == {"train", "val", "test"}


def test_the_default_split_holds_whole_voices_out_of_training(tmp_path: Path, compose_cfg: Callable[..., DictConfig]) -> None:
    assert compose_cfg("task=speech").task.fetch.espeak.split_by == "voice"
    # Twelve speakers of six voices (2 accents x 3 variants) at several rates and pitches; no split_by: the default.
    espeak = {key: value for key, value in TINY_ESPEAK.items() if key != "split_by"} | {"num_speakers": 12, "variants": ["m1", "f2", "m3"]}
    fetch(str(tmp_path / "raw"), commands=TINY_COMMANDS, seed=3, espeak=espeak)
    assert json.loads((tmp_path / "raw" / "source.json").read_text())["held_out"] == "voice"
    manifest = read_manifest(tmp_path / "raw")
    spoken = manifest[manifest["speaker"] != ""]
    voices = (spoken["accent"] + "+" + spoken["variant"]).groupby(spoken["split"]).agg(set)
    assert set(voices.index) == {"train", "val", "test"}
    assert not (voices["train"] & voices["val"] or voices["train"] & voices["test"] or voices["val"] & voices["test"])
    assert spoken.groupby("speaker")["split"].nunique().max() == 1  # voice-disjoint is speaker-disjoint too
    # Clips of one held-out voice are not independent: compare resamples test clips by voice.
    preprocess(str(tmp_path / "raw"), str(tmp_path / "processed"))
    data = SpeechDataModule(str(tmp_path / "processed"))
    data.setup()
    assert data.metadata["held_out"] == "voice"
    by_file = manifest.set_index("file")
    expected = [
        f"{by_file.at[f, 'accent']}+{by_file.at[f, 'variant']}" if by_file.at[f, "speaker"] else "(silence)"
        for f in data.test_units()["unit"]
    ]
    assert data.test_units()["group"].tolist() == expected
    assert set(expected) - {"(silence)"} == voices["test"]


def test_an_unknown_split_unit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"task.fetch.espeak.split_by='accent' is not a way to split; choose one of \['voice', 'speaker'\]"):
        fetch_tiny(tmp_path / "raw", split_by="accent")
    assert not (tmp_path / "raw").exists()


def test_speaker_split_sizes_and_determinism() -> None:
    speakers = [f"speaker{i}" for i in range(200)]
    first = assign_splits(speakers, 0.1, 0.15, np.random.default_rng(1))
    assert first == assign_splits(speakers, 0.1, 0.15, np.random.default_rng(1))
    assert first != assign_splits(speakers, 0.1, 0.15, np.random.default_rng(2))
    assert sorted(first) == sorted(speakers)
    assert pd.Series(first).value_counts().to_dict() == {"train": 150, "test": 30, "val": 20}
    assert split_sizes(3, 0.1, 0.1) == {"train": 1, "val": 1, "test": 1}
    with pytest.raises(DataError, match="at least 3 speakers"):
        split_sizes(2, 0.1, 0.1)
    with pytest.raises(DataError, match="sum below 1"):
        split_sizes(100, 0.5, 0.5)


def test_features_are_log_mel_frames_normalised_with_train_statistics(speech_dirs: tuple[Path, Path]) -> None:
    raw, processed = speech_dirs
    metadata = json.loads((processed / "metadata.json").read_text())
    assert metadata["num_frames"] == 51 and metadata["num_features"] == 40
    assert metadata["class_names"] == ["yes", "no", "unknown", "silence"]
    splits = json.loads((processed / "splits.json").read_text())
    manifest = read_manifest(raw).set_index("file")
    for split in ("train", "val", "test"):
        tensors = torch.load(processed / f"{split}.pt", weights_only=True)
        assert tensors["features"].shape == (len(splits[split]), 51, 40) and tensors["features"].dtype == torch.float32
        labels = [metadata["class_names"][i] for i in tensors["labels"]]
        assert labels == manifest.loc[splits[split], "label"].tolist()
    train = torch.load(processed / "train.pt", weights_only=True)["features"]
    assert torch.allclose(train.mean(dim=(0, 1)), torch.zeros(40), atol=1e-4)
    assert torch.allclose(train.std(dim=(0, 1)), torch.ones(40), atol=1e-3)
    # The statistics are those of the train clips alone.
    waves = torch.stack([torch.from_numpy(read_wav(raw / "wav" / f, convert=False)[0]) for f in splits["train"]])
    assert torch.allclose(log_mel(waves, 40, 25, 20).mean(dim=(0, 1)), torch.tensor(metadata["normalisation"]["mean"]), atol=1e-4)
    statistics = np.array([metadata["normalisation"][key] for key in ("mean", "std")]) * 2**20  # on their grid
    assert np.array_equal(statistics, np.round(statistics)) and len(np.unique(statistics)) > 40
    # Each test clip and its speaker, in test order: the units and groups of compare's per-speaker resampling.
    data = SpeechDataModule(processed, limit_test=7)
    data.setup()
    units = data.test_units()
    assert units["unit"].tolist() == splits["test"][:7]
    speakers = manifest.loc[splits["test"][:7], "speaker"].replace("", "(silence)")
    assert units["group"].tolist() == speakers.tolist() and units["group"].nunique() > 1  # split_by=speaker: speakers
    assert metadata["held_out"] == "speaker"


def test_log_mel_values_lie_on_the_feature_grid(speech_dirs: tuple[Path, Path]) -> None:
    raw, _ = speech_dirs
    waves = torch.stack([torch.from_numpy(read_wav(path, convert=False)[0]) for path in sorted((raw / "wav").rglob("*.wav"))])
    frames = log_mel(waves, 40, 25, 20)
    assert frames.dtype == torch.float32 and frames.shape == (len(waves), 51, 40)
    steps = frames.to(torch.float64) / FEATURE_GRID
    assert torch.equal(steps, steps.round()) and steps.unique().numel() > 1000


class BatchRecorder(L.Callback):
    """Keeps the batches the model saw, after the data module's on_after_batch_transfer."""

    def __init__(self) -> None:
        self.batches: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: list, batch_idx: int) -> None:
        self.batches["train"].append(batch[0])

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: list, *args: int) -> None:
        self.batches["val"].append(batch[0])


def fit_one_epoch(dm: SpeechDataModule, tmp_path: Path) -> dict[str, list[torch.Tensor]]:
    recorder = BatchRecorder()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[recorder], num_sanity_val_steps=0)
    trainer.fit(make_speech_classifier(), datamodule=dm)
    return recorder.batches


def masked_bins_and_frames(features: torch.Tensor) -> tuple[int, int]:
    """How many (example, mel bin) and (example, frame) slices are entirely zero (masked)."""
    zero = features == 0
    return int(zero.all(dim=1).sum()), int(zero.all(dim=2).sum())


def test_spec_augment_masks_training_batches_only(speech_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    L.seed_everything(0)
    batches = fit_one_epoch(SpeechDataModule(str(speech_dirs[1]), batch_size=4, spec_augment={"freq_mask": 20, "time_mask": 25}), tmp_path)
    train = torch.cat(batches["train"])
    bins, frames = masked_bins_and_frames(train)
    assert bins > 0 and frames > 0
    assert not torch.equal(train[0] == 0, train[1] == 0)  # a different mask per example
    assert all(masked_bins_and_frames(features) == (0, 0) for features in batches["val"])
    plain = fit_one_epoch(SpeechDataModule(str(speech_dirs[1]), batch_size=4, spec_augment=None), tmp_path)
    assert all(masked_bins_and_frames(features) == (0, 0) for features in plain["train"])


def test_datamodule_serves_frames_and_names_the_classes(speech_dirs: tuple[Path, Path]) -> None:
    dm = SpeechDataModule(str(speech_dirs[1]), batch_size=4)
    dm.setup()
    features, labels = next(iter(dm.train_dataloader()))
    assert features.shape == (4, 51, 40) and labels.dtype == torch.long
    assert dm.front_end_dims == {"num_features": 40}
    assert dm.head_dims == {"num_classes": 4, "class_names": ["yes", "no", "unknown", "silence"]}


def test_smoke_and_default_configs_compose(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("task=speech")
    assert cfg.task.fetch.commands == ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
    assert cfg.task.fetch.espeak.num_speakers >= 200
    smoke = compose_cfg("task=speech", "profile=smoke")
    assert smoke.task.fetch.espeak.num_speakers < cfg.task.fetch.espeak.num_speakers
    assert smoke.task.front_end._target_ == "rnnlab.models.front_ends.DenseFeatures"


# --- the Speech Commands folder layout ---------------------------------------------------


# The tiny tree of the speechcommands_root fixture (conftest.py) has one odd file: yes/aaaa1111_nohash_1.wav, 8 kHz stereo.


def test_speechcommands_folder_is_read_into_the_raw_format(speechcommands_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    fetch(str(raw), source="speechcommands", commands=["yes", "no"], speechcommands_root=str(speechcommands_root))
    manifest = read_manifest(raw)
    source = json.loads((raw / "source.json").read_text())
    assert source["classes"] == ["yes", "no", "unknown", "silence"] and source["converted"] == 1
    words = manifest[manifest["label"] != "silence"]
    assert words.groupby("split")["speaker"].agg(set).to_dict() == {"train": {"aaaa1111"}, "val": {"bbbb2222"}, "test": {"cccc3333"}}
    assert words.loc[words["word"] == "bed", "label"].unique().tolist() == ["unknown"]
    assert manifest.loc[manifest["label"] == "silence", "split"].tolist() == ["train"] * 3 + ["val", "test"]
    # The 8 kHz stereo file was resampled and downmixed.
    rate, samples = wavfile.read(raw / "wav" / "yes" / "yes_aaaa1111_1.wav")
    assert rate == SAMPLE_RATE and samples.shape == (SAMPLE_RATE,)
    preprocess(str(raw), str(tmp_path / "processed"))
    assert torch.load(tmp_path / "processed" / "train.pt", weights_only=True)["features"].shape == (4 + 3, 51, 40)


def test_speechcommands_odd_files_are_refused_without_conversion(speechcommands_root: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"aaaa1111_nohash_1.wav has 2 channels, expected mono and 8000 Hz, expected 16000 Hz.*convert_audio=true"
    ):
        fetch(str(tmp_path / "raw"), source="speechcommands", speechcommands_root=str(speechcommands_root), convert_audio=False)
    assert not (tmp_path / "raw").exists()


def test_speechcommands_folder_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"SpeechCommands/speech_commands_v0\.02 does not exist"):
        fetch(str(tmp_path / "raw"), source="speechcommands", speechcommands_root=str(tmp_path))
    (tmp_path / "SpeechCommands" / "speech_commands_v0.02" / "yes").mkdir(parents=True)
    with pytest.raises(DataError, match=r"validation_list\.txt is missing"):
        fetch(str(tmp_path / "raw"), source="speechcommands", speechcommands_root=str(tmp_path))
    for name in ("validation_list.txt", "testing_list.txt"):
        (tmp_path / "SpeechCommands" / "speech_commands_v0.02" / name).write_text("")
    with pytest.raises(DataError, match="the silence class is cut from the background noise files"):
        fetch(str(tmp_path / "raw"), source="speechcommands", speechcommands_root=str(tmp_path))


# --- bad input ---------------------------------------------------------------------------


def test_missing_espeak_ng_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not installed.*sudo apt-get install espeak-ng.*make install"):
        fetch_tiny(tmp_path / "raw", binary="/nonexistent/espeak-ng")
    assert not (tmp_path / "raw").exists()


def test_failing_espeak_ng_is_reported_with_its_command_and_stderr(tmp_path: Path) -> None:
    broken = tmp_path / "espeak-ng"
    broken.write_text("#!/bin/sh\necho 'cannot open phoneme data' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(DataError, match=rf"`{re.escape(str(broken))} --version` failed \(exit code 3\): cannot open phoneme data"):
        espeak_version(str(broken))
    with pytest.raises(DataError, match=rf"`{re.escape(str(broken))} --voices` failed \(exit code 3\): cannot open phoneme data"):
        check_voices(str(broken), ["en-us"], ["m1"])


def test_unknown_espeak_voice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no accent \['en-xx-nowhere'\]"):
        fetch_tiny(tmp_path / "raw", accents=["en-us", "en-xx-nowhere"])
    with pytest.raises(DataError, match=r"no variant \['m99'\]"):
        fetch_tiny(tmp_path / "raw", variants=["m1", "m99"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_speakers": 2}, "at least 3 speakers"),
        ({"num_speakers": 999}, "num_speakers=999"),
        ({"silence_clips": 2}, "at least 3 silence clips"),
        ({"loudness": 3}, "loudness"),
    ],
)
def test_bad_synthesis_settings_are_refused(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        fetch_tiny(tmp_path / "raw", **settings)


def test_commands_must_be_words(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="quote yes/no/on/off"):
        fetch(str(tmp_path / "raw"), commands=[True, False], espeak=TINY_ESPEAK)


def test_wav_reader_resamples_or_refuses_naming_the_mismatch(tmp_path: Path) -> None:
    write_tone(tmp_path / "fast.wav", rate=44100, seconds=0.5)
    with pytest.raises(DataError, match=r"fast.wav has 44100 Hz, expected 16000 Hz"):
        read_wav(tmp_path / "fast.wav", convert=False)
    audio, note = read_wav(tmp_path / "fast.wav", convert=True)
    assert audio.shape == (8000,) and audio.dtype == np.float32 and "44100 Hz" in note
    levels = np.round(audio.astype(np.float64) * 32767)  # resampled onto the 16-bit levels a WAV is read as
    assert np.array_equal(audio, (levels / 32767).astype(np.float32)) and len(np.unique(levels)) > 100
    write_tone(tmp_path / "ok.wav")
    assert read_wav(tmp_path / "ok.wav", convert=False)[1] is None
    (tmp_path / "bad.wav").write_bytes(b"not a wav file")
    with pytest.raises(DataError, match=r"bad\.wav is not a readable WAV file"):
        read_wav(tmp_path / "bad.wav", convert=True)


def test_preprocess_refuses_raw_data_that_breaks_speaker_disjointness(speech_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run the fetch stage first"):
        preprocess(str(tmp_path / "nothing"), str(tmp_path / "out"))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "wav").symlink_to(speech_dirs[0] / "wav")
    (raw / "source.json").write_text((speech_dirs[0] / "source.json").read_text())
    manifest = read_manifest(speech_dirs[0])
    speaker = manifest.loc[manifest["split"] == "test", "speaker"].iloc[0]
    manifest.loc[(manifest["speaker"] == speaker) & (manifest["label"] == "yes"), "split"] = "train"
    manifest.to_csv(raw / "manifest.csv", index=False)
    with pytest.raises(DataError, match=re.escape(f"speaker '{speaker}' is in more than one split")):
        preprocess(str(raw), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- learning ----------------------------------------------------------------------------


def make_speech_classifier(cell: str = "torch.nn.GRU") -> SequenceClassifier:
    return SequenceClassifier(
        front_end={"_target_": "rnnlab.models.front_ends.DenseFeatures", "num_features": 40},
        encoder={"cell": cell, "hidden_size": 32},
        optimizer={"_target_": "torch.optim.Adam", "lr": 0.02},
        scheduler=None,
        num_classes=4,
        class_names=["yes", "no", "unknown", "silence"],
    )


def test_classifier_overfits_one_batch_of_speech_features(speech_dirs: tuple[Path, Path]) -> None:
    L.seed_everything(0)
    tensors = torch.load(speech_dirs[1] / "train.pt", weights_only=True)
    features, labels = tensors["features"], tensors["labels"]
    model = make_speech_classifier()
    assert fit_one_batch(model, features, labels, steps=50) < 0.05
    assert (model(features).argmax(-1) == labels).all()


def test_testing_reports_accuracy_f1_and_draws_the_confusion_matrix(speech_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    dm = SpeechDataModule(str(speech_dirs[1]), batch_size=4)
    model = make_speech_classifier()
    results = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert {"test_acc", "test_f1", "test_auroc", "test_loss"} <= set(results)
    test = torch.load(speech_dirs[1] / "test.pt", weights_only=True)
    with torch.no_grad():
        predicted = model(test["features"]).argmax(-1).numpy()
    labels = test["labels"].numpy()
    assert results["test_acc"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    # Macro F1: the mean over classes, leaving out a class neither present nor predicted, as torchmetrics does.
    expected_f1 = f1_score(labels, predicted, average="macro", labels=sorted(set(labels) | set(predicted)), zero_division=0)
    assert results["test_f1"] == pytest.approx(expected_f1, abs=1e-6)
    assert (tmp_path / "figures" / "confusion_matrix.png").stat().st_size > 0
