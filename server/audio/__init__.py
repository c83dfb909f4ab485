"""Audio input: decoding of wire encodings (PCM, G.711), resampling to 16 kHz, WAV files."""
