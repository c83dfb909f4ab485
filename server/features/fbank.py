"""Kaldi-compatible fbank -> LFR -> CMVN for a padded batch, in torch on any device.

funasr's WavFrontend runs kaldi fbank on the CPU one utterance at a time in a Python
loop; this computes the same features for the whole batch at once (on the GPU when the
model is there), so the frontend stops being a per-item serial cost. The arithmetic
follows kaldi-native-fbank (which funasr uses when torchaudio is absent): per frame
remove the DC offset, pre-emphasise, window, zero-pad to a power of two, power
spectrum, triangular mel banks on the mel scale 1127*ln(1+f/700), log floored at
FLT_EPSILON. Dither is 0 (deterministic inference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_FLT_EPSILON = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class FbankOptions:
    """The frontend settings of a funasr `frontend_conf` that change the numbers."""

    sample_rate: int = 16000
    window: str = "hamming"
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    lfr_m: int = 7
    lfr_n: int = 6
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0
    """<= 0 means offset from the Nyquist frequency, as kaldi does."""
    upscale_samples: bool = True
    """funasr multiplies [-1, 1] float audio by 32768 before fbank (int16 scale)."""

    @property
    def frame_length(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def frame_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def output_size(self) -> int:
        return self.n_mels * self.lfr_m

    @classmethod
    def from_frontend_conf(cls, conf: dict) -> "FbankOptions":
        """Read funasr's `frontend_conf` (unknown keys such as cmvn_file are ignored)."""
        return cls(
            sample_rate=int(conf.get("fs", 16000)),
            window=str(conf.get("window", "hamming")),
            n_mels=int(conf.get("n_mels", 80)),
            frame_length_ms=float(conf.get("frame_length", 25)),
            frame_shift_ms=float(conf.get("frame_shift", 10)),
            lfr_m=int(conf.get("lfr_m", 1)),
            lfr_n=int(conf.get("lfr_n", 1)),
            upscale_samples=bool(conf.get("upsacle_samples", True)),
        )


