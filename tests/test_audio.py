"""Audio decoding (PCM, G.711), resampling and WAV reading, against known values and real clips."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from server.audio.codecs import (
    ALAW_TO_PCM16, BYTES_PER_SAMPLE, ENCODINGS, MULAW_TO_PCM16, AudioFormatError, decode, encode,
    encode_alaw, encode_mulaw,
)
from server.audio.resample import STANDARD_RATES, StreamResampler, resample
from server.audio.wavfile import load_audio_16k, read_wav

DATA = Path(__file__).parent / "data"
CODES = np.arange(256, dtype=np.uint8)


# ---------------------------------------------------------------------------- codecs


def test_encodings_table_is_consistent():
    assert set(BYTES_PER_SAMPLE) == set(ENCODINGS)


@pytest.mark.parametrize("code,value", [(0x00, -32124), (0x80, 32124), (0xFF, 0), (0x7F, 0), (0x01, -31100),
                                        (0x0F, -16764), (0x8F, 16764), (0xFE, 8), (0x7E, -8), (0xEF, 132)])
def test_mulaw_g711_reference_points(code, value):
    assert MULAW_TO_PCM16[code] == value
    assert decode(bytes([code]), "mulaw")[0] == pytest.approx(value / 32768.0)


@pytest.mark.parametrize("code,value", [(0xD5, 8), (0x55, -8), (0xAA, 32256), (0x2A, -32256), (0xD4, 24),
                                        (0xC5, 264), (0x00, -5504), (0x01, -5248), (0x5A, -248)])
def test_alaw_g711_reference_points(code, value):
    assert ALAW_TO_PCM16[code] == value
    assert decode(bytes([code]), "alaw")[0] == pytest.approx(value / 32768.0)


def test_g711_tables_are_odd_symmetric_and_monotonic():
    # mu-law: code c and c^0x80 are negatives; magnitudes grow as the inverted code grows
    assert np.array_equal(MULAW_TO_PCM16[CODES ^ 0x80], -MULAW_TO_PCM16)
    positive = MULAW_TO_PCM16[0x80:][::-1]  # 0xFF (0) ... 0x80 (max)
    assert np.all(np.diff(positive.astype(int)) > 0)
    # A-law: every code is distinct (no zero), and sign-flipped pairs are negatives
    assert np.array_equal(ALAW_TO_PCM16[CODES ^ 0x80], -ALAW_TO_PCM16)
    assert len(set(ALAW_TO_PCM16.tolist())) == 256


def test_g711_encoders_round_trip_every_code():
    mu = np.frombuffer(encode_mulaw(decode(CODES.tobytes(), "mulaw")), np.uint8)
    expected = CODES.copy()
    expected[0x7F] = 0xFF  # "negative zero" decodes to 0, which encodes as positive zero
    assert np.array_equal(mu, expected)
    a = np.frombuffer(encode_alaw(decode(CODES.tobytes(), "alaw")), np.uint8)
    assert np.array_equal(a, CODES)
    assert encode_mulaw(np.zeros(1)) == b"\xff" and encode_alaw(np.zeros(1)) == b"\xd5"


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_g711_speech_round_trip_has_companding_snr(encoding):
    x, _ = read_wav(DATA / "jfk.wav")
    y = decode(encode(x, encoding), encoding)
    snr = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y).astype(np.float64) ** 2))
    assert 30 < snr < 45, snr  # G.711 gives ~35-38 dB on speech; far off means a broken table
    # saturation, not wrap-around, beyond full scale
    assert decode(encode(np.array([1.5, -1.5]), encoding), encoding)[0] > 0.95


def test_pcm_s16le_exact_values():
    raw = struct.pack("<4h", 0, 16384, -32768, 32767)
    assert decode(raw, "pcm_s16le").tolist() == [0.0, 0.5, -1.0, 32767 / 32768]
    assert decode(raw, "pcm_s16le").dtype == np.float32
    assert encode(decode(raw, "pcm_s16le"), "pcm_s16le") == raw


def test_pcm_f32le_round_trip_and_clip():
    x = np.array([0.0, 0.25, -0.75, 1.0], np.float32)
    assert np.array_equal(decode(encode(x, "pcm_f32le"), "pcm_f32le"), x)
    assert decode(np.array([2.0, -3.0], "<f4").tobytes(), "pcm_f32le").tolist() == [1.0, -1.0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pcm_f32le_rejects_non_finite(bad):
    with pytest.raises(AudioFormatError, match="NaN or infinite"):
        decode(np.array([0.1, bad], "<f4").tobytes(), "pcm_f32le")


@pytest.mark.parametrize("encoding,nbytes", [("pcm_s16le", 3), ("pcm_f32le", 6), ("pcm_f32le", 1)])
def test_partial_sample_is_rejected(encoding, nbytes):
    with pytest.raises(AudioFormatError, match="whole number"):
        decode(b"\x00" * nbytes, encoding)


def test_unknown_encoding_is_rejected():
    with pytest.raises(AudioFormatError, match="unknown encoding 'opus'"):
        decode(b"\x00\x00", "opus")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_empty_message_decodes_to_nothing(encoding):
    out = decode(b"", encoding)
    assert out.dtype == np.float32 and len(out) == 0


# ---------------------------------------------------------------------------- resampling
# Behaviour, not implementation: frequencies and levels survive, nothing above the new
# Nyquist folds back, streaming equals one-shot, and a stream does not sit on its output.

RESAMPLED_RATES = [r for r in STANDARD_RATES if r != 16000]


def _sine(freq: float, rate: int, seconds: float = 2.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _core(y: np.ndarray, rate: int = 16000) -> np.ndarray:
    """Drop 0.1 s at each end: a tone switched on/off abruptly has broadband edges."""
    return y[rate // 10 : -(rate // 10)].astype(np.float64)


def _db(y: np.ndarray, amp: float) -> float:
    """RMS level of y relative to a sine of amplitude amp."""
    return 20 * np.log10(np.sqrt(np.mean(y ** 2)) / (amp / np.sqrt(2)) + 1e-300)


def _stream(r: StreamResampler, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    parts, i = [], 0
    while i < len(x):
        n = int(rng.integers(0, 3000))  # uneven, empty chunks included
        parts.append(r.process(x[i : i + n]))
        i += n
    parts.append(r.flush())
    assert all(p.dtype == np.float32 for p in parts)
    return np.concatenate(parts)


@pytest.mark.parametrize("in_rate", RESAMPLED_RATES)
def test_1khz_tone_keeps_frequency_and_amplitude(in_rate):
    y = resample(_sine(1000, in_rate), in_rate)
    assert y.dtype == np.float32
    core = _core(y)
    spectrum = np.abs(np.fft.rfft(core * np.hanning(len(core))))
    peak_hz = np.argmax(spectrum) * 16000 / len(core)
    assert abs(peak_hz - 1000) < 1, peak_hz  # FFT bins are 0.56 Hz here
    assert np.abs(core).max() == pytest.approx(0.5, rel=0.01)  # 1 % = 0.09 dB
    assert abs(_db(core, 0.5)) < 0.1


@pytest.mark.parametrize("in_rate", [48000, 44100])
@pytest.mark.parametrize("freq", [100, 300, 3400, 6000, 7000])
def test_speech_band_passes_flat_to_7khz(in_rate, freq):
    assert abs(_db(_core(resample(_sine(freq, in_rate), in_rate)), 0.5)) < 0.1


@pytest.mark.parametrize("in_rate", [48000, 44100])
@pytest.mark.parametrize("freq", [8500, 9000, 12000, 20000])
def test_content_above_8khz_is_attenuated_not_aliased(in_rate, freq):
    # Unfiltered, 9 kHz would come out as a 7 kHz tone at full level. 60 dB down puts the
    # residue below what the model hears in speech (16-bit sources span about 96 dB).
    assert _db(_core(resample(_sine(freq, in_rate), in_rate)), 0.5) < -60


def test_upsampling_8k_adds_no_image_above_4khz():
    # 3 kHz at 8 kHz, upsampled without filtering, would have an image at 5 kHz.
    y = _core(resample(_sine(3000, 8000), 8000))
    power = np.abs(np.fft.rfft(y * np.hanning(len(y)))) ** 2
    hz = np.fft.rfftfreq(len(y), 1 / 16000)
    assert abs(hz[np.argmax(power)] - 3000) < 1
    assert 10 * np.log10(power[hz > 4100].sum() / power.sum()) < -60


@pytest.mark.parametrize("in_rate,out_rate", [(r, 16000) for r in RESAMPLED_RATES]
                         + [(12345, 16000), (16000, 8000), (16000, 44100), (16000, 48000)])
def test_streaming_in_uneven_chunks_matches_one_shot(in_rate, out_rate):
    rng = np.random.default_rng(in_rate + out_rate)
    x = (rng.standard_normal(in_rate // 2 + 7) * 0.1).astype(np.float32)
    expected_len = len(x) * out_rate / in_rate
    one = resample(x, in_rate, out_rate)
    assert abs(len(one) - expected_len) <= 1
    for _ in range(3):
        streamed = _stream(StreamResampler(in_rate, out_rate), x, rng)
        assert abs(len(streamed) - expected_len) <= 1
        assert len(streamed) == len(one)
        # Same samples up to float32 rounding (signal RMS 0.1; one sample of shift would be ~0.1).
        np.testing.assert_allclose(streamed, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_rate,max_held_ms", [(48000, 50), (44100, 50), (8000, 130)])
def test_stream_holds_back_a_bounded_amount(in_rate, max_held_ms):
    # Output a live stream owes but has not produced yet is latency before the endpointer.
    # soxr 'HQ' holds back at most 37 / 40 / 115 ms here (the filter's look-ahead plus its
    # block size); 'VHQ' would hold back 76-84 ms at 44.1/48 kHz and fail this.
    x = _sine(440, in_rate, seconds=3.0)
    step = in_rate // 50
    r = StreamResampler(in_rate)
    produced, held = 0, []
    for i in range(0, len(x), step):
        produced += len(r.process(x[i : i + step]))
        held.append(min(i + step, len(x)) * 16000 / in_rate - produced)
    assert max(held) <= max_held_ms * 16, max(held) / 16
    assert abs(produced + len(r.flush()) - len(x) * 16000 / in_rate) <= 1


@pytest.mark.parametrize("in_rate", [48000, 44100, 8000])
def test_aligned_in_time(in_rate):
    # a click at 0.5 s comes out at 0.5 s: the filter's delay is compensated, also when streaming
    x = np.zeros(in_rate, np.float32)
    x[in_rate // 2] = 1.0
    assert np.argmax(resample(x, in_rate)) == 8000
    assert np.argmax(_stream(StreamResampler(in_rate), x, np.random.default_rng(0))) == 8000


def test_empty_chunks_and_empty_streams():
    empty = np.zeros(0, np.float32)
    r = StreamResampler(48000)
    out = r.process(empty)
    assert out.dtype == np.float32 and len(out) == 0
    tail = r.flush()
    assert tail.dtype == np.float32 and len(tail) == 0  # nothing in, nothing out
    out = resample(empty, 44100)
    assert out.dtype == np.float32 and len(out) == 0
    # empty chunks between real ones change nothing
    x = _sine(1000, 48000, seconds=0.2)
    r = StreamResampler(48000)
    parts = [r.process(empty), r.process(x[:1000]), r.process(empty), r.process(x[1000:]), r.process(empty), r.flush()]
    np.testing.assert_allclose(np.concatenate(parts), resample(x, 48000), rtol=0, atol=1e-6)


def test_output_is_float32_whatever_the_input():
    x64 = _sine(1000, 44100, seconds=0.1).astype(np.float64)
    assert resample(x64, 44100).dtype == np.float32
    assert resample(x64.tolist(), 44100).dtype == np.float32
    assert resample(x64[::2], 22050).dtype == np.float32  # strided input
    r = StreamResampler(44100)
    assert r.process(x64).dtype == np.float32 and r.flush().dtype == np.float32
    assert StreamResampler(16000).process(x64).dtype == np.float32


def test_16k_is_a_pass_through():
    x = np.random.default_rng(0).standard_normal(1234).astype(np.float32)
    r = StreamResampler(16000)
    assert np.array_equal(r.process(x), x) and len(r.flush()) == 0
    assert np.array_equal(resample(x, 16000), x)


def test_process_after_flush_is_an_error():
    r = StreamResampler(8000)
    r.process(np.zeros(100, np.float32))
    r.flush()
    with pytest.raises(RuntimeError):
        r.process(np.zeros(10, np.float32))


@pytest.mark.parametrize("in_rate,out_rate", [(0, 16000), (-8000, 16000), (48000, 0)])
def test_bad_rates_are_rejected(in_rate, out_rate):
    with pytest.raises(ValueError, match="positive"):
        StreamResampler(in_rate, out_rate)
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, np.float32), in_rate, out_rate)


# ---------------------------------------------------------------------------- WAV files


def _write_pcm_wav(path: Path, ints: np.ndarray, width: int, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 3:
            raw = ints.astype("<i4").tobytes()
            raw = b"".join(raw[i:i + 3] for i in range(0, len(raw), 4))
        else:
            raw = ints.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width]).tobytes()
        w.writeframes(raw)


def _write_riff(path: Path, fmt_tag: int, bits: int, rate: int, channels: int, raw: bytes,
                extensible: bool = False) -> None:
    block = channels * bits // 8
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0)
        fmt += struct.pack("<H", fmt_tag) + guid_tail
    else:
        fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd-sized chunk with its pad byte
    body += b"data" + struct.pack("<I", len(raw)) + raw
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_read_real_clip():
    x, rate = read_wav(DATA / "jfk.wav")
    assert rate == 16000 and x.dtype == np.float32 and len(x) == 176000
    with wave.open(str(DATA / "jfk.wav")) as w:
        ref = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0
    assert np.array_equal(x, ref.astype(np.float32))


@pytest.mark.parametrize("width,scale", [(1, 128), (2, 32768), (3, 8388608), (4, 2147483648)])
def test_pcm_widths(tmp_path, width, scale):
    vals = np.array([0, scale // 2, -scale // 2, scale - 1, -scale])
    ints = vals + 128 if width == 1 else vals
    _write_pcm_wav(tmp_path / "a.wav", ints, width, 8000)
    x, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000
    np.testing.assert_allclose(x, vals / scale, atol=1e-7)


def test_stereo_is_averaged(tmp_path):
    left = np.array([1000, 2000, 3000]); right = np.array([-1000, 0, 1000])
    _write_pcm_wav(tmp_path / "s.wav", np.stack([left, right], 1).reshape(-1), 2, 16000, channels=2)
    x, _ = read_wav(tmp_path / "s.wav")
    np.testing.assert_allclose(x, (left + right) / 2 / 32768)


@pytest.mark.parametrize("extensible", [False, True])
@pytest.mark.parametrize("bits", [32, 64])
def test_ieee_float(tmp_path, bits, extensible):
    vals = np.array([0.0, 0.5, -0.25, 1.0])
    _write_riff(tmp_path / "f.wav", 3, bits, 22050, 1, vals.astype(f"<f{bits // 8}").tobytes(), extensible)
    x, rate = read_wav(tmp_path / "f.wav")
    assert rate == 22050 and x.tolist() == vals.tolist()


def test_extensible_pcm_and_g711(tmp_path):
    _write_riff(tmp_path / "p.wav", 1, 16, 16000, 2, struct.pack("<4h", 100, 300, -50, -150), extensible=True)
    x, _ = read_wav(tmp_path / "p.wav")
    np.testing.assert_allclose(x, [200 / 32768, -100 / 32768])
    _write_riff(tmp_path / "u.wav", 7, 8, 8000, 1, bytes([0x80, 0xFF, 0x00]))
    assert read_wav(tmp_path / "u.wav")[0].tolist() == pytest.approx([32124 / 32768, 0, -32124 / 32768])
    _write_riff(tmp_path / "a.wav", 6, 8, 8000, 1, bytes([0xAA, 0x55]))
    assert read_wav(tmp_path / "a.wav")[0].tolist() == pytest.approx([32256 / 32768, -8 / 32768])


def test_load_audio_16k_resamples(tmp_path):
    x16, _ = read_wav(DATA / "sense_and_sensibility_01_austen_64kb-0880.wav")
    x48 = resample(x16, 16000, 48000)
    _write_riff(tmp_path / "48k.wav", 3, 32, 48000, 1, x48.astype("<f4").tobytes())
    back = load_audio_16k(tmp_path / "48k.wav")
    assert abs(len(back) - len(x16)) <= 1
    n = min(len(back), len(x16))
    err = back[:n] - x16[:n]
    assert np.sqrt(np.mean(err ** 2)) < 0.05 * np.sqrt(np.mean(x16 ** 2))  # up and down again: near lossless


def test_wav_errors(tmp_path):
    with pytest.raises(AudioFormatError, match="no such file"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "t.wav").write_bytes(b"this is not audio at all")
    with pytest.raises(AudioFormatError, match="not a WAV"):
        read_wav(tmp_path / "t.wav")
    _write_riff(tmp_path / "adpcm.wav", 2, 4, 8000, 1, b"\x00" * 10)
    with pytest.raises(AudioFormatError, match="unsupported WAV format"):
        read_wav(tmp_path / "adpcm.wav")
    (tmp_path / "nodata.wav").write_bytes(b"RIFF\x04\x00\x00\x00WAVE")
    with pytest.raises(AudioFormatError, match="fmt"):
        read_wav(tmp_path / "nodata.wav")


# ---------------------------------------------------------------------------- files (PyAV)
# server/audio/media.py decodes every file clients send (API, `chorus transcribe`, FunASR
# offline files); what a file may cost is checked from its header before the first frame.

def _noise_wav(tmp_path: Path, rate: int, samples: int) -> Path:
    path = tmp_path / f"r{rate}.wav"
    _write_pcm_wav(path, np.random.default_rng(rate).integers(-3000, 3000, samples), 2, rate)
    return path


@pytest.mark.parametrize("rate", [1, 999, 800_000])
def test_a_file_claiming_an_absurd_rate_is_refused_before_decoding(tmp_path, rate):
    """A 1 Hz header would turn each sample into 16000: refused with the rate named, before
    anything is decoded (no chunk comes out, however small the chunks asked for)."""
    from server.audio.media import iter_file

    chunks = iter_file(_noise_wav(tmp_path, rate, 7500), max_seconds=14400, chunk_samples=160)
    with pytest.raises(AudioFormatError, match=f"unsupported sample rate {rate} Hz"):
        next(chunks)


@pytest.mark.parametrize("rate", [1000, 8000, 768_000])
def test_rates_in_range_decode_to_their_length_at_16k(tmp_path, rate):
    from server.audio.media import iter_file

    out = np.concatenate(list(iter_file(_noise_wav(tmp_path, rate, rate // 2))))
    assert out.dtype == np.float32 and abs(len(out) - 8000) <= 16  # half a second at 16 kHz


def test_a_file_declaring_more_than_max_seconds_is_refused_before_decoding(tmp_path):
    """20 s declared (a WAV's header, from the data present), 10 s allowed: AudioTooLong at
    once, before the first chunk, which comes after 10 ms here."""
    from server.audio.media import AudioTooLong, iter_file

    _write_pcm_wav(tmp_path / "long.wav", np.zeros(20 * 16000), 2, 16000)
    with pytest.raises(AudioTooLong, match="20 s long"):
        next(iter_file(tmp_path / "long.wav", max_seconds=10, chunk_samples=160))
    assert sum(len(c) for c in iter_file(tmp_path / "long.wav", max_seconds=30)) == 20 * 16000
