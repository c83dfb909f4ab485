"""Recordings sent whole: cut at pauses, batched at low priority, stitched back in order."""
