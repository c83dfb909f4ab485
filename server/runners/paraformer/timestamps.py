"""Token timestamps from Paraformer's CIF weights, as funasr computes them (numpy, host side).

funasr's `Paraformer.inference` calls `ts_prediction_lfr6_standard(cif_peak, alphas, tokens,
upsample_rate=1)` per row (funasr/utils/timestamp_tools.py); a token starts where the CIF
fires and the frames are 60 ms (10 ms fbank shift x LFR 6), shifted by -1.5 frames. That
function's fallback (taken whenever the frames at which it looks for peaks are not one more
than the tokens, which is the usual case for plain Paraformer because of the order of the
arguments above) renormalises the weights and re-runs integrate-and-fire in a Python loop of
torch operations, ~3 us per frame. This is the same arithmetic with the same float32 roundings
on numpy scalars, so the milliseconds are equal to funasr's (tests check it), at a fraction of
the cost.
"""

from __future__ import annotations

import numpy as np
import torch

_START_END_THRESHOLD = 5
_MAX_TOKEN_DURATION = 12
_FORCE_TIME_SHIFT = -1.5
_PEAK = np.float32(1.0 - 1e-4)


def _integrate(weights: np.ndarray, threshold: np.float32) -> np.ndarray:
    """funasr's `cif_wo_hidden` for one row: the integrator after each frame, in float32."""
    out = np.empty(weights.shape[0], dtype=np.float32)
    integrate = np.float32(0.0)
    for t, alpha in enumerate(weights):
        integrate = np.float32(integrate + alpha)
        out[t] = integrate
        if integrate >= threshold:
            integrate = np.float32(integrate - threshold)
    return out


def token_times(us_alphas: np.ndarray, us_peaks: np.ndarray, num_tokens: int, frame_s: float = 0.06) -> list[list[int]]:
    """[start_ms, end_ms] for each of `num_tokens` tokens, funasr's `ts_prediction_lfr6_standard`
    with its arguments as Paraformer passes them (`us_alphas` = the CIF fires, `us_peaks` = the
    CIF weights, both float32 over the row's encoder frames + the tail frame)."""
    if num_tokens == 0:
        return []
    alphas = np.asarray(us_alphas, dtype=np.float32)
    peaks = np.asarray(us_peaks, dtype=np.float32)
    fire_place = np.flatnonzero(peaks >= _PEAK) + _FORCE_TIME_SHIFT
    if len(fire_place) != num_tokens + 1:
        # torch's float32 sum (its reduction order differs from numpy's pairwise sum).
        total = np.float32(torch.from_numpy(np.ascontiguousarray(alphas)).sum().item())
        alphas = alphas / np.float32(total / np.float32(num_tokens + 1))
        peaks = _integrate(alphas, _PEAK)
        fire_place = np.flatnonzero(peaks >= _PEAK) + _FORCE_TIME_SHIFT
    if len(fire_place) == 0:
        return []
    num_frames = peaks.shape[0]
    stamps: list[list[float]] = []
    is_token: list[bool] = []
    if fire_place[0] > _START_END_THRESHOLD:
        stamps.append([0.0, fire_place[0] * frame_s])
        is_token.append(False)
    for i in range(min(len(fire_place) - 1, num_tokens)):
        is_token.append(True)
        if fire_place[i + 1] - fire_place[i] <= _MAX_TOKEN_DURATION:
            stamps.append([fire_place[i] * frame_s, fire_place[i + 1] * frame_s])
        else:
            # A long gap: the token lasts at most 12 frames, the rest is silence.
            split = fire_place[i] + _MAX_TOKEN_DURATION
            stamps.append([fire_place[i] * frame_s, split * frame_s])
            stamps.append([split * frame_s, fire_place[i + 1] * frame_s])
            is_token.append(False)
    if num_frames - fire_place[-1] > _START_END_THRESHOLD:
        end = (num_frames + fire_place[-1]) * 0.5
        stamps[-1][1] = end * frame_s
        stamps.append([end * frame_s, num_frames * frame_s])
        is_token.append(False)
    elif stamps:
        stamps[-1][1] = num_frames * frame_s
    return [[int(s * 1000), int(e * 1000)] for (s, e), tok in zip(stamps, is_token) if tok]
