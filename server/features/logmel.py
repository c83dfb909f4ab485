"""Whisper's log-mel spectrogram, batched in torch on the runner's device.

Same recipe as OpenAI's `whisper.audio`: each item is padded or trimmed to 30 s, then
STFT (n_fft 400, hop 160, Hann, centred with reflection), power spectrum without the
last frame, 80 Slaney-normalised mel bands, log10 with a 1e-10 floor, the dynamic range
clipped to 8 (per item), and scaled as (x + 4) / 4. The mel filterbank is computed here
(librosa's Slaney formula) instead of downloaded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE
N_FRAMES = CHUNK_SAMPLES // HOP  # 3000


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(n_mels: int = 80, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """[n_mels, n_fft//2+1] Slaney mel filterbank with area normalisation (librosa's default)."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (hz[2 : n_mels + 2] - hz[:n_mels]))[:, None]
    return weights.astype(np.float32)


class LogMel(torch.nn.Module):
    """audio list -> [B, n_mels, 3000] on the module's device."""

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters(n_mels)), persistent=False)

    def pad_batch(self, audios: Sequence[np.ndarray]) -> torch.Tensor:
        batch = np.zeros((len(audios), CHUNK_SAMPLES), dtype=np.float32)
        for i, a in enumerate(audios):
            n = min(len(a), CHUNK_SAMPLES)
            batch[i, :n] = a[:n]
        return torch.from_numpy(batch)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: [B, 480000] float32 -> log-mel [B, n_mels, 3000]."""
        stft = torch.stft(audio, N_FFT, HOP, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        mel = self.filters @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0
