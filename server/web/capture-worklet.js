// AudioWorklet processor: microphone audio at the context's rate -> 16 kHz PCM16 LE frames.
//
// It runs on the audio rendering thread, so the main thread's work (DOM, the socket) cannot
// make it drop samples. It downmixes to mono, resamples with the anti-aliased converter in
// resampler.js, and posts one frame of FRAME_MS (as a transferable ArrayBuffer) at a time,
// with the frame's RMS level for the page's meter. A {type:"flush"} message posts what is
// left (the resampler's look-ahead included), then {type:"flushed"}.

import { Resampler, toPcm16le } from "./resampler.js";

const OUT_RATE = 16000;
const FRAME_MS = 40; // within the protocol's typical 20-100 ms, and 25 socket messages a second
const FRAME_SAMPLES = (OUT_RATE * FRAME_MS) / 1000;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    // `sampleRate` is the AudioWorkletGlobalScope's: the rate this context really runs at.
    this.resampler = new Resampler(sampleRate, OUT_RATE);
    this.pending = new Float32Array(FRAME_SAMPLES);
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "flush") {
        this.push(this.resampler.flush());
        if (this.filled > 0) this.post(this.pending.subarray(0, this.filled));
        this.filled = 0;
        this.running = false;
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  process(inputs) {
    if (!this.running) return false;
    const channels = inputs[0];
    if (channels && channels.length > 0) {
      const n = channels[0].length;
      let mono = channels[0];
      if (channels.length > 1) {
        // Average the channels: a stereo microphone's channels are the same speech.
        mono = new Float32Array(n);
        for (const ch of channels) for (let i = 0; i < n; i++) mono[i] += ch[i];
        for (let i = 0; i < n; i++) mono[i] /= channels.length;
      }
      this.push(this.resampler.process(mono));
    }
    return true;
  }

  push(samples) {
    let off = 0;
    while (off < samples.length) {
      const take = Math.min(FRAME_SAMPLES - this.filled, samples.length - off);
      this.pending.set(samples.subarray(off, off + take), this.filled);
      this.filled += take;
      off += take;
      if (this.filled === FRAME_SAMPLES) {
        this.post(this.pending);
        this.filled = 0;
      }
    }
  }

  post(frame) {
    let energy = 0;
    for (let i = 0; i < frame.length; i++) energy += frame[i] * frame[i];
    const pcm = toPcm16le(frame);
    this.port.postMessage({ type: "audio", pcm, samples: frame.length, rms: Math.sqrt(energy / frame.length) }, [pcm]);
  }
}

registerProcessor("chorus-capture", CaptureProcessor);
