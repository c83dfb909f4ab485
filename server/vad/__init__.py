"""Endpointing: cutting a live 16 kHz stream into speech segments (webrtcvad based)."""
