"""Reference adapters built with lycoris' own modules, for equivalence tests.

A case trains nothing: it creates a lycoris network on a tiny denoiser through
``lycoris_core.create_network``, fills its parameters with deterministic non-zero values,
records lycoris' forward at several multipliers (the reference), saves the file the way the
seed's trainer does (``save_weights`` + ``lycoris_config`` metadata) and removes the
network again.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lycoris_core import LycorisConfig, create_network
from lycoris_core.tiny import build_pipeline, denoiser_inputs, denoiser_of  # noqa: F401 (re-exported)

STRENGTHS = (0.5, 1.0, 1.5, -1.0)
ATTN_FF = {"target_module": ["Attention", "FeedForward"]}


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    families: tuple[str, ...] = ("sd15", "flux")
    # per-family preset override (None: the config's own / lycoris' default targets)
    preset: dict[str, dict[str, Any]] | None = None


CASES: tuple[Case, ...] = (
    Case("lora", {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0}),
    Case("lora+dora", {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0, "dora_wd": True}),
    Case("loha", {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0}),
    Case("lokr full", {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4}),
    Case("lokr low-rank", {"algo": "lokr", "linear_dim": 2, "linear_alpha": 1.0, "factor": 4}),
    Case(
        "lokr unbalanced",
        {
            "algo": "lokr",
            "linear_dim": 10000,
            "linear_alpha": 1,
            "factor": 4,
            "unbalanced_factorization": True,
        },
    ),
    Case(
        "lokr tucker conv",
        {"algo": "lokr", "linear_dim": 2, "linear_alpha": 1.0, "factor": 4, "use_tucker": True},
        families=("sd15",),
    ),
    Case("dylora", {"algo": "dylora", "linear_dim": 8, "linear_alpha": 4.0, "block_size": 2}),
    Case("glora", {"algo": "glora", "linear_dim": 4, "linear_alpha": 2.0}),
    Case("full", {"algo": "full", "linear_dim": 4, "linear_alpha": 1}),
    Case("diag-oft", {"algo": "diag-oft", "linear_dim": 8, "linear_alpha": 1, "constraint": 0}),
    Case(
        "diag-oft rescaled",
        {"algo": "diag-oft", "linear_dim": 8, "linear_alpha": 1, "rescaled": True},
    ),
    Case("boft", {"algo": "boft", "linear_dim": 4, "linear_alpha": 1}),
    Case("ia3", {"algo": "ia3", "linear_dim": 4, "linear_alpha": 1}),
    Case(
        "lora+norms",
        {"algo": "lora", "linear_dim": 4, "linear_alpha": 2.0, "train_norm": True},
        families=("sd15",),  # Flux's norms have no affine weights (lycoris crashes there)
    ),
    Case(
        "tlora",
        {"algo": "tlora", "linear_dim": 4, "linear_alpha": 2.0},
        preset={"sd15": ATTN_FF},  # T-LoRA on k x k convolutions is not supported
    ),
)


def case_config(case: Case, family: str) -> LycorisConfig:
    d = {"multiplier": 1.0, **case.config}
    if case.preset and family in case.preset:
        d["apply_preset"] = case.preset[family]
    elif family == "flux":
        d["apply_preset"] = ATTN_FF
    return LycorisConfig.from_dict(d)


# --------------------------------------------------------------------------- tiny models


def denoiser(family: str, seed: int = 0) -> nn.Module:
    return denoiser_of(build_pipeline(family, seed=seed)).eval()


@torch.no_grad()
def forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)[0]


# --------------------------------------------------------------------------- networks


@torch.no_grad()
def randomize(net: Any, algo: str, seed: int) -> None:
    """Give every adapter parameter a deterministic non-zero value of a sensible size."""
    g = torch.Generator().manual_seed(seed)

    def noise(p: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(p.shape, generator=g).to(p.dtype) * std

    for lora in net.loras:
        for name, p in lora.named_parameters():
            if algo == "full":  # after apply_to, `weight`/`bias` hold base + diff
                p.add_(noise(p, 0.05))
            elif "dora_scale" in name:
                p.mul_(1 + noise(p, 0.1))
            elif "rescale" in name:
                p.copy_(1 + noise(p, 0.1))
            elif "lambda" in name:
                p.mul_(1 + noise(p, 0.3))
            elif name.startswith(("q_layer", "p_layer")):
                p.add_(noise(p, 0.05))
            elif algo in ("diag-oft", "boft"):
                p.copy_(noise(p, 0.05))
            elif algo == "ia3":
                p.copy_(noise(p, 0.3))
            else:
                p.copy_(noise(p, 0.3 if algo in ("lokr", "loha") else 0.2))


def full_rank_dylora() -> Any:
    """Make lycoris' DyLoRA forward use all rank blocks (it samples a random rank)."""
    import lycoris.modules.dylora as dylora

    class _MaxRank:
        @staticmethod
        def randint(a: int, b: int) -> int:
            return b

    original = dylora.random
    dylora.random = _MaxRank  # type: ignore[assignment]
    return lambda: setattr(dylora, "random", original)


@dataclass
class Reference:
    path: Path
    outputs: dict[float, torch.Tensor]
    base: torch.Tensor
    layers: int


def make_reference(
    model: nn.Module,
    config: LycorisConfig,
    inputs: dict,
    path: Path,
    seed: int = 2,
    strengths: tuple[float, ...] = STRENGTHS,
) -> Reference:
    """Create, randomise, record and save a lycoris network, then remove it from `model`."""
    base = forward(model, inputs)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    net = create_network(model, config)
    randomize(net, config.algo, seed)
    undo = full_rank_dylora() if config.algo == "dylora" else (lambda: None)
    random.seed(seed)
    try:
        outputs = {}
        for s in strengths:
            net.set_multiplier(s)
            outputs[s] = forward(model, inputs)
    finally:
        undo()
    meta = {"lycoris_config": json.dumps(config.to_dict())}
    net.save_weights(str(path), None, meta)
    net.restore()
    for lora in net.loras:  # lycoris leaves the wrappers referenced; drop them
        lora.org_module[0].__dict__.pop("_lycoris_wrappers", None)
    model.load_state_dict(saved)  # `full` re-creates the weights on restore
    return Reference(path=path, outputs=outputs, base=base, layers=len(net.loras))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in before.items()
    )
