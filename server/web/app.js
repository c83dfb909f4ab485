// Chorus live captions: microphone or an audio file -> /v1/stream -> captions on the page.
//
// Protocol: docs/protocol.md. Audio goes out as 16 kHz PCM16 LE binary frames (the
// microphone through capture-worklet.js, a file decoded and resampled by the browser and
// sent at real-time pace); `partial` messages replace the open segment's grey caption,
// `final` messages become the transcript (and its .txt / .vtt downloads).

import { toPcm16le } from "./resampler.js";

const OUT_RATE = 16000;
const FILE_FRAME_MS = 40; // the file path's frame size; the worklet uses the same
const MAX_QUEUED_MS = 10000; // microphone audio held while the socket opens, at most

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"),
  stop: $("stop"),
  file: $("file"),
  token: $("token"),
  settings: $("settings"),
  status: $("status"),
  language: $("language"),
  latency: $("latency"),
  level: $("level"),
  captions: $("captions"),
  placeholder: $("placeholder"),
  notice: $("notice"),
  txt: $("download-txt"),
  vtt: $("download-vtt"),
  clear: $("clear"),
};

// The page may be opened as /?token=...: take it, so a shared link works without typing.
const pageToken = new URLSearchParams(location.search).get("token");
if (pageToken) ui.token.value = pageToken;

const transcript = []; // finals with text: {start_ms, end_ms, text, language}, on one time line
let offsetMs = 0; // audio of earlier sessions, so the exported cue times keep increasing
let session = null; // the one running Session, if any
let mic = null; // {ctx, stream, node, source} while the microphone is captured
const latencies = [];
let sessionSeq = 0;

// ------------------------------------------------------------------ status and notices
function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function notice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function setBusy(busy) {
  ui.start.disabled = busy;
  ui.file.disabled = busy;
  ui.clear.disabled = busy;
  ui.stop.disabled = !busy;
}

// ------------------------------------------------------------------ the stream
class Session {
  constructor(label) {
    this.id = ++sessionSeq;
    this.label = label;
    this.sentSamples = 0;
    this.sends = []; // [audio ms at the end of a frame, performance.now() when it was sent]
    this.queue = []; // frames captured before the socket opened
    this.queuedSamples = 0;
    this.partials = new Map(); // segment_id -> its partial caption element
    this.ready = false;
    this.failed = false;
    this.stopping = false;
    this.ended = false;
    this.closed = new Promise((resolve) => (this._resolveClosed = resolve));
    this.opened = new Promise((resolve) => (this._resolveOpened = resolve));
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams({ sample_rate: String(OUT_RATE), encoding: "pcm_s16le" });
    const token = ui.token.value.trim();
    if (token) q.set("token", token); // browsers cannot set an Authorization header on a WebSocket
    return `${scheme}//${location.host}/v1/stream?${q}`;
  }

  connect() {
    setStatus("connecting", "Connecting…");
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => {
      for (const [pcm, samples] of this.queue) this._send(pcm, samples);
      this.queue = [];
      this._resolveOpened(true);
    };
    ws.onmessage = (e) => {
      if (typeof e.data === "string") this.onMessage(JSON.parse(e.data));
    };
    ws.onclose = (e) => this.onClose(e);
  }

  // Audio of `samples` 16 kHz samples; queued while connecting, dropped once stopping.
  send(pcm, samples) {
    if (this.stopping || this.failed) return;
    if (this.ws.readyState === WebSocket.OPEN) {
      this._send(pcm, samples);
    } else if (this.ws.readyState === WebSocket.CONNECTING) {
      this.queue.push([pcm, samples]);
      this.queuedSamples += samples;
      while (this.queuedSamples > (MAX_QUEUED_MS * OUT_RATE) / 1000) this.queuedSamples -= this.queue.shift()[1];
    }
  }

  _send(pcm, samples) {
    this.ws.send(pcm);
    this.sentSamples += samples;
    this.sends.push([(this.sentSamples * 1000) / OUT_RATE, performance.now()]);
  }

  get sentMs() {
    return (this.sentSamples * 1000) / OUT_RATE;
  }

