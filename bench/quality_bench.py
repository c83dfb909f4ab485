"""Whisper accuracy by decoding: WER of greedy vs beam search (and faster-whisper, same weights).

Prints a markdown table and appends it (with the machine and command) to --out. Nothing here
is an assertion; the tests hold the floor (tests/test_whisper_runner.py).

Sets:
- `test-clips`: the six clips in tests/data (LibriVox + JFK, 16 kHz);
- `held-out`: real speech that is not in tests/data, from two Debian packages (short
  utterances, digits, card names, 8 and 48 kHz recordings). Get them with
      apt-get download pocketsphinx-testdata alsa-utils
      for f in *.deb; do dpkg-deb -x "$f" debs; done
  and pass `--held-out debs`.

Decodings: `greedy` (beam 1, no fallback: what Chorus did before beam search), `beam`
(the default: beam 5 with temperature fallback), and with `--faster-whisper-python PY`
faster-whisper's default transcription (beam 5, temperature fallback) run by another
interpreter that has faster-whisper installed, on the same CTranslate2 weights.

    python bench/quality_bench.py --held-out /tmp/debs --out docs/benchmarks.md \
        --faster-whisper-python /tmp/fw/bin/python
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.runner_bench import machine  # noqa: E402
from server.audio.wavfile import load_audio_16k  # noqa: E402
from server.config import RunnerConfig, WhisperConfig  # noqa: E402
from server.runners import ItemOptions, create_runner  # noqa: E402
from server.runners.whisper import assets  # noqa: E402
from server.wer import normalize_text, word_error_rate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

# Held-out clips: path under the extracted packages -> reference text (from the packages'
# own transcription files where they have one; the ALSA clips say their file names).
_PS = "usr/share/pocketsphinx/test/data"
HELD_OUT = {
    f"{_PS}/cards/001.wav": "ten of clubs",
    f"{_PS}/cards/002.wav": "four queen of clubs",
    f"{_PS}/cards/003.wav": "seven of clubs",
    f"{_PS}/cards/004.wav": "five five",
    f"{_PS}/cards/005.wav": "eight of spades four of clubs seven of hearts",
    f"{_PS}/tidigits/dhd.2934z.raw": "two nine three four zero",
    f"{_PS}/goforward.raw": "go forward ten meters",
    **{f"usr/share/sounds/alsa/{n}.wav": n.replace("_", " ").lower()
       for n in ("Front_Left", "Front_Right", "Front_Center", "Rear_Left", "Rear_Right", "Rear_Center",
                 "Side_Left", "Side_Right")},
}

_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
         "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(digits: str) -> str:
    """A numeral as spoken: 0-99 as a cardinal, longer ones digit by digit (how the held-out
    clips read them: "29340" is "two nine three four zero")."""
    n = int(digits)
    if len(digits) <= 2 and n < 20:
        return _UNITS[n]
    if len(digits) <= 2:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _UNITS[n % 10])
    return " ".join(_UNITS[int(d)] for d in digits)


def normalize(text: str) -> str:
    """server.wer's normalisation, after numerals are written as words (applied to every
    decoder alike, so the comparison is fair)."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000; "5-5" stays two numbers
    return normalize_text(re.sub(r"\d+", lambda m: f" {_number_words(m.group())} ", text))


def load(path: Path) -> np.ndarray:
    """16 kHz float32 mono: a WAV at any standard rate (resampled), or raw 16 kHz s16le."""
    if path.suffix == ".raw":
        return np.fromfile(path, "<i2").astype(np.float32) / 32768
    return load_audio_16k(path)


def sets(held_out: Path | None) -> dict[str, list[tuple[str, np.ndarray, str]]]:
    refs = json.loads((DATA / "transcripts.json").read_text())
    out = {"test-clips": [(p.name, load(p), refs[p.name]) for p in sorted(DATA.glob("*.wav"))]}
    if held_out is not None:
        out["held-out"] = [(name, load(held_out / name), ref) for name, ref in HELD_OUT.items()]
    return out


