"""Endpointer on real speech (tests/data) and synthetic audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.audio.wavfile import read_wav
from server.config import VadConfig
from server.vad.endpointer import Endpointer, EndpointerSettings, SegmentEnded, SpeechStarted

DATA = Path(__file__).parent / "data"
SR = 16000


def clip(name: str) -> np.ndarray:
    x, rate = read_wav(DATA / name)
    assert rate == SR
    return x


SHORT = "sense_and_sensibility_01_austen_64kb-0880.wav"  # "he was not an ill disposed young man"
OTHER = "sense_and_sensibility_01_austen_64kb-0930.wav"


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SR * seconds), np.float32)


def run(signal: np.ndarray, chunk: int | None = None, settings: EndpointerSettings | None = None,
        flush: bool = True) -> tuple[Endpointer, list]:
    ep = Endpointer(settings or EndpointerSettings())
    events: list = []
    step = chunk or len(signal)
    for i in range(0, len(signal), step):
        events += ep.feed(signal[i:i + step])
    if flush:
        events += ep.flush()
    return ep, events


def ended(events: list) -> list[SegmentEnded]:
    return [e for e in events if isinstance(e, SegmentEnded)]


def speech_bounds_ms(x: np.ndarray, offset_ms: int) -> tuple[int, int]:
    """First and last sample louder than -34 dBFS, in ms (a crude but independent speech span)."""
    loud = np.nonzero(np.abs(x) > 0.02)[0]
    return offset_ms + loud[0] // 16, offset_ms + loud[-1] // 16


def check_invariants(signal: np.ndarray, events: list) -> None:
    """ms arithmetic against sample counts; audio is exactly the stream's samples; ordering."""
    open_ids = []
    last_end = 0
    for e in events:
        if isinstance(e, SpeechStarted):
            open_ids.append(e.segment_id)
            continue
        assert e.segment_id == open_ids[-1]  # SpeechStarted precedes its SegmentEnded
        assert e.start_ms <= e.end_ms <= e.cut_ms
        assert e.start_ms >= last_end  # segments never overlap
        assert len(e.audio) == (e.end_ms - e.start_ms) * 16
        assert e.audio.dtype == np.float32
        assert np.array_equal(e.audio, signal[e.start_ms * 16:e.end_ms * 16])
        last_end = e.end_ms
    ids = [e.segment_id for e in events if isinstance(e, SpeechStarted)]
    assert ids == list(range(len(ids)))


def test_silence_gives_no_events():
    ep, events = run(silence(5.0), chunk=320)
    assert events == []
    assert ep.stream_ms == 5000
    assert ep.open_segment() is None


def test_low_noise_gives_no_events():
    noise = (np.random.default_rng(0).standard_normal(SR * 3) * 0.001).astype(np.float32)
    assert run(noise, chunk=480)[1] == []


def test_padded_clip_is_one_segment_bracketing_the_speech():
    x = clip(SHORT)
    signal = np.concatenate([silence(1.0), x, silence(1.0)])
    ep, events = run(signal, chunk=320)
    assert [type(e) for e in events] == [SpeechStarted, SegmentEnded]
    seg = events[1]
    first, last = speech_bounds_ms(x, 1000)
    assert seg.start_ms <= first - 100  # pre-roll keeps the onset
    assert seg.start_ms >= 1000 - 300 - 30  # ... but no more than the pre-roll (frame grid: 30 ms)
    assert last <= seg.end_ms <= last + 700
    assert seg.reason == "silence"
    assert seg.cut_ms - seg.end_ms >= 500 - 200  # decided after the endpoint silence
    assert seg.cut_ms < len(signal) // 16  # ... by silence, before the stream ended
    assert events[0].start_ms == seg.start_ms
    check_invariants(signal, events)


