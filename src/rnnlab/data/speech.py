"""Spoken commands: fetch (synthesise with espeak-ng, or read Speech Commands), preprocess, DataModule.

The default source speaks the ten command words, other words (the `unknown` class) and
background noise (the `silence` class) with espeak-ng: each speaker is an accent x voice
variant x speaking rate x pitch, and every clip gets a random time shift, gain and
additive noise. Users with the real archive read it through torchaudio's SPEECHCOMMANDS.
Both write the same raw format: 16 kHz mono 16-bit WAVs plus manifest.csv with
(file, label, word, speaker, split). Splits are speaker-disjoint.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchaudio
from scipy.io import wavfile
from torch import nn
from torchaudio.datasets import SPEECHCOMMANDS

from rnnlab import io, streams
from rnnlab.console import progress, summary
from rnnlab.data.base import SPLITS, SplitTensorDataModule, read_csv, read_processed_json, save_split
from rnnlab.errors import DataError

SAMPLE_RATE = 16000  # every clip is one second at this rate
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "unknown", "silence"
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "label", "word", "speaker", "split")
NOISE_KINDS = ("white", "pink", "brown", "hum")
INSTALL_HINT = "install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu) or `make install`"


def class_names(commands: Sequence[str]) -> list[str]:
    return [*commands, UNKNOWN, SILENCE]


# --- audio helpers -----------------------------------------------------------------------


def read_wav(path: str | Path, convert: bool) -> tuple[np.ndarray, str | None]:
    """A WAV file as float32 mono samples at 16 kHz in [-1, 1], and what was done to it (None if nothing).

    With `convert`, other sample rates are resampled and several channels averaged;
    without it such files are refused, naming the mismatch.
    """
    try:
        rate, data = wavfile.read(path)
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable WAV file ({err}).") from err
    return conform(data, rate, path, convert)


def conform(data: np.ndarray, rate: int, path: str | Path, convert: bool) -> tuple[np.ndarray, str | None]:
    """read_wav's samples of the WAV file at `path` as float32 mono at 16 kHz, and what was done to them."""
    if data.dtype.kind == "f":
        audio = data.astype(np.float32)
    elif data.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        audio = (data.astype(np.float32) - 128) / 128
    else:
        audio = data.astype(np.float32) / np.iinfo(data.dtype).max
    if audio.size == 0:
        raise DataError(f"{path} holds no samples.")
    problems, conversions = [], []
    if audio.ndim == 2:
        problems.append(f"{audio.shape[1]} channels, expected mono")
        conversions.append(f"downmixed from {audio.shape[1]} channels to mono")
    if rate != SAMPLE_RATE:
        problems.append(f"{rate} Hz, expected {SAMPLE_RATE} Hz")
        conversions.append(f"resampled from {rate} Hz to {SAMPLE_RATE} Hz")
    if not problems:
        return audio, None
    if not convert:
        raise DataError(
            f"{path} has {' and '.join(problems)}; convert it yourself, or set task.fetch.convert_audio=true "
            f"and it will be {' and '.join(conversions)}."
        )
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        resampled = torchaudio.functional.resample(torch.from_numpy(audio.astype(np.float64)), rate, SAMPLE_RATE).numpy()
        audio = to_16_bit_grid(resampled)
    return audio, " and ".join(conversions)


# Data made on one CPU should be the bytes made on any other (docs/reliability.md). Convolutions, FFTs and sums run in
# an order that depends on the CPU's vector width and on the library's kernel (oneDNN, MKL), so the audio and feature
# steps compute in float64 and round to a grid far coarser than float64's rounding error: the 16-bit levels the clips
# are stored as, 2**-10 for log-mel values, 2**-20 for their normalisation statistics. A value then differs between
# CPUs only if it lies within that error (at most about 1e-11, for a quiet mel bin of a loud frame) of a grid
# boundary: unlikely, not impossible. Element-wise arithmetic on grid values is IEEE's, the same everywhere.
FEATURE_GRID = 2.0**-10
STATISTICS_GRID = 2.0**-20


def to_16_bit_grid(audio: np.ndarray) -> np.ndarray:
    """float64 samples rounded to the 16-bit levels conform reads WAVs as (k / 32767), as float32."""
    return (np.round(np.clip(audio, -1, 1) * 32767) / 32767).astype(np.float32)


def on_grid(values: torch.Tensor, step: float) -> torch.Tensor:
    """float64 values rounded to multiples of `step`, as float32 (exact: 2**-20 steps below 16 fit its 24 bits)."""
    return (torch.round(values / step) * step).to(torch.float32)


