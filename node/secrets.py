"""Masking secrets wherever the node prints: ``config show``, log lines, error messages.

Why one module: a password reaches output by many roads (a database URL in
the config, a broker URL, a driver's error text quoting its DSN, a field
named ``password``), and each road masked on its own is a road forgotten.
This module only masks; where secrets come from (files, the environment) is
the configuration's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "is_secret_key", "mask_text", "mask_tree", "mask_url", "secrets_of"]

MASK = "***"
# scheme://user:password@host -> the password part; any scheme (postgresql, amqp, redis).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?=@)")
# password=..., "password": "..." in driver messages and DSNs.
_KEYWORD = re.compile(r"(?P<head>\b(?:password|passwd|pwd|secret|token)\s*[=:]\s*['\"]?)"
                      r"(?P<pw>[^'\"\s,;&]+)", re.IGNORECASE)
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|private_key_pass)",
                         re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """A config key whose value is a secret by its name (``password``, ``*_token``...)."""
    return bool(_SECRET_KEY.search(key)) and not key.endswith("_file")


def mask_url(url: str) -> str:
    """``postgresql://ainode:***@db/ainode``: the user and host stay, for diagnosis."""
    return _URL_PASSWORD.sub(lambda m: m["head"] + MASK, url)


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Any URL password, ``password=...`` pair and each known secret value masked."""
    out = _KEYWORD.sub(lambda m: m["head"] + MASK, mask_url(text))
    for secret in secrets:
        if secret and len(secret) >= 3:  # a one-letter "secret" would mask every word
            out = out.replace(secret, MASK)
    return out


def mask_tree(data: Any, key: str = "") -> Any:
    """A config dump with every secret-named value and every URL password masked."""
    if isinstance(data, dict):
        return {k: mask_tree(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_tree(v, key) for v in data]
    if isinstance(data, str):
        return MASK if data and is_secret_key(key) else mask_url(data)
    return data


def secrets_of(config: Any) -> list[str]:
    """The secret values in a configuration, so log lines can mask them verbatim too.

    Why verbatim as well as by pattern: a driver may print the password alone,
    e.g. inside a quoted DSN the URL pattern does not recognise.
    """
    found: list[str] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str):
            if is_secret_key(key) and value:
                found.append(value)
            for m in _URL_PASSWORD.finditer(value):
                found.append(m["pw"])

    dump = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    walk(dump, "")
    return sorted(set(found), key=len, reverse=True)
