"""Which modules of a model get adapters.

lycoris keeps its preset (target classes, names, algorithm maps, key prefix, ...) in
*class attributes* of ``LycorisNetwork`` that persist between calls, and only the keys a
preset names are replaced. Every network this library creates goes through
:func:`create_network`, which sets a complete preset under a lock and restores the previous
class attributes afterwards: config A then config B gives exactly what B alone gives.

Target class names are matched exactly by lycoris. diffusers >= 0.35 renamed some attention
classes (Flux uses ``FluxAttention``), so the seed config ``["Attention", "FeedForward"]`` would
silently wrap only the feed-forward layers of a stock Flux. :data:`CLASS_ALIASES` lets a target
name also match the diffusers classes it stands for; every resolution is reported by
:func:`coverage`. A target that matches nothing is an :class:`IncompatibleModelError`.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import LycorisConfig
from .errors import IncompatibleModelError
from .quantization import (
    is_quantised_linear,
    model_precision,
    quantised_layers,
)

logger = logging.getLogger(__name__)

_PRESET_LOCK = threading.RLock()

# lycoris-lora 4.x class defaults of LycorisNetwork (wrapper.py): the base of every preset.
_LYCORIS_DEFAULTS: dict[str, Any] = {
    "ENABLE_CONV": True,
    "TARGET_REPLACE_MODULE": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
    "TARGET_REPLACE_NAME": [],
    "LORA_PREFIX": "lycoris",
    "MODULE_ALGO_MAP": {},
    "NAME_ALGO_MAP": {},
    "USE_FNMATCH": False,
    "TARGET_EXCLUDE_NAME": [],
}


def _is_diffusers_attention(module: nn.Module) -> bool:
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a hard dependency
        return False
    return isinstance(module, (Attention, AttentionModuleMixin))


@dataclass(frozen=True)
class ClassAlias:
    """A target class name that also matches other classes, and why."""

    reason: str
    matches: Callable[[nn.Module], bool]


# Small and explicit on purpose. Reported in every Coverage.
CLASS_ALIASES: dict[str, ClassAlias] = {
    "Attention": ClassAlias(
        "diffusers attention classes (Attention and every AttentionModuleMixin class, "
        "e.g. FluxAttention in diffusers >= 0.35)",
        _is_diffusers_attention,
    ),
    "Linear": ClassAlias(
        "Linear layers of a quantised base (bitsandbytes Linear8bitLt / Linear4bit, GGUF)",
        lambda m: type(m) is nn.Linear or is_quantised_linear(m),
    ),
}


@dataclass
class Coverage:
    """What a config targets on a model.

    ``targets``: target (class name or name pattern) -> matched module paths.
    ``resolved``: target class name -> the concrete class names it matched (aliases).
    ``layers``: module paths of the layers lycoris wraps, with the algorithm of each.
    """

    targets: dict[str, list[str]] = field(default_factory=dict)
    resolved: dict[str, list[str]] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{len(self.layers)} layers wrapped"]
        for target, mods in self.targets.items():
            classes = self.resolved.get(target)
            via = f" (as {', '.join(classes)})" if classes and classes != [target] else ""
            lines.append(f"  {target}{via}: {len(mods)} modules")
        algos: dict[str, int] = {}
        for algo in self.layers.values():
            algos[algo] = algos.get(algo, 0) + 1
        if algos:
            lines.append(
                "  algorithms: " + ", ".join(f"{a} x{n}" for a, n in sorted(algos.items()))
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": {k: list(v) for k, v in self.targets.items()},
            "resolved": {k: list(v) for k, v in self.resolved.items()},
            "layers": dict(self.layers),
            "aliases": dict(self.aliases),
        }


# --------------------------------------------------------------------------- presets


def _name_matcher(use_fnmatch: bool) -> Callable[[str, str], bool]:
    if use_fnmatch:
        return lambda pattern, name: fnmatch.fnmatch(name, pattern)
    return lambda pattern, name: bool(re.match(pattern, name))


def _classes_for(target: str, module: nn.Module) -> list[str]:
    """Concrete class names in `module` that the target class name stands for."""
    alias = CLASS_ALIASES.get(target)
    found: list[str] = []
    for m in module.modules():
        name = type(m).__name__
        if (name == target or (alias is not None and alias.matches(m))) and name not in found:
            found.append(name)
    return found


def resolve_preset(module: nn.Module, config: LycorisConfig) -> tuple[dict[str, Any], Coverage]:
    """The complete lycoris preset (class attribute values) for `config` on `module`.

    Target class names are expanded through :data:`CLASS_ALIASES` to the classes the model
    has; ``module_algo_map`` entries follow their class. A target matching nothing raises
    :class:`IncompatibleModelError`.
    """
    from lycoris.config import PRESET

    raw = dict(config.apply_preset or {})
    preset = {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in _LYCORIS_DEFAULTS.items()
    }
    named = config.keywords.get("preset")
    if named:  # lycoris' named presets only carry enable_conv / name_algo_map here
        base = PRESET[named]
        preset["ENABLE_CONV"] = base.get("enable_conv", True)
        preset["NAME_ALGO_MAP"] = dict(base.get("name_algo_map", {}))

    target_module = list(raw.get("target_module", [])) + list(raw.get("unet_target_module", []))
    target_name = list(raw.get("target_name", [])) + list(raw.get("unet_target_name", []))
    module_map: dict[str, dict] = dict(raw.get("module_algo_map", {}))
    name_map: dict[str, dict] = {**preset["NAME_ALGO_MAP"], **raw.get("name_algo_map", {})}
    use_fnmatch = bool(raw.get("use_fnmatch", False))

    explicit_modules = "target_module" in raw or "unet_target_module" in raw
    if not explicit_modules and (target_name or name_map or module_map):
        # A preset naming only modules by name (or by map) means "only these": lycoris would
        # keep its default of every Linear/Conv/Norm (trap: 'target_name only wraps all').
        target_module = []
    elif not explicit_modules:
        target_module = list(_LYCORIS_DEFAULTS["TARGET_REPLACE_MODULE"])

    cov = Coverage()
    resolved_modules: list[str] = []
    for target in dict.fromkeys(target_module + list(module_map)):
        classes = _classes_for(target, module)
        cov.resolved[target] = classes
        if target in CLASS_ALIASES and classes != [target]:
            cov.aliases[target] = CLASS_ALIASES[target].reason
        cov.targets[target] = [n for n, m in module.named_modules() if type(m).__name__ in classes]
        if target in target_module:
            resolved_modules.extend(c for c in classes if c not in resolved_modules)

    expanded_map: dict[str, dict] = {}
    for target, entry in module_map.items():
        for cls_name in cov.resolved.get(target, []):
            # an explicit entry for the concrete class wins over one reached through an alias
            if cls_name not in expanded_map or cls_name == target:
                expanded_map[cls_name] = dict(entry)

    match = _name_matcher(use_fnmatch)
    names = [n for n, _ in module.named_modules() if n]
    for pattern in dict.fromkeys(target_name + list(name_map)):
        cov.targets[pattern] = [n for n in names if n == pattern or match(pattern, n)]

    explicit = (target_module if explicit_modules else []) + target_name
    _check_all_matched(module, config, cov, user_targets=explicit)

    if "enable_conv" in raw:
        preset["ENABLE_CONV"] = raw["enable_conv"]
    preset["TARGET_REPLACE_MODULE"] = resolved_modules
    preset["TARGET_REPLACE_NAME"] = target_name
    preset["MODULE_ALGO_MAP"] = expanded_map
    preset["NAME_ALGO_MAP"] = name_map
    preset["USE_FNMATCH"] = use_fnmatch
    preset["TARGET_EXCLUDE_NAME"] = list(raw.get("exclude_name", []))
    preset["LORA_PREFIX"] = raw.get("lora_prefix", _LYCORIS_DEFAULTS["LORA_PREFIX"])
    return preset, cov


def model_class_names(module: nn.Module) -> list[str]:
    """Attention/MLP-like class names of a model, for error messages."""
    keys = ("attention", "attn", "feedforward", "mlp", "ffn", "block")
    found = {type(m).__name__ for m in module.modules()}
    return sorted(n for n in found if any(k in n.lower() for k in keys))


def _check_all_matched(
    module: nn.Module, config: LycorisConfig, cov: Coverage, user_targets: list[str]
) -> None:
    missing = [t for t in dict.fromkeys(user_targets) if not cov.targets.get(t)]
    missing += [
        t
        for t in (config.apply_preset or {}).get("module_algo_map", {})
        if not cov.targets.get(t) and t not in missing
    ]
    if not missing:
        return
    src = f"{config.source}: " if config.source else ""
    raise IncompatibleModelError(
        f"{src}target(s) {', '.join(repr(t) for t in missing)} match no module of this "
        f"{type(module).__name__}. Attention/MLP classes it has: "
        f"{', '.join(model_class_names(module)) or '(none)'}. Fix apply_preset.target_module "
        "(class names) or apply_preset.target_name (module paths), or use a config made for "
        "this model family."
    )


@contextmanager
def preset_applied(preset: dict[str, Any]) -> Iterator[type]:
    """Set lycoris' class-level preset completely, under a lock; restore it on exit."""
    from lycoris import LycorisNetwork

    with _PRESET_LOCK:
        saved = {k: getattr(LycorisNetwork, k) for k in _LYCORIS_DEFAULTS}
        try:
            for k, v in preset.items():
                setattr(LycorisNetwork, k, v)
            yield LycorisNetwork
        finally:
            for k, v in saved.items():
                setattr(LycorisNetwork, k, v)


