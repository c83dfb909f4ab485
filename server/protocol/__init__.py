"""Pure message codecs, one module per wire dialect; no sockets here."""
