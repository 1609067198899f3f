"""What counts as a secret in a config, a tag or a URL, and how it is hidden before it leaves the process.

Used wherever values are written for others to read: MLflow params and tags (:mod:`refine_core.tracking`), the
``config.yaml`` a stage writes beside its checkpoints (:func:`refine_core.config.dump_yaml`), offline tracking
journals. Environment variables are never written at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"

# Key words that mark a secret. ``token`` must stand alone as a word (``hf_token``, ``apiToken``) so that
# ``model.tokenizer`` and ``data.max_tokens`` stay visible.
_SECRET_WORDS = re.compile(r"password|passwd|secret|access_?key|credential|private_?key|(?<![a-z])token(?![a-z])")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# ``scheme://user:password@host`` in a value: keep the host, drop the user info.
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def is_secret_key(key: str) -> bool:
    """Whether a param/tag key names a secret (password, secret, token, access key, credential; any case)."""
    return bool(_SECRET_WORDS.search(_CAMEL_BOUNDARY.sub("_", key).lower()))


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a (possibly nested) mapping with secret-looking keys' values and URL passwords replaced."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        out[key] = REDACTED if is_secret_key(str(key)) else _redact_value(value)
    return out


def redact_text(text: str) -> str:
    """``text`` with the user info of every ``scheme://user:password@host`` in it replaced (hosts stay visible)."""
    return _URL_USERINFO.sub(f"{REDACTED}@", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
