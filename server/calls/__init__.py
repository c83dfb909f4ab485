"""Calls: telephony streams' transcripts, fanned out to subscribers and the webhook."""
