"""Chorus: a real-time speech-recognition server that batches live streams across sessions."""

__version__ = "0.1.0"
