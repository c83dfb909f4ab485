"""Network edge: the websockets listener, HTTP routes, admission, per-dialect connection adapters."""
