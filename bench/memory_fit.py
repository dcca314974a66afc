"""Measure the activation constants of ``lycoris_core/memory.py`` (CPU, a few minutes).

Run from the repository root::

    .venv/bin/python bench/memory_fit.py [--out bench/results/memory_fit.json]

For each configuration (random Flux transformers and SDXL-layout UNets of a few widths and
depths, with a LyCORIS network on Attention + FeedForward) one training step runs under
``torch.profiler.profile(profile_memory=True)``: the forward, an MSE loss, the backward. The
largest "Total Allocated" of the profiler's ``[memory]`` events is the peak that the step
allocated on top of what existed before it (weights, adapter parameters): activations saved
for the backward, transient buffers, the adapter's gradients. The adapter's gradient bytes
(known exactly) are subtracted; what is left is divided by the model's activation unit:

* Flux (double and single blocks): ``batch x (image + text tokens) x hidden x element size``
  per block; least squares gives bytes per unit for a double block, a single block and the
  blocks-independent rest (embeddings, output projection, loss);
* UNet: ``batch x latent pixels x element size x sum_i(c_i x (1 + t_i) / 4**i)`` over the
  resolution levels (c_i block_out_channels, t_i transformer layers per block);
* with gradient checkpointing the same fits (only block inputs stay, plus one block's
  recompute in the backward).

LoKr (the seed's config) materialises each wrapped layer's full weight delta in the forward;
its extra bytes over LoRA rank 4 are fitted per byte of wrapped fp32 weight.

The printed constants are copied into ``lycoris_core/memory.py`` (``FLUX_*``, ``UNET_*``);
the JSON keeps every measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import apply as common  # noqa: E402
import torch  # noqa: E402

LORA = {
    "algo": "lora",
    "multiplier": 1.0,
    "linear_dim": 4,
    "linear_alpha": 4,
    "apply_preset": {"target_module": ["Attention", "FeedForward"]},
}


def peak_allocated(fn: Any) -> int:
    """The largest number of bytes `fn()` had allocated at once (torch's CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def flux_model(d: int, ld: int, ls: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    from lycoris_core.tiny import flux_transformer_config

    heads = d // 64
    cfg = flux_transformer_config(
        num_layers=ld,
        num_single_layers=ls,
        attention_head_dim=64,
        num_attention_heads=heads,
        joint_attention_dim=64,
        pooled_projection_dim=32,
    )
    return FluxTransformer2DModel(**cfg).eval().requires_grad_(False)


def unet_model(channels: tuple[int, int, int]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return (
        UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=channels,
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=32,
            cross_attention_dim=64,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=16,
            projection_class_embeddings_input_dim=6 * 16 + 32,
        )
        .eval()
        .requires_grad_(False)
    )


def flux_inputs(model: torch.nn.Module, side: int, txt: int, batch: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    n = side * side
    rows = torch.arange(side).repeat_interleave(side).float()
    cols = torch.arange(side).repeat(side).float()
    return {
        "hidden_states": torch.randn(batch, n, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": torch.stack([torch.zeros(n), rows, cols], dim=1),
        "txt_ids": torch.zeros(txt, 3),
        "guidance": torch.full((batch,), 1.0),
        "return_dict": False,
    }


def unet_inputs(model: torch.nn.Module, side: int, batch: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(batch, 4, side, side, generator=g),
        "timestep": torch.full((batch,), 10),
        "encoder_hidden_states": torch.randn(batch, 8, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        },
        "return_dict": False,
    }


def measure(model: torch.nn.Module, inputs: dict, config: dict, checkpointing: bool) -> dict:
    from lycoris_core.config import LycorisConfig
    from lycoris_core.memory import wrapped_weight_numel
    from lycoris_core.targeting import create_network

    net = create_network(model, LycorisConfig.from_dict(config, source="fit"))
    net.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    wrapped = wrapped_weight_numel(net)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train(checkpointing)

    def step() -> None:
        out = model(**inputs)[0]
        loss = torch.nn.functional.mse_loss(out, torch.zeros_like(out))
        loss.backward()

    step()  # warm-up (lazy buffers, RoPE tables)
    for p in params:
        p.grad = None
    peak = peak_allocated(step)
    net.restore()
    if checkpointing:
        model.disable_gradient_checkpointing()
    return {
        "peak": peak,
        "grad_bytes": grad_bytes,
        "wrapped_numel": wrapped,
        "act": peak - grad_bytes,
    }


def measure_inference(model: torch.nn.Module, inputs: dict) -> int:
    """Peak bytes of one forward under no_grad (sampling)."""

    @torch.no_grad()
    def forward() -> None:
        model(**inputs)

    forward()
    return peak_allocated(forward)


def lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(ys, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(a, b).solution[:, 0].tolist()


def fit_flux(records: list[dict]) -> dict[str, Any]:
    """Without checkpointing: bytes per unit for a double block, a single block, the rest,
    and per wrapped fp32 weight byte. With checkpointing a block keeps only its inputs (one
    unit, by construction of checkpointing: hidden + text stream); rest and wrapped are
    fitted (a free per-block term came out negative: too few configurations to separate it)."""
    out = {}
    for gc in (False, True):
        rs = [r for r in records if r["gc"] == gc and r["algo"] == "lora"]
        blocks = [(r["ld"] + r["ls"]) * r["unit"] for r in rs]
        if gc:
            rows = [[r["unit"], 4 * r["wrapped_numel"]] for r in rs]
            ys = [r["act"] - b for r, b in zip(rs, blocks, strict=True)]
        else:
            rows = [
                [r["unit"] * r["ld"], r["unit"] * r["ls"], r["unit"], 4 * r["wrapped_numel"]]
                for r in rs
            ]
            ys = [r["act"] for r in rs]
        coef = lstsq(rows, ys)
        preds = [sum(c * x for c, x in zip(coef, row, strict=True)) for row in rows]
        if gc:
            preds = [p + b for p, b in zip(preds, blocks, strict=True)]
            named = {"per_block": 1.0, "rest": coef[0], "per_wrapped_byte": coef[1]}
        else:
            named = dict(zip(("double", "single", "rest", "per_wrapped_byte"), coef, strict=True))
        errs = [p / r["act"] - 1 for p, r in zip(preds, rs, strict=True)]
        out["gc" if gc else "full"] = named | {"max_rel_err": max(abs(e) for e in errs)}
    return out


def fit_unet(records: list[dict], inference: list[float]) -> dict[str, Any]:
    unet: dict[str, Any] = {"inference_per_unit": inference}
    for gc in (False, True):
        rs = [r for r in records if r["gc"] == gc]
        rows = [[r["unit"], 4 * r["wrapped_numel"]] for r in rs]
        coef = lstsq(rows, [r["act"] for r in rs])
        preds = [coef[0] * x[0] + coef[1] * x[1] for x in rows]
        unet["gc" if gc else "full"] = {
            "per_unit": coef[0],
            "per_wrapped_byte": coef[1],
            "rel_err": [p / r["act"] - 1 for p, r in zip(preds, rs, strict=True)],
        }
    return unet


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    records = result["records"]
    flux = [r for r in records if r.get("family") == "flux"]
    unet = [r for r in records if r.get("family") != "flux"]  # older records have no family
    result["flux"] = fit_flux(flux)
    result["unet"] = fit_unet(unet, result["unet"]["inference_per_unit"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/memory_fit.json")
    parser.add_argument("--refit", action="store_true", help="refit the records in --out")
    args = parser.parse_args(argv)
    if args.refit:
        result = summarise(json.loads(Path(args.out).read_text()))
        print(json.dumps({k: result[k] for k in ("flux", "unet")}, indent=2))
        common.write_json_atomic(Path(args.out), result)
        return 0
    from lycoris_core.config import SEED_EXAMPLE
    from lycoris_core.memory import unet_unit

    torch.manual_seed(0)
    records: list[dict[str, Any]] = []
    inference: list[float] = []
    unet_inference: list[float] = []
    txt = 32
    for d, ld, ls, side, batch in [
        (256, 1, 1, 16, 1),
        (256, 2, 1, 16, 1),
        (256, 1, 3, 16, 1),
        (256, 2, 2, 24, 1),
        (512, 1, 2, 16, 2),
        (512, 2, 1, 12, 1),
    ]:
        model = flux_model(d, ld, ls)
        inputs = flux_inputs(model, side, txt, batch)
        unit = batch * (side * side + txt) * d * 4
        inference.append(measure_inference(model, inputs) / unit)
        for gc in (False, True):
            for algo, config in (("lora", LORA), ("lokr", SEED_EXAMPLE)):
                r = measure(model, inputs, config, gc)
                records.append(
                    {"family": "flux", "d": d, "ld": ld, "ls": ls, "side": side, "batch": batch}
                    | {"gc": gc, "algo": algo, "unit": unit}
                    | r
                )
                print(records[-1], flush=True)
        del model
    lokr_extra = []
    for r in records:
        if r["algo"] == "lokr" and not r["gc"]:
            base = next(
                q
                for q in records
                if q["algo"] == "lora"
                and not q["gc"]
                and q["family"] == r["family"]
                and all(q[k] == r[k] for k in ("d", "ld", "ls", "side", "batch"))
            )
            lokr_extra.append((r["act"] - base["act"]) / (4 * r["wrapped_numel"]))
    unet_records = []
    for channels, side, batch in [
        ((32, 64, 64), 32, 1),
        ((64, 128, 128), 32, 1),
        ((64, 64, 128), 48, 1),
    ]:
        model = unet_model(channels)
        inputs = unet_inputs(model, side, batch)
        unit = batch * side * side * 4 * unet_unit(model.config)
        unet_inference.append(measure_inference(model, inputs) / unit)
        for gc in (False, True):
            r = measure(model, inputs, LORA, gc)
            unet_records.append(
                {"family": "unet", "channels": channels, "side": side, "gc": gc, "unit": unit} | r
            )
            print(unet_records[-1], flush=True)
        del model
    result = {
        "machine": common.machine_info(0),
        "flux_inference_per_unit": inference,
        "lokr_extra_per_wrapped_byte": lokr_extra,
        "unet": {"inference_per_unit": unet_inference},
        "records": records + unet_records,
    }
    result = summarise(result)
    keys = ("flux", "flux_inference_per_unit", "lokr_extra_per_wrapped_byte", "unet")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    common.write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
