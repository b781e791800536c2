"""Import a MONAI bundle (``configs/inference.json`` + ``models/model.pt``) as a package.

Why not ``monai.bundle.ConfigParser``: it evaluates ``$`` expressions, i.e.
runs code from a downloaded file, and bundles hard-code ``cuda`` devices. The
importer reads the network definition as data instead: the ``_target_`` must
be one of MONAI's own network classes, ``@`` references are resolved, any
``$`` expression is refused, and the device is chosen by the node at load
time. Nothing is ever downloaded (no hub functions are called).

MONAI arrays are (x, y, z) in RAS; the node's are (z, y, x) in LPS. The
imported network is wrapped so it sees its training layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pipelines.models.package import (
    Architecture,
    InputContract,
    Manifest,
    Training,
    Weights,
    clear_destination,
    sha256_file,
    write_manifest,
)
from storage.errors import ModelError

__all__ = ["ALLOWED_NETWORKS", "build_bundle_network", "import_monai_bundle"]

ALLOWED_NETWORKS = frozenset({
    "UNet", "BasicUNet", "SegResNet", "DynUNet", "UNETR", "SwinUNETR", "AttentionUnet",
    "VNet", "HighResNet",
})
_LAYOUT_KEY = "_layout"


class MonaiLayout(nn.Module):
    """Feeds a (N, C, z, y, x) LPS tensor to a network trained on (N, C, x, y, z) RAS."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (z, y, x) -> (x, y, z), then LPS -> RAS flips x and y.
        ras = torch.flip(x.permute(0, 1, 4, 3, 2), dims=(2, 3))
        out = self.net(ras)
        if isinstance(out, list | tuple):
            out = out[0]
        return torch.flip(out, dims=(2, 3)).permute(0, 1, 4, 3, 2)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.net.load_state_dict(state, strict=strict, assign=assign)


def build_bundle_network(name: str, params: dict[str, Any]) -> nn.Module:
    import monai.networks.nets as nets

    if name not in ALLOWED_NETWORKS:
        raise ModelError(f"bundle network {name!r} is not an allowed MONAI network")
    p = dict(params)
    layout = p.pop(_LAYOUT_KEY, "monai-ras")
    try:
        net = getattr(nets, name)(**p)
    except TypeError as exc:
        raise ModelError(f"bad parameters for MONAI {name}: {exc}") from exc
    return MonaiLayout(net) if layout == "monai-ras" else net


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: unreadable bundle config: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: bundle config is not a mapping")
    return data


def _resolve(value: Any, cfg: dict[str, Any], depth: int = 0) -> Any:
    if depth > 10:
        raise ModelError("bundle config references nest too deeply")
    if isinstance(value, str):
        if value.startswith("$") or value.startswith("%"):
            raise ModelError(f"bundle expression {value!r} refused: the node does not run "
                             "code from a config")
        if value.startswith("@"):
            key = value[1:]
            node: Any = cfg
            for part in key.split("#"):
                if not isinstance(node, dict) or part not in node:
                    raise ModelError(f"bundle reference {value!r} not found")
                node = node[part]
            return _resolve(node, cfg, depth + 1)
        return value
    if isinstance(value, list):
        return [_resolve(v, cfg, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, cfg, depth + 1) for k, v in value.items()}
    return value


def _transforms(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    pre = cfg.get("preprocessing", {})
    ts = pre.get("transforms", []) if isinstance(pre, dict) else []
    return [t for t in ts if isinstance(t, dict)]


def import_monai_bundle(src: Path, dest_root: Path, *, name: str | None = None,
                        task: str = "pancreas-localisation", force: bool = False) -> Path:
    cfg_path = next((src / "configs" / f"inference.{e}" for e in ("json", "yaml", "yml")
                     if (src / "configs" / f"inference.{e}").exists()), None)
    weights = src / "models" / "model.pt"
    if cfg_path is None:
        raise ModelError(f"{src}: no configs/inference.json; not a MONAI bundle")
    if not weights.exists():
        raise ModelError(f"{src}: no models/model.pt (TorchScript-only bundles not supported)")
    cfg = _read(cfg_path)
    meta = _read(src / "configs" / "metadata.json") if \
        (src / "configs" / "metadata.json").exists() else {}
    net_def = _resolve(cfg.get("network_def"), cfg)
    if not isinstance(net_def, dict) or "_target_" not in net_def:
        raise ModelError(f"{cfg_path}: no network_def with a _target_")
    target = str(net_def["_target_"]).rsplit(".", 1)[-1]
    if target not in ALLOWED_NETWORKS:
        raise ModelError(f"{cfg_path}: network {net_def['_target_']!r} is not an allowed "
                         f"MONAI network ({', '.join(sorted(ALLOWED_NETWORKS))})")
    params = {k: v for k, v in net_def.items() if not k.startswith("_")}
    spacing = (1.5, 1.5, 2.0)
    window: tuple[float, float] | None = None
    for t in _transforms(cfg):
        tgt = str(t.get("_target_", "")).rsplit(".", 1)[-1]
        if tgt in ("Spacingd", "Spacing") and "pixdim" in t:
            spacing = tuple(float(v) for v in _resolve(t["pixdim"], cfg))  # type: ignore[assignment]
        if tgt in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            window = (float(_resolve(t["a_min"], cfg)), float(_resolve(t["a_max"], cfg)))
    inferer = _resolve(cfg.get("inferer", {}), cfg)
    roi = inferer.get("roi_size", [96, 96, 96]) if isinstance(inferer, dict) else [96, 96, 96]
    try:
        channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        labels = [str(channel_def[k]) for k in sorted(channel_def, key=int)]
    except (KeyError, TypeError, ValueError):
        labels = ["background", "pancreas"]
    pkg_name = name or str(meta.get("name") or src.name).replace(" ", "_")
    # Build once now: a bundle whose weights do not fit its network is refused at import.
    net = build_bundle_network(target, params)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        net.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: weights do not fit {target}: {exc}") from exc
    out = dest_root / pkg_name
    clear_destination(out, force=force)
    out.mkdir(parents=True)
    shutil.copy2(weights, out / "weights.pt")
    manifest = Manifest(
        name=pkg_name,
        version=str(meta.get("version", "0")),
        task=task,  # type: ignore[arg-type]
        architecture=Architecture(name=target, params={**params, _LAYOUT_KEY: "monai-ras"}),
        input=InputContract(
            modality="CT", spacing_mm=spacing,  # type: ignore[arg-type]
            patch_size=tuple(int(v) for v in roi)[::-1],  # type: ignore[arg-type]
            intensity_preset="ct_range" if window else "ct_pancreas", intensity_window=window,
        ),
        labels=labels,
        outputs="segmentation logits over labels (softmax), from a MONAI bundle",
        weights=Weights(file="weights.pt", sha256=sha256_file(out / "weights.pt")),
        training=Training(provenance={"monai_bundle": str(src), "bundle_meta": {
            k: meta[k] for k in ("name", "version", "authors", "task") if k in meta}}),
        intended_use=str(meta.get("intended_use", "as stated by the bundle's authors")),
        source="monai-bundle",
    )
    write_manifest(out, manifest)
    return out
