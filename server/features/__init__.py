"""Batched acoustic feature extraction (fbank, LFR, CMVN, log-mel) on CPU or GPU."""
