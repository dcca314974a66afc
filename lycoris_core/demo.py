"""The main job until training lands: the seed's config on a tiny Flux, end to end.

Saves a tiny random FLUX.1-dev-layout pipeline, wraps its transformer with the seed's
``lycoris_config.json`` (LoKr, attention + feed-forward), gives the adapter non-zero weights
(a stand-in for training), saves it like the seed's trainer, inspects it, and applies it at
several strengths in merge and dynamic mode, checking both against lycoris' own forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .adapters import load_adapter
from .config import SEED_EXAMPLE, LycorisConfig
from .io import atomic_write, write_safetensors
from .models import load_denoiser
from .patching import patched
from .report import describe, format_report
from .targeting import coverage, create_network
from .tiny import denoiser_inputs, make_tiny

STRENGTHS = (0.0, 0.5, 1.0, 1.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def run_demo(out: Path, seed: int = 0) -> str:
    """Run the demo into folder `out`; returns a text summary (also written to out/)."""
    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "tiny-flux"
    if not (base_dir / "model_index.json").is_file():
        make_tiny("flux", base_dir, seed=seed)
    model = load_denoiser(base_dir)
    config = LycorisConfig.from_dict(SEED_EXAMPLE, source="seed lycoris_config.json")
    (out / "lycoris_config.json").write_text(config.to_json() + "\n", encoding="utf-8")
    cov = coverage(model, config)

    inputs = denoiser_inputs(model, seed=seed + 1)
    base = model(**inputs)[0]
    net = create_network(model, config)
    g = torch.Generator().manual_seed(seed + 2)
    for p in net.parameters():  # stand-in for training: small non-zero factors
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    reference = {}
    for s in STRENGTHS:
        net.set_multiplier(s)
        reference[s] = model(**inputs)[0]
    adapter_path = out / "demo_lokr.safetensors"
    write_safetensors(adapter_path, net.state_dict(), {"lycoris_config": config.to_json()})
    net.restore()

    adapter = load_adapter(adapter_path)
    info = describe(adapter, model)
    atomic_write(
        out / "demo_lokr.inspect.txt",
        lambda tmp: Path(tmp).write_text(format_report(info) + "\n", encoding="utf-8"),
    )
    rows = []
    for s in STRENGTHS:
        outs = {}
        for mode in ("merge", "dynamic"):
            with patched(model, [(adapter, s)], mode=mode):
                outs[mode] = model(**inputs)[0]
        rows.append(
            {
                "strength": s,
                "change_vs_base": _rel(outs["merge"], base),
                "merge_vs_lycoris_forward": _rel(outs["merge"], reference[s]),
                "dynamic_vs_lycoris_forward": _rel(outs["dynamic"], reference[s]),
                "strength0_bitwise_base": bool(torch.equal(outs["merge"], base))
                if s == 0
                else None,
            }
        )
    unchanged = torch.equal(model(**inputs)[0], base)
    report = {
        "base": str(base_dir),
        "adapter": str(adapter_path),
        "coverage": cov.to_dict() | {"summary": cov.summary()},
        "algorithms": adapter.algorithms(),
        "params": adapter.num_params(),
        "rows": rows,
        "base_unchanged_after": unchanged,
    }
    atomic_write(
        out / "demo_report.json",
        lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2), encoding="utf-8"),
    )
    lines = [
        f"tiny Flux: {base_dir}",
        f"seed config: {cov.summary()}",
        f"adapter: {adapter_path} ({adapter.num_params():,} params, {adapter.algorithms()})",
        f"inspect: {out / 'demo_lokr.inspect.txt'}",
        "strength  change   merge-vs-lycoris  dynamic-vs-lycoris",
    ]
    for r in rows:
        merge, dynamic = r["merge_vs_lycoris_forward"], r["dynamic_vs_lycoris_forward"]
        change = r["change_vs_base"]
        lines.append(f"{r['strength']:>8.2f}  {change:.4f}   {merge:.1e}           {dynamic:.1e}")
    lines.append(f"base weights bitwise unchanged afterwards: {unchanged}")
    lines.append(f"report: {out / 'demo_report.json'}")
    return "\n".join(lines)
