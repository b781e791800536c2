"""The worker's systemd unit keeps the node unit's hardening (issue 17)."""

from __future__ import annotations

from pathlib import Path

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
# Hardening directives: every one the node's unit sets, the worker's must set alike.
HARDENING = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "ReadWritePaths",
             "ReadOnlyPaths", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
             "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
             "ProtectHostname", "RestrictSUIDSGID", "RestrictRealtime", "RestrictNamespaces",
             "LockPersonality", "RestrictAddressFamilies", "CapabilityBoundingSet",
             "AmbientCapabilities", "SystemCallArchitectures", "UMask", "User", "Group")


def directives(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), value.strip())
    return out


def test_worker_unit_has_the_node_units_hardening() -> None:
    node = directives(SYSTEMD / "ainode.service")
    worker = directives(SYSTEMD / "ainode-worker@.service")
    present = [k for k in HARDENING if k in node]
    assert len(present) == len(HARDENING)  # the list above names what the node sets
    assert {k: worker.get(k) for k in present} == {k: node[k] for k in present}
    assert "worker --celery" in worker["ExecStart"] and "--device cuda:%i" in worker["ExecStart"]
    assert worker["RequiresMountsFor"] == worker["ReadWritePaths"]  # the shared data dir