def write_wav(path: Path, audio: np.ndarray) -> np.ndarray:
    """Write 16-bit samples at 16 kHz; return them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    wavfile.write(path, SAMPLE_RATE, samples)
    return samples


def fit_length(audio: np.ndarray, length: int = SAMPLE_RATE) -> np.ndarray:
    """Zero-pad at the end or cut to `length` samples."""
    return np.pad(audio[:length], (0, max(0, length - len(audio))))


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio)))) + 1e-12


def make_noise(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS background noise: white, pink (1/f), brown (1/f^2) or mains hum with harmonics."""
    white = rng.standard_normal(length)
    if kind == "white":
        noise = white
    elif kind in ("pink", "brown"):
        freqs = np.fft.rfftfreq(length)
        freqs[0] = freqs[1]
        exponent = 0.5 if kind == "pink" else 1.0  # amplitude slope of 1/f and 1/f^2 power
        noise = np.fft.irfft(np.fft.rfft(white) / freqs**exponent, length)
    elif kind == "hum":
        t = np.arange(length) / SAMPLE_RATE
        mains = rng.choice([50, 60])
        noise = sum(np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6)) + 0.1 * white
    else:
        raise DataError(f"Unknown noise kind {kind!r}; choose from {list(NOISE_KINDS)}.")
    return noise / rms(noise)