  // End of audio: every open segment gets its final, then `done`, then the server closes.
  finish() {
    if (this.stopping) return this.closed;
    this.stopping = true;
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "stop" }));
      if (!this.failed) setStatus("finishing", "Finishing…");
    } else {
      this.ws.close();
    }
    return this.closed;
  }

  onMessage(m) {
    switch (m.type) {
      case "ready":
        this.ready = true;
        setStatus("live", `Live (${this.label})`);
        break;
      case "speech_started":
        this.partial(m.segment_id, "…");
        break;
      case "partial":
        this.partial(m.segment_id, m.text || "…");
        break;
      case "final":
        this.final(m);
        break;
      case "error":
        if (m.fatal) {
          this.failed = true;
          setStatus("error", `Error: ${m.message} (${m.code})`);
        } else {
          notice(`Server: ${m.message} (${m.code})`);
        }
        break;
      case "done":
        break;
      default:
        break; // a newer server's message: ignore, as the protocol allows
    }
  }

  partial(segmentId, text) {
    let el = this.partials.get(segmentId);
    if (!el) {
      el = document.createElement("p");
      el.className = "partial";
      el.dataset.segment = String(segmentId);
      // Screen readers announce finals only: a caption rewritten every second is noise.
      el.setAttribute("aria-hidden", "true");
      ui.captions.appendChild(el);
      this.partials.set(segmentId, el);
      ui.placeholder.hidden = true;
    }
    el.textContent = text;
    scrollCaptions();
  }

  final(m) {
    const el = this.partials.get(m.segment_id);
    if (el) el.remove();
    this.partials.delete(m.segment_id);
    if (m.error) notice(`Segment ${m.segment_id} could not be recognised (${m.error}).`);
    const text = (m.text || "").trim();
    if (text) {
      const entry = {
        start_ms: offsetMs + m.start_ms,
        end_ms: offsetMs + m.end_ms,
        text,
        language: m.language || "",
      };
      transcript.push(entry);
      const p = document.createElement("p");
      p.className = "final";
      p.dataset.segment = String(m.segment_id);
      const ts = document.createElement("span");
      ts.className = "ts";
      ts.setAttribute("aria-hidden", "true");
      ts.textContent = clock(entry.start_ms);
      const span = document.createElement("span");
      span.className = "text";
      span.textContent = text;
      p.append(ts, span);
      if (m.language) span.lang = m.language;
      // Before the next segment's partial, which may already be showing.
      ui.captions.insertBefore(p, ui.captions.querySelector(".partial"));
      ui.placeholder.hidden = true;
      if (m.language) ui.language.textContent = m.language;
      updateDownloads();
      scrollCaptions();
    }
    this.measure(m);
  }

  // Final latency as docs/protocol.md defines it: from sending the audio up to the segment's
  // end (`cut_ms`, where the server decided it had ended) to receiving its final.
  measure(m) {
    const cut = m.cut_ms ?? m.end_ms;
    const i = this.sends.findIndex(([ms]) => ms >= cut);
    if (i < 0) return;
    const latency = (performance.now() - this.sends[i][1]) / 1000;
    this.sends.splice(0, i); // finals arrive in order: earlier audio is never asked about again
    latencies.push(latency);
    const avg = latencies.reduce((a, b) => a + b, 0) / latencies.length;
    ui.latency.textContent = `${latency.toFixed(2)} s (average ${avg.toFixed(2)} s over ${latencies.length})`;
    ui.latency.dataset.seconds = latency.toFixed(3);
  }

  async onClose(e) {
    this.ended = true;
    for (const el of this.partials.values()) el.remove();
    this.partials.clear();
    offsetMs += this.sentMs;
    if (this.failed) {
      // A fatal error message is already shown.
    } else if (!this.ready && this.stopping) {
      setStatus("closed", "Closed (stopped before the server answered)");
    } else if (!this.ready) {
      this.failed = true;
      setStatus("error", "Error: " + (await explainRefusal(this.url())));
    } else if (e.code === 1000) {
      setStatus("closed", "Closed");
    } else if (e.code === 1001 || e.code === 1012) {
      setStatus("closed", "Closed: the server is shutting down or restarting; start again in a moment");
    } else {
      this.failed = true;
      setStatus("error", `Error: connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    }
    this._resolveOpened(false);
    this._resolveClosed();
    if (session === this) {
      session = null;
      stopMic();
      setBusy(false);
    }
  }
}

// A browser is not told why a WebSocket handshake failed; the same URL over plain HTTP is,
// for token and Origin refusals (401/403 with a JSON message), and /healthz says why a
// server is not admitting sessions (loading, full, draining).
async function explainRefusal(wsUrl) {
  try {
    const probe = await fetch(wsUrl.replace(/^ws/, "http"), { cache: "no-store" });
    if (probe.status === 401 || probe.status === 403) {
      const body = await probe.json();
      if (probe.status === 401) {
        // Lead the user to the token field, which is folded away when no token is needed.
        ui.settings.open = true;
        ui.token.focus();
      }
      return `${body.message} (HTTP ${probe.status})`;
    }
    const health = await fetch("/healthz", { cache: "no-store" });
    const info = await health.json();
    if (!info.accepting) return `the server is not taking new sessions now (${info.reason || "busy"})`;
  } catch (err) {
    return `cannot reach the server (${err.message})`;
  }
  return "the server refused the connection";
}

// ------------------------------------------------------------------ microphone
async function startMic() {
  if (session) return;
  notice("");
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    setStatus("error", "Error: the microphone needs a secure page: open it over https:// (or on localhost)");
    return;
  }
  setBusy(true);
  // Created inside the click: browsers only let a user gesture start audio processing.
  const ctx = new AudioContext();
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      // Raw audio: echo cancellation, noise suppression and gain control are tuned for calls
      // and distort what the recogniser hears.
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    mic = { ctx, stream, node: null, source: null };
    session = new Session(`microphone, ${ctx.sampleRate} Hz → 16 kHz`);
    session.connect();
    const current = session;
    await ctx.audioWorklet.addModule(new URL("capture-worklet.js", import.meta.url));
    if (mic === null || mic.ctx !== ctx) return; // stopped meanwhile
    const node = new AudioWorkletNode(ctx, "chorus-capture", { numberOfInputs: 1, numberOfOutputs: 0 });
    node.port.onmessage = (e) => {
      if (e.data.type === "audio") {
        current.send(e.data.pcm, e.data.samples);
        ui.level.value = levelOf(e.data.rms);
      }
    };
    const source = ctx.createMediaStreamSource(stream);
    source.connect(node);
    mic.node = node;
    mic.source = source;
    await ctx.resume();
  } catch (err) {
    if (mic) await stopMic();
    else ctx.close();
    setStatus("error", `Error: no microphone (${err.name}: ${err.message})`);
    if (session) {
      session.failed = true; // keep this message over the "Closed" of the session's end
      session.finish();
    } else {
      setBusy(false);
    }
  }
}

// Ends capture; resolves once the worklet has handed over its last samples.
async function stopMic() {
  const m = mic;
  if (!m) return;
  mic = null;
  if (m.node) {
    const flushed = new Promise((resolve) => {
      const prev = m.node.port.onmessage;
      m.node.port.onmessage = (e) => {
        prev(e);
        if (e.data.type === "flushed") resolve();
      };
      setTimeout(resolve, 500);
    });
    m.node.port.postMessage({ type: "flush" });
    await flushed;
    m.source.disconnect();
  }
  for (const t of m.stream.getTracks()) t.stop();
  m.ctx.close();
  ui.level.value = 0;
}

function levelOf(rms) {
  // dBFS from -60 to 0 onto the meter's 0..1.
  return Math.max(0, Math.min(1, (20 * Math.log10(rms + 1e-9) + 60) / 60));
}

// ------------------------------------------------------------------ audio files
async function streamFile(file) {
  if (session || !file) return;
  notice("");
  setBusy(true);
  let samples;
  try {
    setStatus("connecting", `Decoding ${file.name}…`);
    // A 16 kHz context makes decodeAudioData resample to 16 kHz with the browser's own
    // band-limited resampler; channels are averaged below.
    const decoder = new OfflineAudioContext(1, 1, OUT_RATE);
    const audio = await decoder.decodeAudioData(await file.arrayBuffer());
    samples = downmix(audio);
  } catch (err) {
    setStatus("error", `Error: cannot decode ${file.name} (${err.message || err.name})`);
    setBusy(false);
    return;
  }
  const s = new Session(`file ${file.name}, ${(samples.length / OUT_RATE).toFixed(1)} s`);
  session = s;
  s.connect();
  if (!(await s.opened)) return;
  const frame = (OUT_RATE * FILE_FRAME_MS) / 1000;
  const t0 = performance.now();
  for (let i = 0; i * frame < samples.length && !s.stopping && !s.ended; ) {
    // Paced by the clock, not by timer ticks: a late tick (a busy or hidden tab) sends every
    // frame that is due, so the stream stays at real time on average.
    const due = Math.floor((performance.now() - t0) / FILE_FRAME_MS) + 1;
    for (; i < due && i * frame < samples.length; i++) {
      const chunk = samples.subarray(i * frame, (i + 1) * frame);
      s.send(toPcm16le(chunk), chunk.length);
    }
    await sleep(Math.max(0, t0 + i * FILE_FRAME_MS - performance.now()));
  }
  await s.finish();
}

function downmix(audio) {
  const out = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const ch = audio.getChannelData(c);
    for (let i = 0; i < out.length; i++) out[i] += ch[i] / audio.numberOfChannels;
  }
  return out;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ transcript exports
function clock(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function vttTime(ms) {
  ms = Math.max(0, Math.round(ms));
  const h = Math.floor(ms / 3600000);
  const m = Math.floor(ms / 60000) % 60;
  const s = Math.floor(ms / 1000) % 60;
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(h)}:${pad(m)}:${pad(s)}.${pad(ms % 1000, 3)}`;
}

function vttText(text) {
  // Cue text may not hold "-->", and & < > are markup in WebVTT.
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function transcriptTxt() {
  return transcript.map((e) => e.text).join("\n") + "\n";
}

function transcriptVtt() {
  const cues = transcript.map(
    (e, i) => `${i + 1}\n${vttTime(e.start_ms)} --> ${vttTime(Math.max(e.end_ms, e.start_ms + 1))}\n${vttText(e.text)}\n`
  );
  return ["WEBVTT\n", ...cues].join("\n");
}

function setDownload(link, content, type) {
  if (link.href) URL.revokeObjectURL(link.href);
  if (content === null) {
    link.removeAttribute("href");
    link.setAttribute("aria-disabled", "true");
    return;
  }
  link.href = URL.createObjectURL(new Blob([content], { type }));
  link.removeAttribute("aria-disabled");
}

function updateDownloads() {
  const any = transcript.length > 0;
  setDownload(ui.txt, any ? transcriptTxt() : null, "text/plain;charset=utf-8");
  setDownload(ui.vtt, any ? transcriptVtt() : null, "text/vtt;charset=utf-8");
}

function scrollCaptions() {
  // Follow the newest caption unless the reader has scrolled up to read earlier ones.
  const box = ui.captions;
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
}

function clearTranscript() {
  if (session) return;
  transcript.length = 0;
  latencies.length = 0;
  offsetMs = 0;
  for (const el of ui.captions.querySelectorAll(".final, .partial")) el.remove();
  ui.placeholder.hidden = false;
  ui.language.textContent = "—";
  ui.latency.textContent = "—";
  delete ui.latency.dataset.seconds;
  updateDownloads();
  notice("");
}

// ------------------------------------------------------------------ wiring
ui.start.addEventListener("click", startMic);
ui.stop.addEventListener("click", async () => {
  ui.stop.disabled = true;
  const s = session;
  await stopMic();
  if (s) await s.finish();
});
ui.file.addEventListener("change", () => {
  const file = ui.file.files[0];
  ui.file.value = ""; // choosing the same file again streams it again
  streamFile(file);
});
ui.clear.addEventListener("click", clearTranscript);
setBusy(false);
setStatus("idle", "Idle: press Start to caption the microphone");
document.documentElement.dataset.ready = "true";