@contextmanager
def _quiet_lycoris() -> Iterator[None]:
    """lycoris logs every creation at INFO on stdout; keep that for our DEBUG level only."""
    lyco = logging.getLogger("LyCORIS")
    saved = lyco.level
    if not logger.isEnabledFor(logging.DEBUG):
        lyco.setLevel(max(saved, logging.WARNING))
    try:
        yield
    finally:
        lyco.setLevel(saved)


def _build(module: nn.Module, config: LycorisConfig, preset: dict[str, Any]) -> Any:
    with preset_applied(preset) as network_cls, _quiet_lycoris():
        return network_cls(module, warn_on_unmatched=False, **config.network_kwargs())


def coverage(module: nn.Module, config: LycorisConfig) -> Coverage:
    """Matched modules per target, and the layers lycoris would wrap (nothing is applied)."""
    preset, cov = resolve_preset(module, config)
    with torch.device("meta"):
        net = _build(module, config, preset)
    prefix = preset["LORA_PREFIX"] + "_"
    by_key = {prefix + n.replace(".", "_"): n for n, _ in module.named_modules() if n}
    for lora in net.loras:
        path = by_key.get(lora.lora_name, lora.lora_name)
        cov.layers[path] = getattr(lora, "name", type(lora).__name__)
    return cov