def trim_silence(audio: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Cut the leading and trailing samples below `threshold` x the peak (espeak-ng pads its output)."""
    loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
    return audio[loud[0] : loud[-1] + 1] if len(loud) else audio


@dataclass(frozen=True)
class Augmentation:
    """Random level, placement and noise of a clip (ranges in dB, low and high)."""

    gain_db: tuple[float, float] = (-18.0, -1.0)  # peak level of a word
    snr_db: tuple[float, float] = (5.0, 30.0)  # word to added noise
    silence_db: tuple[float, float] = (-60.0, -20.0)  # RMS level of a silence clip

    def word_clip(self, speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A one-second clip with the word at a random time shift, gain and signal-to-noise ratio."""
        if len(speech) > SAMPLE_RATE:
            raise DataError(
                f"A word lasts {len(speech) / SAMPLE_RATE:.2f} s, longer than a clip; raise the lowest of task.fetch.espeak.rates."
            )
        speech = speech / np.abs(speech).max() * 10 ** (rng.uniform(*self.gain_db) / 20)
        clip = np.zeros(SAMPLE_RATE)
        offset = rng.integers(0, SAMPLE_RATE - len(speech) + 1)
        clip[offset : offset + len(speech)] = speech
        noise_level = rms(speech) * 10 ** (-rng.uniform(*self.snr_db) / 20)
        return clip + noise_level * make_noise(rng.choice(NOISE_KINDS), SAMPLE_RATE, rng)

    def silence_clip(self, rng: np.random.Generator) -> np.ndarray:
        return make_noise(rng.choice(NOISE_KINDS), SAMPLE_RATE, rng) * 10 ** (rng.uniform(*self.silence_db) / 20)


# --- splits ------------------------------------------------------------------------------


def split_sizes(n: int, val_fraction: float, test_fraction: float, what: str = "speakers") -> dict[str, int]:
    """How many of `n` items (speakers, silence clips) go to each split; at least one each."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum below 1.")
    if n < 3:
        raise DataError(f"Need at least 3 {what} (one per split), got {n}.")
    val, test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    return {"train": n - val - test, "val": val, "test": test}


def assign_splits(
    items: Sequence[str], val_fraction: float, test_fraction: float, rng: np.random.Generator, what: str = "speakers"
) -> dict[str, str]:
    """A random item -> split map with the sizes of `split_sizes`."""
    order = rng.permutation(len(items))
    sizes = split_sizes(len(items), val_fraction, test_fraction, what)
    names = [split for split in SPLITS for _ in range(sizes[split])]
    return {items[i]: split for i, split in zip(order, names, strict=True)}


# --- espeak-ng synthesis -----------------------------------------------------------------


def voice_name(accent: str, variant: str) -> str:
    """An espeak-ng voice as espeak-ng's -v option takes it, accent+variant: what split_by=voice holds out."""
    return f"{accent}+{variant}"


@dataclass(frozen=True)
class Speaker:
    accent: str  # an espeak-ng English voice, e.g. en-gb-scotland
    variant: str  # an espeak-ng voice variant, e.g. f3
    rate: int  # words per minute
    pitch: int  # 0-99

    @property
    def voice(self) -> str:
        return voice_name(self.accent, self.variant)

    @property
    def name(self) -> str:
        return f"{self.voice}-r{self.rate}-p{self.pitch}"


def run_espeak(command: list[str]) -> str:
    """The standard output of an espeak-ng command, or a DataError quoting the command and its stderr."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"`{' '.join(command)}` failed (exit code {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def espeak_version(binary: str) -> str:
    """The espeak-ng version line without where its data lie (a path of this machine, which would make the raw
    data differ between machines), or a DataError saying how to install it."""
    if shutil.which(binary) is None:
        raise DataError(f"espeak-ng ({binary!r}) is not installed or not on PATH; {INSTALL_HINT}.")
    return run_espeak([binary, "--version"]).split("Data at:")[0].strip()


def check_voices(binary: str, accents: Sequence[str], variants: Sequence[str]) -> None:
    """espeak-ng silently falls back to a default voice for unknown names, so check them first."""
    listing = run_espeak([binary, "--voices"])
    # Columns: Pty Language Age/Gender VoiceName File (OtherLanguage priority)...; each name selects a voice.
    languages = set()
    for fields in (line.split() for line in listing.splitlines()[1:]):
        if len(fields) >= 5:
            _, language, _, name, file, *others = fields
            languages |= {language, name, Path(file).name, *(other.strip("(") for other in others[::2])}
    listing = run_espeak([binary, "--voices=variant"])
    known_variants = {line.split("!v/", 1)[1].split()[0] for line in listing.splitlines() if "!v/" in line}
    for kind, wanted, known in (("accent", accents, languages), ("variant", variants, known_variants)):
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise DataError(f"espeak-ng has no {kind} {unknown}; `{binary} --voices{'=variant' if kind == 'variant' else ''}` lists them.")


# The unit a split is drawn over, per task.fetch.espeak.split_by.
SPLIT_UNITS: dict[str, Callable[[Speaker], str]] = {"voice": lambda speaker: speaker.voice, "speaker": lambda speaker: speaker.name}


@dataclass(frozen=True)
class Synthesis:
    """Who says what: speakers drawn from accents x variants x rates x pitches, and how many clips."""

    accents: Sequence[str]  # espeak-ng English voices, e.g. en-gb-scotland
    variants: Sequence[str]  # espeak-ng voice variants, e.g. f3
    rates: Sequence[int]  # words per minute
    pitches: Sequence[int]  # 0-99
    num_speakers: int
    unknown_words: Sequence[str]
    unknown_per_speaker: int  # random words of the unknown class per speaker
    takes: int  # clips of each command word per speaker (same voice, new shift, gain and noise)
    silence_clips: int
    binary: str = "espeak-ng"
    # What no two splits share: "voice" (accent x variant: a test voice is never heard in training, at any rate
    # or pitch) or "speaker" (one accent x variant x rate x pitch: test speakers may share a training speaker's voice).
    split_by: str = "voice"

    def sample_speakers(self, rng: np.random.Generator) -> list[Speaker]:
        """`num_speakers` distinct accent x variant x rate x pitch combinations."""
        combinations = list(itertools.product(self.accents, self.variants, self.rates, self.pitches))
        if not 0 < self.num_speakers <= len(combinations):
            raise DataError(
                f"num_speakers={self.num_speakers} must be between 1 and {len(combinations)} (accents x variants x rates x pitches)."
            )
        return [Speaker(*combinations[i]) for i in sorted(rng.choice(len(combinations), self.num_speakers, replace=False))]


def speak(binary: str, speaker: Speaker, word: str) -> tuple[np.ndarray, np.ndarray]:
    """The word as spoken by `speaker`: espeak-ng's own samples (22,050 Hz), and the word at 16 kHz with leading and
    trailing silence removed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "word.wav"
        command = [binary, "-v", speaker.voice, "-s", str(speaker.rate), "-p", str(speaker.pitch), "-w", str(path), word]
        run_espeak(command)
        try:
            rate, spoken = wavfile.read(path)
        except (ValueError, OSError) as err:
            raise DataError(f"`{' '.join(command)}` wrote no readable WAV file ({err}).") from err
    audio, _ = conform(spoken, rate, f"espeak-ng's WAV of {word!r}", convert=True)
    return spoken, trim_silence(audio)


# The steps of a synthesis whose output fetch hashes into source.json (`steps`), in order: espeak-ng's samples, the
# words at 16 kHz (torchaudio's resampler), the written clips (augmentation). Machines that differ in the first step
# differ in their espeak-ng build; in a later one only, in that step's numerics.
STEPS = ("espeak_output", "resampled_16k", "clips")


def reference_check(reference: dict[str, Any] | None, fingerprint: str, espeak_ng: str, steps: dict[str, str]) -> str:
    """How this fetch's step hashes compare with `reference` (task.fetch.reference: the hashes that the committed data
    had, for the settings of `fingerprint` and the espeak-ng version it names): the first step that differs is named."""
    if not reference:
        return "no reference (task.fetch.reference: null)"
    if reference.get("fingerprint") != fingerprint:
        return "no reference for these settings (task.fetch.reference is for the default profile's)"
    differs = [step for step in STEPS if reference.get("steps", {}).get(step) != steps[step]]
    if not differs:
        return f"same data as the reference ({reference.get('espeak_ng')})"
    version = "the same espeak-ng version" if reference.get("espeak_ng") == espeak_ng else f"{reference.get('espeak_ng')}"
    return (
        f"DIFFERS from the reference from step {differs[0]} on (made with {version}): this machine's "
        f"{'espeak-ng build speaks' if differs[0] == 'espeak_output' else 'numerics compute'} differently, so its speech "
        "data and results differ from the committed ones (docs/reliability.md)"
    )


def synthesize(
    settings: Synthesis, augmentation: Augmentation, commands: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, str], Iterator[tuple[dict[str, Any], np.ndarray]]]:
    """Speak every (speaker, word) once, then return the hashes of the first two STEPS and a generator of
    (manifest row, one-second clip) for every command take, unknown word and silence clip.

    Every clip draws its augmentation from its own generator seeded by (seed, clip number),
    so the data set depends on the seed only.
    """
    if not 0 <= settings.unknown_per_speaker <= len(settings.unknown_words) or settings.takes <= 0 or settings.silence_clips <= 0:
        raise DataError(
            f"Need takes ({settings.takes}) and silence_clips ({settings.silence_clips}) positive and unknown_per_speaker "
            f"({settings.unknown_per_speaker}) between 0 and the {len(settings.unknown_words)} unknown words."
        )
    if settings.split_by not in SPLIT_UNITS:
        raise DataError(f"task.fetch.espeak.split_by={settings.split_by!r} is not a way to split; choose one of {list(SPLIT_UNITS)}.")
    check_voices(settings.binary, settings.accents, settings.variants)
    rng = np.random.default_rng(seed)
    speakers = settings.sample_speakers(rng)
    unit_of = SPLIT_UNITS[settings.split_by]
    units = list(dict.fromkeys(unit_of(speaker) for speaker in speakers))  # in speaker order: split_by=speaker draws as it always did
    unit_split = assign_splits(units, val_fraction, test_fraction, rng, f"{settings.split_by}s")
    speaker_split = {speaker.name: unit_split[unit_of(speaker)] for speaker in speakers}
    plan = []  # (speaker, word, label, take)
    for speaker in speakers:
        plan += [(speaker, word, word, take) for word in commands for take in range(settings.takes)]
        unknown = rng.choice(list(settings.unknown_words), settings.unknown_per_speaker, replace=False)
        plan += [(speaker, str(word), UNKNOWN, 0) for word in unknown]
    noise_split = assign_splits([str(i) for i in range(settings.silence_clips)], val_fraction, test_fraction, rng, "silence clips")

    utterances = sorted({(speaker, word) for speaker, word, _, _ in plan}, key=lambda u: (u[0].name, u[1]))
    hashes = {step: hashlib.sha256() for step in STEPS[:2]}
    speech = {}
    with ThreadPoolExecutor() as pool:  # espeak-ng runs as one subprocess per word
        spoken = pool.map(lambda u: speak(settings.binary, *u), utterances)  # in the order of `utterances`
        for utterance, (samples, audio) in zip(
            utterances, progress(spoken, "Synthesising words with espeak-ng", total=len(utterances)), strict=True
        ):
            hashes["espeak_output"].update(samples.tobytes())
            hashes["resampled_16k"].update(audio.astype(np.float32).tobytes())
            speech[utterance] = audio

    def clips() -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        for number, (speaker, word, label, take) in enumerate(plan):
            clip = augmentation.word_clip(speech[speaker, word], np.random.default_rng([seed, number]))
            row = {"file": f"{label}/{speaker.name}_{word}_{take}.wav", "label": label, "word": word, "speaker": speaker.name}
            voice = {"accent": speaker.accent, "variant": speaker.variant, "rate": speaker.rate, "pitch": speaker.pitch}
            yield {**row, "split": speaker_split[speaker.name], **voice}, clip
        for i in range(settings.silence_clips):
            clip = augmentation.silence_clip(np.random.default_rng([seed, len(plan) + i]))
            yield {"file": f"{SILENCE}/noise_{i:05d}.wav", "label": SILENCE, "word": "", "speaker": "", "split": noise_split[str(i)]}, clip

    return {step: digest.hexdigest() for step, digest in hashes.items()}, clips()


