"""The unit every corpus source yields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Document:
    """One document of a corpus."""

    id: str
    text: str
