"""Describe adapter files: algorithm per layer, ranks/factors, metadata, model coverage."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from .adapters import Adapter, LayerAdapter
from .errors import AdapterFormatError

_SHOWN_METADATA = 12


def describe_layer(layer: LayerAdapter) -> dict[str, Any]:
    """Algorithm, rank/factors, alpha and scale of one layer, JSON-friendly."""
    t = layer.tensors
    info: dict[str, Any] = {"algo": layer.label}
    rank = layer.rank()
    if rank is not None:
        info["rank"] = rank
    if layer.alpha is not None:
        info["alpha"] = layer.alpha
    info.update(layer.algorithm.describe(layer))
    info["params"] = sum(v.numel() for k, v in t.items() if k != "alpha")
    info["dtype"] = str(next(iter(t.values())).dtype).replace("torch.", "")
    return info


def describe(adapter: Adapter, module: Any = None) -> dict[str, Any]:
    """A JSON-friendly description; with `module` (a denoiser, or a whole pipeline: then its
    text encoders too), per component the layout detected and which layers match."""
    out: dict[str, Any] = {
        "file": adapter.path,
        "fingerprint": adapter.fingerprint,
        "layers": len(adapter.layers),
        "params": adapter.num_params(),
        "algorithms": adapter.algorithms(),
        "config": adapter.config.to_dict() if adapter.config else None,
        "metadata": {
            k: (v if len(v) <= 200 else v[:200] + "...")
            for k, v in sorted(adapter.metadata.items())
            if k != "lycoris_config"
        },
        "per_layer": {name: describe_layer(layer) for name, layer in adapter.layers.items()},
    }
    if module is not None:
        _describe_binding(out, adapter, module)
    return out


def _components(model: Any) -> tuple[dict[str, nn.Module], str | None]:
    """(component -> module, family) of a denoiser module or of a whole pipeline."""
    if isinstance(model, nn.Module):
        return {"denoiser": model}, None
    from .families import detect_family
    from .pipeline_patch import text_encoders

    family = detect_family(model)
    return {"denoiser": getattr(model, family.denoiser), **text_encoders(model)}, family.name


def _describe_binding(out: dict[str, Any], adapter: Adapter, model: Any) -> None:
    """Per component: the layout detected, matched and unmatched layers, what is wrong."""
    components, family = _components(model)
    elsewhere = tuple(c for c in components if c != "denoiser")
    out["matched"], out["components"] = {}, {}
    unmatched: set[str] = set()
    for component, module in components.items():
        try:
            binding = adapter.bind(
                module, strict=None, component=component, family=family, elsewhere=elsewhere
            )
        except AdapterFormatError as exc:  # e.g. a layer that does not fit its module
            out["components"][component] = {"error": str(exc)}
            out.setdefault("bind_error", str(exc))
            continue
        if component != "denoiser" and not (binding.targets or binding.unmatched):
            continue  # the file has nothing for this text encoder
        for name, ts in binding.targets.items():
            out["matched"][name] = " + ".join(str(t) for t in ts)
        unmatched.update(binding.unmatched)
        entry: dict[str, Any] = {
            "model": binding.model,
            "layout": binding.layout,
            "layouts": binding.layouts,
            "matched": len(binding.targets),
            "unmatched": sorted(binding.unmatched),
        }
        if binding.problem:
            entry["error" if not binding.targets else "warning"] = binding.problem
            if not binding.targets:
                out.setdefault("bind_error", binding.problem)
        out["components"][component] = entry
    out["unmatched"] = sorted(unmatched - set(out["matched"]))


def format_report(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`describe`'s result."""
    lines = [
        f"file: {info['file']}",
        f"layers: {info['layers']}  params: {info['params']:,}  fingerprint: {info['fingerprint']}",
        "algorithms: " + ", ".join(f"{a} x{n}" for a, n in sorted(info["algorithms"].items())),
    ]
    if info["config"]:
        lines.append("lycoris_config: " + json.dumps(info["config"], sort_keys=False))
    meta = list(info["metadata"].items())
    for k, v in meta[:_SHOWN_METADATA]:
        lines.append(f"  {k}: {v}")
    if len(meta) > _SHOWN_METADATA:
        lines.append(f"  ... {len(meta) - _SHOWN_METADATA} more metadata keys")
    for component, entry in info.get("components", {}).items():
        if "layout" in entry:
            layout = entry["layout"] or "no layout recognised"
            lines.append(
                f"{component}: {layout} ({entry['model']}): {entry['matched']} matched, "
                f"{len(entry['unmatched'])} unmatched"
            )
        for key in ("error", "warning"):
            if entry.get(key):
                lines.append(f"  {key}: {entry[key]}")
        for name in entry.get("unmatched", [])[:10]:
            lines.append(f"  unmatched: {name}")
    lines.append("per layer:")
    for name, layer in info["per_layer"].items():
        extras = ", ".join(f"{k}={v}" for k, v in layer.items() if k != "algo")
        target = info.get("matched", {}).get(name)
        where = f" -> {target}" if target else ""
        lines.append(f"  {name}{where}: {layer['algo']} ({extras})")
    return "\n".join(lines)