# --- the real Speech Commands archive ----------------------------------------------------


def read_speechcommands(
    root: str | Path, version: str, commands: Sequence[str], val_fraction: float, test_fraction: float, convert: bool
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(manifest row, clip) pairs from <root>/SpeechCommands/<version>/, torchaudio's SPEECHCOMMANDS layout.

    Splits follow validation_list.txt and testing_list.txt (speaker-disjoint by design);
    silence clips are the one-second pieces of _background_noise_/*.wav, each file's start
    going to train, then val, then test, so no stretch of noise is in two splits.
    """
    archive = Path(root) / "SpeechCommands"
    layout = "word folders of WAVs, validation_list.txt and testing_list.txt, as unpacked from speech_commands_v0.02.tar.gz"
    if not (archive / version).is_dir():
        raise DataError(
            f"{archive / version} does not exist; task.fetch.speechcommands_root should hold SpeechCommands/{version}/ ({layout})."
        )
    subsets = {"train": "training", "val": "validation", "test": "testing"}
    try:
        datasets = {split: SPEECHCOMMANDS(root, url=version, subset=subset, download=False) for split, subset in subsets.items()}
    except FileNotFoundError as err:
        raise DataError(f"{err.filename} is missing; {archive / version} should hold {layout}.") from err
    noise_files = sorted((archive / version / "_background_noise_").glob("*.wav"))
    if not noise_files:
        raise DataError(f"No {archive / version}/_background_noise_/*.wav: the silence class is cut from the background noise files.")

    def clips() -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        for split, dataset in datasets.items():
            for n in range(len(dataset)):
                relpath, _, word, speaker, utterance = dataset.get_metadata(n)
                audio, note = read_wav(archive / relpath, convert)
                label = word if word in commands else UNKNOWN
                row = {
                    "file": f"{label}/{word}_{speaker}_{utterance}.wav",
                    "label": label,
                    "word": word,
                    "speaker": speaker,
                    "split": split,
                }
                yield {**row, "note": note}, audio
        for path in noise_files:
            audio, note = read_wav(path, convert)
            sizes = split_sizes(len(audio) // SAMPLE_RATE, val_fraction, test_fraction, f"seconds of noise in {path}")
            for i, split in enumerate([name for name in SPLITS for _ in range(sizes[name])]):
                row = {"file": f"{SILENCE}/{path.stem}_{i:04d}.wav", "label": SILENCE, "word": "", "speaker": "", "split": split}
                yield {**row, "note": note}, audio[i * SAMPLE_RATE : (i + 1) * SAMPLE_RATE]

    return clips()


# --- stages ------------------------------------------------------------------------------


def fetch(
    out_dir: str,
    source: str = "espeak",
    commands: Sequence[str] = COMMANDS,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    espeak: dict[str, Any] | None = None,
    augment: dict[str, Sequence[float]] | None = None,
    speechcommands_root: str | None = None,
    speechcommands_version: str = "speech_commands_v0.02",
    convert_audio: bool = True,
    reference: dict[str, Any] | None = None,
) -> None:
    """Write data/raw/speech/: one-second 16 kHz mono WAVs per label, manifest.csv and source.json.

    `espeak` holds the `Synthesis` settings and `augment` the `Augmentation` ranges (source=espeak);
    `speechcommands_root` is the directory holding SpeechCommands/<version>/ (source=speechcommands).
    A synthesis records the hash of each of its STEPS and how they compare with `reference` (reference_check).
    """
    if not isinstance(convert_audio, bool):  # "no" would otherwise count as true
        raise DataError(f"task.fetch.convert_audio must be true or false, got {convert_audio!r}; e.g. task.fetch.convert_audio=false.")
    if not commands or not all(isinstance(word, str) for word in commands) or len(set(commands)) < len(commands):
        raise DataError(f"task.fetch.commands must be distinct words, got {list(commands)} (quote yes/no/on/off in YAML).")
    if source == "espeak":
        try:
            settings = Synthesis(**(espeak or {}))
            augmentation = Augmentation(**{key: tuple(value) for key, value in (augment or {}).items()})
        except TypeError as err:  # a missing or misspelt setting
            raise DataError(f"task.fetch.espeak / task.fetch.augment: {err}.") from err
        origin = {"source": source, "espeak_ng": espeak_version(settings.binary), "seed": seed, "espeak": espeak, "augment": augment}
        origin["held_out"] = settings.split_by  # the effective unit, the dataclass's default included
        # The settings that decide the data (not where espeak-ng lies): a reference holds only for the settings it was made with.
        decided_by = {"commands": list(commands), "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
        decided_by |= {"espeak": {key: value for key, value in (espeak or {}).items() if key != "binary"}, "augment": augment}
        origin["fingerprint"] = hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()
        steps, clips = synthesize(settings, augmentation, commands, val_fraction, test_fraction, seed)
    elif source == "speechcommands":
        if not speechcommands_root:
            raise DataError("task.fetch.source=speechcommands needs task.fetch.speechcommands_root=<directory holding SpeechCommands/>.")
        # the root as given: no absolute path of this machine in the data (docs/reliability.md)
        origin = {"source": source, "root": str(speechcommands_root), "version": speechcommands_version, "held_out": "speaker"}
        steps, clips = (
            {},
            read_speechcommands(speechcommands_root, speechcommands_version, commands, val_fraction, test_fraction, convert_audio),
        )
    else:
        raise DataError(f"Unknown speech source {source!r}; choose espeak or speechcommands.")

    rows, converted, written = [], [], hashlib.sha256()
    with io.atomic_dir(out_dir) as tmp:
        for row, clip in progress(clips, "Writing clips"):
            note = row.pop("note", None)
            if note:
                converted.append(f"{row['file']} ({note})")
            written.update(row["file"].encode() + write_wav(tmp / "wav" / row["file"], clip).tobytes())
            rows.append(row)
        manifest = pd.DataFrame(rows, dtype=object).fillna("")  # silence clips have no speaker or voice
        manifest.to_csv(tmp / MANIFEST, index=False)
        if source == "espeak":
            origin["steps"] = {**steps, "clips": written.hexdigest()}
            origin["reference"] = reference_check(reference, origin["fingerprint"], origin["espeak_ng"], origin["steps"])
        io.write_json(
            tmp / "source.json", {**origin, "classes": class_names(commands), "clips": len(manifest), "converted": len(converted)}
        )
    speakers = manifest.loc[manifest["speaker"] != "", ["speaker", "split"]].drop_duplicates()
    summary(
        f"fetch speech ({source})",
        {
            "clips": len(manifest),
            **{f"{split} speakers": int((speakers["split"] == split).sum()) for split in SPLITS},
            "converted to 16 kHz mono": f"{len(converted)} file(s)" + (f", e.g. {converted[0]}" if converted else ""),
            **({"synthesis": origin["reference"]} if "reference" in origin else {}),
            "written": Path(out_dir) / MANIFEST,
        },
    )


def read_manifest(raw_dir: Path, classes: Sequence[str]) -> pd.DataFrame:
    """The fetch stage's manifest, checked: known labels and splits, files present, speaker-disjoint splits."""
    path = raw_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: run the fetch stage first (`python -m rnnlab.fetch task=speech`).")
    manifest = read_csv(path, f"the columns {list(MANIFEST_COLUMNS)}", dtype=str, keep_default_na=False)
    missing = set(MANIFEST_COLUMNS) - set(manifest.columns)
    if missing:
        raise DataError(f"{path} lacks the column(s) {sorted(missing)}; expected {list(MANIFEST_COLUMNS)}.")
    for column, allowed in (("label", classes), ("split", SPLITS)):
        bad = ~manifest[column].isin(allowed)
        if bad.any():
            raise DataError(f"{path} has {column} {manifest.loc[bad, column].iloc[0]!r}; expected one of {list(allowed)}.")
    absent = [f for f in manifest["file"] if not (raw_dir / "wav" / f).is_file()]
    if absent:
        raise DataError(f"{len(absent)} clip(s) of {path} are missing under {raw_dir / 'wav'}, e.g. {absent[0]}; re-run the fetch stage.")
    speakers = manifest[manifest["speaker"] != ""].groupby("speaker")["split"].nunique()
    if (speakers > 1).any():
        raise DataError(f"{path}: speaker {speakers[speakers > 1].index[0]!r} is in more than one split; splits must be speaker-disjoint.")
    return manifest


_DEFAULT_DTYPE_LOCK = threading.Lock()


@functools.cache
def mel_spectrogram(n_mels: int, n_fft: int, hop_length: int) -> torchaudio.transforms.MelSpectrogram:
    """torchaudio's mel power spectrogram in float64, window and mel filter bank computed in float64."""
    # torchaudio computes them in the default dtype: in float32, the filter bank's small entries differ between
    # CPUs by up to 2.5e-4 of their value, enough to move log-mel values across FEATURE_GRID. The default is
    # process-wide, so it is switched under a lock, once per setting and process (the transform is cached).
    with _DEFAULT_DTYPE_LOCK:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
        finally:
            torch.set_default_dtype(default)


def log_mel(waveforms: torch.Tensor, n_mels: int, window_ms: float, hop_ms: float) -> torch.Tensor:
    """Log-mel spectrogram frames [N, T, n_mels] of one-second waveforms [N, samples]."""
    power = mel_spectrogram(n_mels, round(SAMPLE_RATE * window_ms / 1000), round(SAMPLE_RATE * hop_ms / 1000))(waveforms.to(torch.float64))
    # The offset floors the log at about -14 (near-silent clips), far below any speech.
    return on_grid(torch.log(power + 1e-6), FEATURE_GRID).transpose(1, 2)


def clip_features(paths: Sequence[Path], description: str, chunk: int = 512, **log_mel_settings: float) -> torch.Tensor:
    """Log-mel frames of the clips at `paths`, read `chunk` at a time so the audio never all sits in memory."""
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    parts = []
    for part in progress(chunks, description):
        waves = np.stack([fit_length(read_wav(path, convert=False)[0]) for path in part])
        parts.append(log_mel(torch.from_numpy(waves), **log_mel_settings))
    return torch.cat(parts)


def clip_groups(rows: pd.DataFrame, held_out: str) -> list[str]:
    """Per clip, the unit its split holds out: its voice (accent+variant) or its speaker; "" for silence."""
    if held_out == "voice":
        return [
            voice_name(accent, variant) if speaker else ""
            for speaker, accent, variant in zip(rows["speaker"], rows["accent"], rows["variant"], strict=True)
        ]
    return rows["speaker"].tolist()


def preprocess(
    raw_dir: str, out_dir: str, n_mels: int = 40, window_ms: float = 25.0, hop_ms: float = 20.0, shuffle_seed: int = 1234
) -> None:
    """Log-mel features per split, normalised per mel bin with train statistics, rows shuffled."""
    if n_mels <= 0 or window_ms <= 0 or hop_ms <= 0:
        raise DataError(f"n_mels ({n_mels}), window_ms ({window_ms}) and hop_ms ({hop_ms}) must be positive.")
    raw_dir = Path(raw_dir)
    source_file = raw_dir / "source.json"
    if not source_file.is_file():
        raise DataError(f"{source_file} is missing: run the fetch stage first (`python -m rnnlab.fetch task=speech`).")
    source = json.loads(source_file.read_text())
    classes = source["classes"]
    # What the splits hold out (raw data written before fetch recorded it: speakers): each test clip's group
    # for compare's resampling, as clips of one held-out voice are not independent of each other.
    held_out = source.get("held_out", "speaker")
    manifest = read_manifest(raw_dir, classes)
    index = {name: i for i, name in enumerate(classes)}
    rng = np.random.default_rng(shuffle_seed)

    features, rows = {}, {}
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        part = part.iloc[rng.permutation(len(part))]  # shuffled once, so a prefix is a random sample
        if part.empty:
            raise DataError(f"{raw_dir / MANIFEST} has no {split} clips.")
        paths = [raw_dir / "wav" / file for file in part["file"]]
        features[split] = clip_features(paths, f"Log-mel features of {split}", n_mels=n_mels, window_ms=window_ms, hop_ms=hop_ms)
        rows[split] = part
    train = features["train"].to(torch.float64)  # statistics on a grid too, so normalising is the same everywhere
    mean = on_grid(train.mean(dim=(0, 1)), STATISTICS_GRID)
    std = on_grid(train.std(dim=(0, 1)), STATISTICS_GRID).clamp_min(1e-5)

    with io.atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            labels = torch.tensor([index[label] for label in rows[split]["label"]], dtype=torch.int64)
            save_split(tmp, split, {"features": ((features[split] - mean) / std).contiguous(), "labels": labels})
        io.write_json(tmp / "splits.json", {split: rows[split]["file"].tolist() for split in SPLITS})
        # The held-out unit of each clip, row by row: the groups of the resampling in compare ("" for silence).
        io.write_json(tmp / "groups.json", {split: clip_groups(rows[split], held_out) for split in SPLITS})
        metadata = {
            "class_names": list(classes),
            "num_classes": len(classes),
            "num_features": n_mels,
            "num_frames": int(features["train"].shape[1]),
            "features": {"kind": "log-mel", "n_mels": n_mels, "window_ms": window_ms, "hop_ms": hop_ms},
            "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
            "sizes": {split: len(rows[split]) for split in SPLITS},
            "speakers": {split: int(rows[split].loc[rows[split]["speaker"] != "", "speaker"].nunique()) for split in SPLITS},
            "held_out": held_out,
            "labels": {split: dict(sorted(Counter(rows[split]["label"]).items())) for split in SPLITS},
        }
        io.write_json(tmp / "metadata.json", metadata)
    summary(
        "preprocess speech",
        {
            **{f"{s} clips (speakers)": f"{metadata['sizes'][s]} ({metadata['speakers'][s]})" for s in SPLITS},
            "features": f"{metadata['num_frames']} frames x {n_mels} log-mel bins",
            "written": out_dir,
        },
    )


class SpeechDataModule(SplitTensorDataModule):
    """Batches of (normalised log-mel frames [B, T, n_mels], label), SpecAugment masking on training batches."""

    batch_keys = ("features", "labels")

    def __init__(self, processed_dir: str, spec_augment: dict[str, int] | None = None, **kwargs) -> None:
        super().__init__(processed_dir, **kwargs)
        self.spec_augment = None
        self._augment_stream: tuple[int, torch.Generator] | None = None
        if spec_augment:
            freq_mask, time_mask = spec_augment.get("freq_mask", 0), spec_augment.get("time_mask", 0)
            if freq_mask < 0 or time_mask < 0:
                raise DataError(f"task.data.spec_augment widths must be >= 0, got freq_mask={freq_mask}, time_mask={time_mask}.")
            # Features are [B, T, F]; torchaudio masks (..., freq, time), a different band per example.
            self.spec_augment = nn.Sequential(
                torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True),
                torchaudio.transforms.TimeMasking(time_mask, iid_masks=True),
            )

    def on_after_batch_transfer(self, batch: list[torch.Tensor], dataloader_idx: int) -> list[torch.Tensor]:
        """Mask bands of mel bins and spans of frames in training batches only (features are zero-mean, so masks are 0).

        The masks come from the run's augmentation stream, restarted each epoch (rnnlab.streams): torchaudio draws
        from torch's global generator, so it runs inside a fork of it seeded from that stream.
        """
        if self.spec_augment is None or self.trainer is None or not self.trainer.training:
            return batch
        epoch = self.trainer.current_epoch
        if self._augment_stream is None or self._augment_stream[0] != epoch:
            self._augment_stream = (epoch, streams.generator(self.seed, streams.AUGMENT, epoch))
        batch_seed = int(torch.randint(2**62, (), generator=self._augment_stream[1]))
        features, labels = batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            masked = self.spec_augment(features.transpose(1, 2)).transpose(1, 2)
        return [masked, labels]

    def test_units(self) -> pd.DataFrame:
        """Each test example is one clip; its group is the unit the splits hold out, its voice or its speaker
        (metadata `held_out`; silence clips, cut from background noise, form one group)."""
        size = len(self.datasets["test"])
        files = read_processed_json(self.processed_dir, "splits.json", self.task, ["test"])["test"][:size]
        groups = read_processed_json(self.processed_dir, "groups.json", self.task, ["test"])["test"][:size]
        return pd.DataFrame({"unit": files, "group": [group or "(silence)" for group in groups]})

    @property
    def front_end_dims(self) -> dict[str, int]:
        return {"num_features": self.metadata["num_features"]}

    @property
    def head_dims(self) -> dict[str, Any]:
        return {"num_classes": self.metadata["num_classes"], "class_names": self.metadata["class_names"]}