def test_two_clips_separated_by_silence_are_two_ordered_segments():
    a, b = clip(SHORT), clip(OTHER)
    signal = np.concatenate([silence(0.5), a, silence(1.5), b, silence(1.0)])
    _, events = run(signal, chunk=640)
    segs = ended(events)
    assert [s.segment_id for s in segs] == [0, 1]
    b_first, b_last = speech_bounds_ms(b, 500 + len(a) // 16 + 1500)
    a_first, a_last = speech_bounds_ms(a, 500)
    assert segs[0].start_ms <= a_first and segs[0].end_ms >= a_last
    assert segs[0].cut_ms < segs[1].start_ms + 300  # first final decided before the second speech
    assert segs[1].start_ms <= b_first and segs[1].end_ms >= b_last
    check_invariants(signal, events)


def click(ms: int) -> np.ndarray:
    """A loud burst of voiced-looking sound (150 Hz pulse train) of the given length."""
    t = np.arange(ms * 16) / SR
    return (0.5 * np.sign(np.sin(2 * np.pi * 150 * t)) * np.hanning(ms * 16)).astype(np.float32)


def test_click_gives_nothing():
    _, events = run(np.concatenate([silence(1.0), click(50), silence(1.0)]), chunk=320)
    assert events == []


def test_short_burst_never_uses_an_id():
    # 150 ms is enough to open a segment (90 ms voiced) but not to confirm it (250 ms)
    x = clip(SHORT)
    burst = click(150)
    ep = Endpointer(EndpointerSettings())
    assert ep.feed(np.concatenate([silence(1.0), burst])) == []
    events = ep.feed(silence(1.0))
    assert events == [] and ep.open_segment() is None
    events = ep.feed(np.concatenate([x, silence(1.0)]))
    assert [e.segment_id for e in events] == [0, 0]


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_chunking_invariance(frame_ms):
    signal = np.concatenate([silence(0.3), clip("jfk.wav"), silence(0.7), clip(OTHER), silence(0.4)])
    settings = EndpointerSettings(frame_ms=frame_ms)
    ref = run(signal, chunk=160, settings=settings)[1]
    assert len(ended(ref)) >= 2
    rng = np.random.default_rng(frame_ms)
    ep = Endpointer(settings)
    rand_events, i = [], 0
    while i < len(signal):
        n = int(rng.integers(1, 20000))
        rand_events += ep.feed(signal[i:i + n])
        i += n
    rand_events += ep.flush()
    for other in (run(signal, chunk=SR, settings=settings)[1], run(signal, settings=settings)[1], rand_events):
        assert len(other) == len(ref)
        for a, b in zip(ref, other):
            assert type(a) is type(b)
            if isinstance(a, SpeechStarted):
                assert a == b
            else:
                assert (a.segment_id, a.start_ms, a.end_ms, a.cut_ms, a.reason) == \
                       (b.segment_id, b.start_ms, b.end_ms, b.cut_ms, b.reason)
                assert np.array_equal(a.audio, b.audio)
    check_invariants(signal, ref)


def test_max_segment_cut():
    x = clip("jfk.wav")
    signal = np.concatenate([silence(0.5), x, silence(1.0)])
    settings = EndpointerSettings(max_segment_ms=2000)
    _, events = run(signal, chunk=480, settings=settings)
    segs = ended(events)
    cuts = [s for s in segs if s.reason == "max_length"]
    assert len(cuts) >= 2
    for s in segs:
        assert s.end_ms - s.start_ms <= 2000
        assert s.cut_ms - s.start_ms <= 2000
    # speech that goes on continues in the next segment without a gap or overlap
    continued = [(p, n) for p, n in zip(segs, segs[1:]) if p.reason == "max_length" and p.end_ms == p.cut_ms]
    assert continued  # jfk.wav has runs of speech longer than 2 s
    for prev, nxt in continued:
        assert nxt.start_ms == prev.end_ms
    # together the segments still cover the speech
    first, last = speech_bounds_ms(x, 500)
    assert segs[0].start_ms <= first and segs[-1].end_ms >= last
    check_invariants(signal, events)


def test_finalize_ends_the_open_segment_and_the_stream_goes_on():
    x = clip("sense_and_sensibility_01_austen_64kb-0870.wav")
    ep = Endpointer(EndpointerSettings())
    head = np.concatenate([silence(0.5), x[:SR * 2 + 123]])
    events = ep.feed(head)
    assert [type(e) for e in events] == [SpeechStarted]
    fin = ep.finalize()
    assert len(fin) == 1 and fin[0].reason == "finalize" and fin[0].segment_id == 0
    assert fin[0].cut_ms == ep.stream_ms == len(head) // 16
    assert fin[0].end_ms <= fin[0].cut_ms
    assert ep.finalize() == []  # nothing open any more
    rest = ep.feed(np.concatenate([x[SR * 2 + 123:], silence(1.0)])) + ep.flush()
    assert [e.segment_id for e in ended(rest)] == [1]
    assert ended(rest)[0].start_ms >= fin[0].end_ms
    check_invariants(np.concatenate([head, x[SR * 2 + 123:], silence(1.0)]), events[:1] + fin + rest)


def test_flush_classifies_the_partial_frame_and_ends_the_segment():
    x = clip(SHORT)
    signal = np.concatenate([silence(0.5), x[:len(x) - 4007]])  # ends mid-speech, mid-frame
    ep, events = run(signal, chunk=1000)
    segs = ended(events)
    assert len(segs) == 1 and segs[0].reason == "flush"
    assert segs[0].cut_ms == ep.stream_ms == len(signal) // 16
    assert segs[0].end_ms <= ep.stream_ms
    check_invariants(signal, events)
    assert ep.flush() == []
    with pytest.raises(RuntimeError):
        ep.feed(silence(0.1))


def test_flush_without_speech_and_finalize_when_idle():
    ep = Endpointer(EndpointerSettings())
    ep.feed(silence(0.25))
    assert ep.finalize() == []
    assert ep.flush() == []
    assert ep.stream_ms == 250


def test_open_segment_for_partials():
    x = clip("sense_and_sensibility_01_austen_64kb-0870.wav")
    signal = np.concatenate([silence(0.5), x])
    ep = Endpointer(EndpointerSettings())
    ep.feed(signal[:SR // 2])
    assert ep.open_segment() is None
    seen = None
    for i in range(SR // 2, SR * 3, 320):
        ep.feed(signal[i:i + 320])
        seen = ep.open_segment() or seen
    assert seen is not None
    seg_id, start_ms, audio = ep.open_segment()
    assert seg_id == 0
    assert not audio.flags.writeable
    assert len(audio) % 16 == 0 and len(audio) // 16 <= ep.stream_ms - start_ms
    assert np.array_equal(audio, signal[start_ms * 16:start_ms * 16 + len(audio)])


def test_memory_stays_bounded():
    ep = Endpointer(EndpointerSettings())
    x = clip(SHORT)
    cap0 = len(ep._buf)
    for _ in range(20):  # ~100 s of speech and silence
        ep.feed(silence(2.0))
        ep.feed(x)
    assert len(ep._buf) <= max(cap0, 2 * (len(x) + 2 * SR))
    for _ in range(120):  # 2 minutes of silence afterwards in 1 s messages
        ep.feed(silence(1.0))
    assert len(ep._buf) == cap0


def test_settings_from_config_and_overrides():
    vad = VadConfig()
    s = EndpointerSettings.from_config(vad)
    assert s == EndpointerSettings()
    s = EndpointerSettings.from_config(vad, endpoint_ms=800, max_segment_ms=5000)
    assert (s.endpoint_ms, s.max_segment_ms, s.frame_ms) == (800, 5000, vad.frame_ms)
    with pytest.raises(ValueError):
        EndpointerSettings(frame_ms=25)


def test_endpoint_override_changes_the_cut():
    # a 400 ms pause: one segment at endpoint 500 ms, two at 200 ms
    a, b = clip(SHORT), clip(OTHER)
    signal = np.concatenate([silence(0.5), a, silence(0.4), b, silence(1.0)])
    long_ep = ended(run(signal, chunk=320, settings=EndpointerSettings(endpoint_ms=1000))[1])
    short_ep = ended(run(signal, chunk=320, settings=EndpointerSettings(endpoint_ms=200))[1])
    assert len(long_ep) < len(short_ep)
