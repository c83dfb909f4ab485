"""A secret the operator gives in an environment variable or in a file named in config.

The environment wins; a configured file that is missing, unreadable or empty is a
ConfigError (a typo must not silently turn a check off). The secret itself never appears
in a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from server.config import ConfigError


def read_secret(environ: Mapping[str, str], env_name: str, file: str, file_key: str) -> str | None:
    """``environ[env_name]`` if set, else the stripped content of ``file`` (config key
    ``file_key``, for messages) if configured, else None."""
    value = environ.get(env_name, "").strip()
    if value:
        return value
    if not file:
        return None
    path = Path(file).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"{file_key}: cannot read {str(path)!r}: {why}") from None
    if not text:
        raise ConfigError(f"{file_key}: {str(path)!r} is empty")
    return text
