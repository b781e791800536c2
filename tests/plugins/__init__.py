"""Plug-in packages for the tests, published the way a pip-installed package is.

:func:`publish` writes the ``*.dist-info`` folder that ``pip install`` would
(a METADATA and an ``entry_points.txt``) into a temporary folder; with that
folder on ``sys.path`` the node's registries discover the plug-in through
``importlib.metadata`` exactly as they discover an installed one. The code a
plug-in names lives in the packages below (``tests.plugins.tiny_pipeline``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["publish"]


def publish(root: Path, dist: str, groups: Mapping[str, Mapping[str, str]], *,
            version: str = "0.1.0") -> Path:
    """A dist-info for ``dist`` under ``root`` with ``groups`` ({group: {name: "module:attr"}})."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, eps in groups.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in eps.items())
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return info
