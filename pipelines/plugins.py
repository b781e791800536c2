"""Entry points of the installed distributions, the one way both registries find plug-ins.

Why not ``importlib.metadata.entry_points``: it keeps only the first copy of
a distribution's metadata on ``sys.path``, and a stale ``*.egg-info`` left in
a checkout sits first when the node runs from it, hiding what is really
installed. Here every copy is read and, per distribution (PEP 503 names),
the first copy that publishes a name in the group wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, distributions

__all__ = ["Published", "published"]


@dataclass(frozen=True)
class Published:
    entry_point: EntryPoint
    distribution: str  # as its metadata names it
    version: str

    @property
    def key(self) -> str:
        """The distribution under PEP 503 normalisation (``dicom_ai_node`` = ``dicom-ai-node``)."""
        return re.sub(r"[-_.]+", "-", self.distribution).lower()

    @property
    def origin(self) -> str:
        return f"{self.entry_point.value}, entry point of {self.distribution} {self.version}"


def published(group: str) -> list[Published]:
    """Every (distribution, name) published in ``group``, in ``sys.path`` order."""
    seen: set[tuple[str, str]] = set()
    out: list[Published] = []
    for dist in distributions():
        for ep in dist.entry_points.select(group=group):
            pub = Published(ep, str(dist.metadata["Name"] or "?"), str(dist.version))
            if (pub.key, ep.name) not in seen:
                seen.add((pub.key, ep.name))
                out.append(pub)
    return out
