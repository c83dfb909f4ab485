"""The streaming server driving the SenseVoice runner (tiny random-weight model in the real layout).

Random weights make the words meaningless; what is checked is that the whole path
(socket -> session -> batcher -> SenseVoice runner -> finals with model fields) works
for the FunASR family too, with SenseVoice's per-segment language/emotion/event fields.
"""

from __future__ import annotations

import asyncio

import pytest

from server.runners import create_runner
from server.runners.random_weights import write_sensevoice_dir
from tests.serverharness import CLIPS, ServerThread, check_words, read_clip, stream_audio, make_config


@pytest.fixture(scope="module")
def sv_srv(tmp_path_factory):
    model_dir = write_sensevoice_dir(tmp_path_factory.mktemp("sv") / "SenseVoiceSmall", scale="tiny", seed=1)
    cfg = make_config(**{"runner.name": "sensevoice", "runner.model": str(model_dir), "batcher.partial_interval_ms": 300})
    runner = create_runner(cfg.runner)
    runner.load()
    with ServerThread(cfg, runner) as s:
        yield s


def test_sensevoice_sessions_get_ordered_finals_with_model_fields(sv_srv):
    async def main():
        return await asyncio.gather(
            *[stream_audio(sv_srv.url, read_clip(c), speed=6.0, start={"language": "en"}) for c in CLIPS[:3]]
        )

    for log in asyncio.run(main()):
        finals = log.of("final")
        assert finals, "no finals"
        assert [f["segment_id"] for f in finals] == list(range(len(finals)))
        for f in finals:
            assert {"emotion", "event", "raw_text", "language"} <= set(f), f
            assert "tokens" not in f  # token lists stay server-side
            check_words(f)  # random weights: the text is noise, but its token times must hold
        assert log.messages[-1]["type"] == "done"
    assert sv_srv.app.model_info()["runner"] == "sensevoice"