def chorus(clips: list[np.ndarray], beam_size: int, temperatures: tuple[float, ...]) -> tuple[list[str], float]:
    runner = create_runner(RunnerConfig(warmup=False, whisper=WhisperConfig(beam_size=beam_size, temperatures=temperatures)),
                           max_batch_size=8)
    runner.load()
    t0 = time.process_time()
    # One item per call, as a file transcription does with short files (and no batch effects).
    hyps = [runner.transcribe([c], [ItemOptions("en")])[0].text for c in clips]
    return hyps, time.process_time() - t0


_FW_SCRIPT = """
import json, sys
import numpy as np
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type="float32")
out = []
for path in sys.argv[2:]:
    audio = np.load(path)
    segments, _ = model.transcribe(audio, language="en")
    out.append(" ".join(s.text.strip() for s in segments))
print(json.dumps(out))
"""


def faster_whisper(python: str, clips: list[np.ndarray]) -> list[str]:
    """faster-whisper's default transcription (beam 5, temperature fallback, its VAD off) of
    each clip, on the embedded CTranslate2 weights, in a separate interpreter."""
    files = assets.resolve(RunnerConfig())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        for f in (files.model_bin, files.config_json, files.tokenizer_json):
            (model_dir / f.name).symlink_to(f)
        vocab = files.tokenizer_json.parent / "vocabulary.txt"
        if vocab.is_file():
            (model_dir / "vocabulary.txt").symlink_to(vocab)
        paths = []
        for i, c in enumerate(clips):
            paths.append(str(Path(tmp) / f"{i}.npy"))
            np.save(paths[-1], c)
        res = subprocess.run([python, "-c", _FW_SCRIPT, str(model_dir), *paths], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--held-out", type=Path, help="directory the Debian packages were extracted into")
    p.add_argument("--faster-whisper-python", help="an interpreter with faster-whisper installed")
    p.add_argument("--out", type=Path)
    p.add_argument("--show", action="store_true", help="print every hypothesis")
    args = p.parse_args()
    import torch

    decodings = {"chorus greedy (beam 1, no fallback)": (1, (0.0,)),
                 "chorus beam 5 + temperature fallback (default)": (5, WhisperConfig().temperatures)}
    rows, shown = [], []
    for set_name, items in sets(args.held_out).items():
        clips = [a for _, a, _ in items]
        refs = [normalize(r) for _, _, r in items]
        audio_s = sum(len(c) for c in clips) / 16000
        results = {}
        for label, (beam, temps) in decodings.items():
            hyps, cpu = chorus(clips, beam, temps)
            results[label] = (hyps, f"{cpu / audio_s * 1000:.0f}")
        if args.faster_whisper_python:
            results["faster-whisper 1.2 default (beam 5 + fallback), same weights"] = (faster_whisper(args.faster_whisper_python, clips), "-")
        for label, (hyps, cpu) in results.items():
            wer = word_error_rate(refs, [normalize(h) for h in hyps])
            wrong = sum(1 for r, h in zip(refs, hyps) if normalize(h) != r)
            rows.append((set_name, len(items), f"{audio_s:.0f}", label, f"{wer:.2%}", f"{wrong}/{len(items)}", cpu))
            print(f"{set_name} {label}: WER {wer:.2%}", flush=True)
            shown += [f"  [{label}] {name}: {h!r} (ref {r!r})" for (name, _, _), h, r in zip(items, hyps, refs) if normalize(h) != r]
    lines = [f"### quality_bench {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — Whisper-base (embedded weights), CPU", "",
             f"- machine: {machine('cpu', torch.get_num_threads())}",
             f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
             "- each clip transcribed alone (language en); WER after lower-casing, removing punctuation and writing "
             "numerals as words (bench/quality_bench.py `normalize`); CPU = process CPU ms per audio second", "",
             "| set | clips | audio s | decoding | WER | clips with an error | CPU ms / audio s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(map(str, r))} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.show:
        print("\n".join(shown))
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