def quantised_base_refusal(config: LycorisConfig, precision: str) -> str | None:
    """Why `config` cannot train over a base stored at `precision` (fp8/int8/nf4), or None.

    lycoris trains over quantised layers in bypass mode only (``base(x) + adapter(x)``):
    ``full`` replaces the weight itself (lycoris refuses it on quantised layers), and the
    bypass forward leaves out DoRA's weight norm, so DoRA would train something else."""
    kw = config.network_kwargs()
    maps = (config.apply_preset or {}).get("module_algo_map", {}) | (config.apply_preset or {}).get(
        "name_algo_map", {}
    )
    entries = [kw, *(v for v in maps.values() if isinstance(v, dict))]
    if any(e.get("algo", e.get("network_module")) == "full" for e in entries):
        return (
            f"algo 'full' trains the whole weight, which a {precision} base does not store in "
            "full precision; use lora/lokr/loha, or base_precision bf16/fp32"
        )
    if any(e.get("weight_decompose") or e.get("dora_wd") for e in entries):
        return (
            f"DoRA (weight_decompose / dora_wd) needs the base weight's norm in every forward; "
            f"lycoris' bypass forward over a {precision} base leaves it out, so the result would "
            "not be DoRA; turn weight_decompose off, or use base_precision bf16/fp32"
        )
    return None


def create_network(module: nn.Module, config: LycorisConfig) -> Any:
    """A ``lycoris.LycorisNetwork`` for `module`, applied (``apply_to``) and ready to train.

    The preset is isolated (see module docstring); target aliases are resolved; a config
    that wraps nothing raises :class:`IncompatibleModelError`. Over a quantised base
    (fp8/int8/nf4 layers) the network runs in bypass mode, or the config is refused
    (:func:`quantised_base_refusal`).
    """
    preset, cov = resolve_preset(module, config)
    quantised = quantised_layers(module)
    if quantised:
        precision = model_precision(module)
        why = quantised_base_refusal(config, precision)
        if why is not None:
            raise IncompatibleModelError(f"{config.source or 'lycoris config'}: {why}")
        config = config.with_overrides(bypass_mode=True)
    net = _build(module, config, preset)
    if not net.loras:
        src = f"{config.source}: " if config.source else ""
        raise IncompatibleModelError(
            f"{src}the config wraps 0 layers of this {type(module).__name__} (targets "
            f"{', '.join(cov.targets) or 'none'}). Its attention/MLP classes: "
            f"{', '.join(model_class_names(module)) or '(none)'}."
        )
    device = next((p.device for p in module.parameters()), None)
    net.apply_to()  # registers the wrapper modules (net.parameters() is empty before)
    # lycoris creates its parameters on the CPU; they train where the model runs (in fp32:
    # mixed precision autocasts the compute and keeps these as the master weights).
    if device is not None and device.type != "cpu":
        net.to(device)
    logger.info("created LyCORIS network: %d layers (%s)", len(net.loras), config.algo)
    return net
