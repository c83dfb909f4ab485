"""Chorus test suite."""
