"""One "did you mean" for every name a person types: config keys, DICOM keywords, options.

Why in storage: it is a basic that every floor uses (the config in node/, the
rule grammar in node/routing), and storage is the room everyone may import.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(word: str, known: Iterable[str], *, cutoff: float = 0.75) -> str | None:
    """The closest known name (case-insensitive), quoted, or None when nothing is close.

    The cutoff keeps it from suggesting something unrelated: a hint that is wrong
    costs the admin more than no hint.
    """
    names = list(known)
    folded = {n.casefold(): n for n in names}
    if word.casefold() in folded:
        return repr(folded[word.casefold()])
    close = difflib.get_close_matches(word.casefold(), list(folded), n=1, cutoff=cutoff)
    return repr(folded[close[0]]) if close else None