def load_cmvn(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Kaldi nnet CMVN file (am.mvn): the <AddShift> and <Rescale> vectors.

    Features are normalised as ``(x + shift) * scale``, exactly as funasr applies them.
    """
    shift: list[str] | None = None
    scale: list[str] | None = None
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines[:-1]):
        head = line.split()[:1]
        nxt = lines[i + 1].split()
        if not head or not nxt or nxt[0] != "<LearnRateCoef>":
            continue
        # "<LearnRateCoef> 0 [ v1 v2 ... ]": the numbers sit between the brackets.
        values = nxt[3:-1]
        if head[0] == "<AddShift>":
            shift = values
        elif head[0] == "<Rescale>":
            scale = values
    if shift is None or scale is None or len(shift) != len(scale) or not shift:
        raise ValueError(f"{path}: not a Kaldi CMVN file with <AddShift> and <Rescale> vectors")
    return np.asarray(shift, dtype=np.float32), np.asarray(scale, dtype=np.float32)


def _window(kind: str, length: int) -> torch.Tensor:
    n = torch.arange(length, dtype=torch.float64)
    a = 2 * math.pi / (length - 1)
    if kind == "hamming":
        w = 0.54 - 0.46 * torch.cos(a * n)
    elif kind == "hanning":
        w = 0.5 - 0.5 * torch.cos(a * n)
    elif kind == "povey":
        w = (0.5 - 0.5 * torch.cos(a * n)).pow(0.85)
    elif kind == "rectangular":
        w = torch.ones(length, dtype=torch.float64)
    elif kind == "blackman":
        w = 0.42 - 0.5 * torch.cos(a * n) + 0.08 * torch.cos(2 * a * n)
    else:
        raise ValueError(f"unsupported window type {kind!r}")
    return w


def _mel(f: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(f, torch.Tensor):
        return 1127.0 * torch.log1p(f / 700.0)
    return 1127.0 * math.log1p(f / 700.0)


def _mel_banks(opts: FbankOptions, n_fft: int) -> torch.Tensor:
    """Kaldi's triangular mel filters, shape [n_fft // 2 + 1, n_mels] (Nyquist column zero)."""
    nyquist = opts.sample_rate / 2
    high = opts.high_freq if opts.high_freq > 0 else nyquist + opts.high_freq
    mel_low, mel_high = _mel(opts.low_freq), _mel(high)
    delta = (mel_high - mel_low) / (opts.n_mels + 1)
    num_bins = n_fft // 2
    freqs = torch.arange(num_bins, dtype=torch.float64) * (opts.sample_rate / n_fft)
    mel_f = _mel(freqs)[:, None]
    left = mel_low + torch.arange(opts.n_mels, dtype=torch.float64)[None, :] * delta
    center, right = left + delta, left + 2 * delta
    up = (mel_f - left) / (center - left)
    down = (right - mel_f) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.cat([banks, torch.zeros(1, opts.n_mels, dtype=torch.float64)], dim=0)


class BatchFrontend(torch.nn.Module):
    """waveforms [B, N] (+ lengths) -> features [B, T, n_mels * lfr_m] (+ frame counts).

    Buffers (window, mel banks, CMVN) live on the module's device; move it with `.to()`.
    Rows shorter than one frame (25 ms) get 0 frames.
    """

    def __init__(self, opts: FbankOptions, cmvn: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        self.opts = opts
        self.n_fft = 1 << (opts.frame_length - 1).bit_length()
        self.register_buffer("window", _window(opts.window, opts.frame_length).float(), persistent=False)
        self.register_buffer("mel_banks", _mel_banks(opts, self.n_fft).float(), persistent=False)
        if cmvn is not None:
            shift, scale = cmvn
            if shift.shape[0] < opts.output_size:
                raise ValueError(f"CMVN has {shift.shape[0]} dims, the features {opts.output_size}")
            shift_t = torch.from_numpy(shift[: opts.output_size].copy())
            scale_t = torch.from_numpy(scale[: opts.output_size].copy())
        else:
            shift_t = torch.zeros(opts.output_size)
            scale_t = torch.ones(opts.output_size)
        self.register_buffer("cmvn_shift", shift_t, persistent=False)
        self.register_buffer("cmvn_scale", scale_t, persistent=False)
        self.register_buffer(
            "lfr_offsets", torch.arange(opts.lfr_m) - (opts.lfr_m - 1) // 2, persistent=False
        )

    def fbank_frame_counts(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Kaldi snip_edges frame count per row: 1 + (N - L) // S, or 0 when N < L."""
        length, shift = self.opts.frame_length, self.opts.frame_shift
        return torch.where(
            num_samples >= length,
            1 + torch.div(num_samples - length, shift, rounding_mode="floor"),
            torch.zeros_like(num_samples),
        )

    def fbank(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel filterbank [B, F, n_mels] and frame counts [B]; rows past their count are 0."""
        opts = self.opts
        x = waveforms.to(self.window.device, torch.float32)
        if opts.upscale_samples:
            x = x * 32768.0
        counts = self.fbank_frame_counts(lengths.to(x.device, torch.long))
        n = x.shape[1]
        if n < opts.frame_length:
            return x.new_zeros(x.shape[0], 0, opts.n_mels), counts
        frames = x.unfold(1, opts.frame_length, opts.frame_shift)  # [B, F, L]
        frames = frames - frames.mean(dim=-1, keepdim=True)
        # Kaldi pre-emphasis: x[i] -= c * x[i-1] for i >= 1, and x[0] -= c * x[0].
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - opts.preemphasis * prev) * self.window
        spectrum = torch.fft.rfft(frames, n=self.n_fft, dim=-1)
        power = spectrum.real.square() + spectrum.imag.square()
        mel = torch.matmul(power, self.mel_banks)
        feats = torch.log(torch.clamp(mel, min=_FLT_EPSILON))
        valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < counts[:, None]
        return feats * valid[..., None], counts

    def lfr_cmvn(self, feats: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack lfr_m frames every lfr_n (funasr's rule: (m-1)//2 copies of the first frame
        on the left, the last frame repeated on the right), then apply CMVN."""
        opts = self.opts
        b, _, d = feats.shape
        lfr_counts = torch.div(counts + opts.lfr_n - 1, opts.lfr_n, rounding_mode="floor")
        t_out = -(-feats.shape[1] // opts.lfr_n)
        starts = torch.arange(t_out, device=feats.device) * opts.lfr_n
        idx = starts[:, None] + self.lfr_offsets[None, :]  # [T_out, m], in unpadded frame indices
        last = torch.clamp(counts - 1, min=0)[:, None, None]
        idx = torch.minimum(torch.clamp(idx[None], min=0), last)  # [B, T_out, m]
        gathered = torch.gather(feats, 1, idx.reshape(b, -1, 1).expand(-1, -1, d))
        out = gathered.reshape(b, t_out, opts.lfr_m * d)
        out = (out + self.cmvn_shift) * self.cmvn_scale
        valid = torch.arange(t_out, device=out.device)[None, :] < lfr_counts[:, None]
        return out * valid[..., None], lfr_counts

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, counts = self.fbank(waveforms, lengths)
        if self.opts.lfr_m == 1 and self.opts.lfr_n == 1:
            shifted = (feats + self.cmvn_shift) * self.cmvn_scale
            valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < counts[:, None]
            return shifted * valid[..., None], counts
        return self.lfr_cmvn(feats, counts)


def pad_waveforms(audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 arrays of any lengths -> zero-padded [B, N_max] tensor and lengths [B]."""
    lengths = torch.tensor([len(a) for a in audios], dtype=torch.long)
    out = torch.zeros(len(audios), int(lengths.max()) if len(audios) else 0, dtype=torch.float32)
    for i, a in enumerate(audios):
        if len(a):
            out[i, : len(a)] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return out, lengths
