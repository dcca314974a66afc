"""Bad inputs, as a hostile user would send them: one table across the CLI, the Python API and
the nodes (files, tensors, configs, datasets, strengths, sizes, steps, paths).

Every row asserts the exact error type, a message fragment that names the field or file, and
that nothing under the test's folder was created or changed (the tree is snapshotted before
and after). CLI rows call ``main()`` in this process: exit status 2 and the error on one line.
Everything is rejected before heavy work, so the table runs on tiny models built once.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
PACK = "comfyui_lycoris_bad_inputs"
Action = Callable[[], Any]


@dataclass
class World:
    """What the rows use: a tiny SD1.5 folder and model, a tiny Flux, good files, the pack."""

    root: Path
    sd15_dir: Path
    sd15: Any
    flux: Any
    target: str  # a Linear module path of the SD1.5 denoiser
    out_dim: int
    in_dim: int
    good_adapter: Path
    good_config: Path
    data: Path
    host: Path
    nodes: dict[str, Any]

    def key(self, suffix: str) -> str:
        return "lycoris_" + self.target.replace(".", "_") + "." + suffix

    def lora(self, rank: int = 2, **override: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        tensors = {
            "lora_up.weight": torch.randn(self.out_dim, rank, generator=g),
            "lora_down.weight": torch.randn(rank, self.in_dim, generator=g),
            "alpha": torch.tensor(float(rank)),
        }
        tensors.update(override)
        return {self.key(k): v for k, v in tensors.items() if v is not None}


def _load_pack(host: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Any:
    from lycoris_core.config import SEED_EXAMPLE
    from lycoris_core.models import from_pipeline, load_model
    from lycoris_core.tiny import build_pipeline, make_tiny

    root = tmp_path_factory.mktemp("bad-inputs")
    sd15_dir = make_tiny("sd15", root / "tiny-sd15")
    sd15 = load_model(sd15_dir, device="cpu")
    with torch.inference_mode(False):
        flux = from_pipeline(build_pipeline("flux"), "demo: tiny-flux", device="cpu")
    target, linear = next(
        (n, m) for n, m in sd15.denoiser.named_modules() if isinstance(m, nn.Linear)
    )
    host = root / "host"
    (host / "models" / "loras" / "lycoris").mkdir(parents=True)
    (host / "models" / "diffusers").mkdir(parents=True)
    (host / "models" / "lycoris_configs").mkdir(parents=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("LYCORIS_HOST_ROOT", str(host))
    pack = _load_pack(host)
    w = World(
        root=root,
        sd15_dir=sd15_dir,
        sd15=sd15,
        flux=flux,
        target=target,
        out_dim=linear.out_features,
        in_dim=linear.in_features,
        good_adapter=root / "good.safetensors",
        good_config=root / "good_config.json",
        data=root / "data",
        host=host,
        nodes=pack.NODE_CLASS_MAPPINGS,
    )
    save_file(w.lora(), str(w.good_adapter))
    (host / "models" / "loras" / "good.safetensors").write_bytes(w.good_adapter.read_bytes())
    w.good_config.write_text(json.dumps(SEED_EXAMPLE), encoding="utf-8")
    w.data.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(w.data / f"{i}.png")
        (w.data / f"{i}.txt").write_text(f"a disc {i}", encoding="utf-8")
    yield w
    mp.undo()
    for key in [k for k in sys.modules if k == PACK or k.startswith(PACK + ".")]:
        del sys.modules[key]


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        if p.is_dir():  # a folder changes when an entry is created and removed: its listing counts
            out[str(p.relative_to(root))] = (True, st.st_mode)
        else:
            out[str(p.relative_to(root))] = (False, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def _error_type(name: str, kind: str) -> type[BaseException]:
    """The error class; node rows raise the classes of the pack's own copy of the core."""
    module, _, cls = name.rpartition(".")
    package = f"{PACK}.lycoris_core." if kind == "node" else "lycoris_core."
    return getattr(importlib.import_module(package + module), cls)


# --------------------------------------------------------------------------- the table
# A row: (id, kind, build, error, fragment). `build(world, work)` prepares inputs in `work`
# (before the snapshot) and returns the action; kind "cli" actions return main()'s argv.

ROWS: list[tuple[str, str, Callable[[World, Path], Any], str, str]] = []


def row(rid: str, kind: str, error: str, fragment: str) -> Callable:
    def register(build: Callable[[World, Path], Any]) -> Callable:
        ROWS.append((rid, kind, build, error, fragment))
        return build

    return register


def _file(work: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = work / name
    save_file(tensors, str(path))
    return path


def _load(path: Path) -> Action:
    from lycoris_core.adapters import load_adapter

    return lambda: load_adapter(path)


# ---- files
@row("file-missing", "api", "errors.AdapterFormatError", "not found")
def _(w, work):
    return _load(work / "nope.safetensors")


@row("file-is-a-folder", "api", "errors.AdapterFormatError", "folder.safetensors")
def _(w, work):
    (work / "folder.safetensors").mkdir()
    return _load(work / "folder.safetensors")


@row("file-pickle-suffix", "api", "errors.AdapterFormatError", "pickle")
def _(w, work):
    (work / "x.ckpt").write_bytes(b"\x80\x04junk")
    return _load(work / "x.ckpt")


@row("file-pickle-content", "api", "errors.AdapterFormatError", "pickle")
def _(w, work):
    (work / "x.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    return _load(work / "x.safetensors")


@row("file-truncated", "api", "errors.AdapterFormatError", "t.safetensors")
def _(w, work):
    (work / "t.safetensors").write_bytes(w.good_adapter.read_bytes()[:-40])
    return _load(work / "t.safetensors")


@row("file-empty", "api", "errors.AdapterFormatError", "e.safetensors")
def _(w, work):
    (work / "e.safetensors").write_bytes(b"")
    return _load(work / "e.safetensors")


@row("file-garbage", "api", "errors.AdapterFormatError", "g.safetensors")
def _(w, work):
    (work / "g.safetensors").write_bytes(os.urandom(256))
    return _load(work / "g.safetensors")


@row("file-no-tensors", "api", "errors.AdapterFormatError", "no tensors")
def _(w, work):
    return _load(_file(work, "n.safetensors", {}))


@row("file-key-without-dot", "api", "errors.AdapterFormatError", "'nodot'")
def _(w, work):
    return _load(_file(work, "k.safetensors", {"nodot": torch.ones(2)}))


@row("file-unknown-algorithm", "api", "errors.AdapterFormatError", "match no LyCORIS")
def _(w, work):
    return _load(_file(work, "u.safetensors", {"lycoris_x.mystery": torch.ones(2)}))


@row("file-unknown-suffix", "api", "errors.AdapterFormatError", "unknown tensors")
def _(w, work):
    return _load(_file(work, "s.safetensors", w.lora(**{"lora_extra": torch.ones(2)})))


@row("file-missing-down", "api", "errors.AdapterFormatError", "lora_down.weight")
def _(w, work):
    return _load(_file(work, "d.safetensors", w.lora(**{"lora_down.weight": None})))


# ---- tensors
@row("tensor-alpha-not-scalar", "api", "errors.AdapterFormatError", "'alpha' must be one")
def _(w, work):
    return _load(_file(work, "a.safetensors", w.lora(alpha=torch.ones(3))))


@row("tensor-alpha-nan", "api", "errors.AdapterFormatError", "'alpha' holds inf or NaN")
def _(w, work):
    return _load(_file(work, "a.safetensors", w.lora(alpha=torch.tensor(float("nan")))))


@row("tensor-alpha-inf", "api", "errors.AdapterFormatError", "'alpha' holds inf or NaN")
def _(w, work):
    return _load(_file(work, "a.safetensors", w.lora(alpha=torch.tensor(float("inf")))))


@row("tensor-0-dim-up", "api", "errors.AdapterFormatError", "'lora_up.weight' must be")
def _(w, work):
    return _load(_file(work, "z.safetensors", w.lora(**{"lora_up.weight": torch.tensor(1.0)})))


@row("tensor-empty-down", "api", "errors.AdapterFormatError", "'lora_down.weight' must be")
def _(w, work):
    empty = torch.zeros(0, w.in_dim)
    return _load(_file(work, "z.safetensors", w.lora(**{"lora_down.weight": empty})))


@row("tensor-inf-up", "api", "errors.AdapterFormatError", "'lora_up.weight' holds inf")
def _(w, work):
    up = torch.ones(w.out_dim, 2)
    up[0, 0] = float("inf")
    return _load(_file(work, "i.safetensors", w.lora(**{"lora_up.weight": up})))


@row("tensor-nan-down-fp16", "api", "errors.AdapterFormatError", "'lora_down.weight' holds")
def _(w, work):
    down = torch.ones(2, w.in_dim, dtype=torch.float16)
    down[1, 3] = float("nan")
    return _load(_file(work, "n.safetensors", w.lora(**{"lora_down.weight": down})))


@row("tensor-rank-mismatch", "api", "errors.AdapterFormatError", "does not match")
def _(w, work):
    return _load(_file(work, "r.safetensors", w.lora(**{"lora_up.weight": torch.ones(8, 3)})))


@row("tensor-lokr-missing-w2", "api", "errors.AdapterFormatError", "w2 factor")
def _(w, work):
    return _load(_file(work, "k.safetensors", {"lycoris_x.lokr_w1": torch.ones(2, 2)}))


@row("tensor-lokr-w1-rank-mismatch", "api", "errors.AdapterFormatError", "lokr_w1_a dim 1")
def _(w, work):
    t = {
        "lycoris_x.lokr_w1_a": torch.ones(2, 3),
        "lycoris_x.lokr_w1_b": torch.ones(4, 2),
        "lycoris_x.lokr_w2": torch.ones(2, 2),
    }
    return _load(_file(work, "k.safetensors", t))


@row("tensor-lokr-nan-w1", "api", "errors.AdapterFormatError", "'lokr_w1' holds inf or NaN")
def _(w, work):
    w1 = torch.ones(2, 2)
    w1[0, 1] = float("nan")
    t = {"lycoris_x.lokr_w1": w1, "lycoris_x.lokr_w2": torch.ones(2, 2)}
    return _load(_file(work, "k.safetensors", t))


@row("tensor-loha-rank-mismatch", "api", "errors.AdapterFormatError", "hada_w")
def _(w, work):
    t = {
        "lycoris_x.hada_w1_a": torch.ones(4, 2),
        "lycoris_x.hada_w1_b": torch.ones(2, 4),
        "lycoris_x.hada_w2_a": torch.ones(4, 3),
        "lycoris_x.hada_w2_b": torch.ones(2, 4),
    }
    return _load(_file(work, "h.safetensors", t))


@row("tensor-full-bias-size", "api", "errors.AdapterFormatError", "diff_b size")
def _(w, work):
    t = {"lycoris_x.diff": torch.ones(4, 4), "lycoris_x.diff_b": torch.ones(3)}
    return _load(_file(work, "f.safetensors", t))


@row("tensor-oft-not-square", "api", "errors.AdapterFormatError", "oft_blocks")
def _(w, work):
    return _load(_file(work, "o.safetensors", {"lycoris_x.oft_blocks": torch.ones(2, 3, 4)}))


@row("tensor-ia3-on-input-array", "api", "errors.AdapterFormatError", "'on_input' must be one")
def _(w, work):
    t = {"lycoris_x.weight": torch.ones(4), "lycoris_x.on_input": torch.ones(2)}
    return _load(_file(work, "i.safetensors", t))


@row("tensor-fits-no-module", "api", "errors.AdapterFormatError", "match no module")
def _(w, work):
    from lycoris_core.adapters import load_adapter
    from lycoris_core.patching import patched

    adapter = load_adapter(_file(work, "m.safetensors", {"lycoris_nowhere.diff": torch.ones(2)}))

    def act():
        with patched(w.sd15.denoiser, [(adapter, 1.0)]):
            pass

    return act


@row("tensor-wrong-shape-for-model", "api", "errors.AdapterFormatError", "does not fit")
def _(w, work):
    from lycoris_core.adapters import load_adapter
    from lycoris_core.patching import patched

    t = {
        w.key("lora_up.weight"): torch.ones(w.out_dim + 1, 2),
        w.key("lora_down.weight"): torch.ones(2, w.in_dim),
    }
    adapter = load_adapter(_file(work, "m.safetensors", t))

    def act():
        with patched(w.sd15.denoiser, [(adapter, 1.0)]):
            pass

    return act


# ---- strengths (Python API)
def _patch_at(w: World, strength: Any) -> Action:
    from lycoris_core.adapters import load_adapter
    from lycoris_core.patching import patched

    adapter = load_adapter(w.good_adapter)

    def act():
        with patched(w.sd15.denoiser, [(adapter, strength)]):
            pass

    return act


for _value in (1e9, 1e30, 1e300, float("nan"), float("inf"), -11.0, 10**400):
    row(f"strength-{_value!r:.12}", "api", "errors.LycorisError", "strength must be")(
        lambda w, work, v=_value: _patch_at(w, v)
    )


@row("strength-string", "api", "errors.LycorisError", "strength must be a number")
def _(w, work):
    return _patch_at(w, "1")


@row("strength-bool", "api", "errors.LycorisError", "strength must be a number")
def _(w, work):
    return _patch_at(w, True)


@row("mode-unknown", "api", "errors.LycorisError", "mode must be one of")
def _(w, work):
    from lycoris_core.patching import patch_key

    return lambda: patch_key([], mode="bogus")


@row("strength-sample-1e9", "api", "errors.LycorisError", "strength must be")
def _(w, work):
    from lycoris_core.adapters import load_adapter
    from lycoris_core.sampling import sample

    adapter = load_adapter(w.good_adapter)
    return lambda: sample(w.sd15, [(adapter, 1e9)], steps=1, width=32, height=32)


# ---- sizes and steps (Python API)
def _sample(w: World, model: str = "sd15", **kw: Any) -> Action:
    from lycoris_core.sampling import sample

    args = {"steps": 1, "width": 32, "height": 32, **kw}
    return lambda: sample(getattr(w, model), **args)


for _rid, _kw, _frag in (
    ("size-12-sd15", {"width": 12}, "width 12 is not a multiple of 8"),
    ("size-0", {"width": 0}, "width must be"),
    ("size-negative", {"height": -8}, "height must be"),
    ("size-float", {"width": 32.0}, "width must be an integer"),
    ("size-string", {"height": "32"}, "height must be an integer"),
    ("size-flux-33", {"model": "flux", "width": 33}, "width 33 is not a multiple"),
    ("steps-0", {"steps": 0}, "steps must be"),
    ("steps-float", {"steps": 1.5}, "steps must be an integer"),
    ("steps-1e7-flux", {"model": "flux", "steps": 10**7}, "steps 10000000 is more than"),
    ("steps-1000-sd15", {"steps": 1000}, "too many for this scheduler"),
    ("batch-0", {"batch_size": 0}, "batch_size must be"),
    ("seed-negative", {"seed": -1}, "seed must be"),
    ("guidance-nan", {"guidance": float("nan")}, "guidance must be"),
    ("guidance-negative", {"guidance": -1.0}, "guidance must be"),
    ("prompt-not-string", {"prompt": 3}, "prompt"),
):
    row(_rid, "api", "errors.LycorisError", _frag)(lambda w, work, kw=_kw: _sample(w, **kw))


# ---- configs (Python API)
def _config(data: Any) -> Action:
    from lycoris_core.config import LycorisConfig

    return lambda: LycorisConfig.from_dict(data)


def _config_text(work: Path, text: str) -> Action:
    from lycoris_core.config import LycorisConfig

    path = work / "lycoris_config.json"
    path.write_text(text, encoding="utf-8")
    return lambda: LycorisConfig.from_file(path)


_SEED = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 10}
for _rid, _data, _frag in (
    ("config-missing-alpha", {"multiplier": 1.0, "linear_dim": 4}, "linear_alpha"),
    ("config-dim-string", {**_SEED, "linear_dim": "big"}, "linear_dim"),
    ("config-unknown-algo", {**_SEED, "algo": "lokrr"}, "algo"),
    ("config-not-object", [1, 2], "must be a JSON object"),
    ("config-dim-1e300", {**_SEED, "linear_dim": 1e300}, "linear_dim"),
    ("config-dim-huge-int", {**_SEED, "linear_dim": 10**400}, "linear_dim"),
    ("config-factor-huge", {**_SEED, "factor": 10**30}, "factor"),
    ("config-alpha-huge-int", {**_SEED, "linear_alpha": 10**400}, "linear_alpha"),
    ("config-multiplier-nan", {**_SEED, "multiplier": float("nan")}, "multiplier"),
):
    row(_rid, "api", "errors.ConfigError", _frag)(lambda w, work, d=_data: _config(d))


@row("config-file-missing", "api", "errors.ConfigError", "nope.json")
def _(w, work):
    from lycoris_core.config import LycorisConfig

    return lambda: LycorisConfig.from_file(work / "nope.json")


@row("config-file-bad-json", "api", "errors.ConfigError", "not valid JSON")
def _(w, work):
    return _config_text(work, '{"algo": "lokr",}')


@row("config-file-deep-nesting", "api", "errors.ConfigError", "lycoris_config.json")
def _(w, work):
    return _config_text(work, "[" * 200_000 + "]" * 200_000)


@row("config-file-400-digit-int", "api", "errors.ConfigError", "linear_dim")
def _(w, work):
    return _config_text(work, json.dumps(_SEED).replace("10000", "9" * 400))


@row("config-file-5000-digit-int", "api", "errors.ConfigError", "lycoris_config.json")
def _(w, work):
    return _config_text(work, json.dumps(_SEED).replace("10000", "9" * 5000))


@row("config-file-dim-1e300", "api", "errors.ConfigError", "linear_dim")
def _(w, work):
    return _config_text(work, json.dumps(_SEED).replace("10000", "1e300"))


@row("config-file-NaN-literal", "api", "errors.ConfigError", "multiplier")
def _(w, work):
    return _config_text(work, json.dumps(_SEED).replace("1.0", "NaN"))


# ---- paths and outputs (Python API)
@row("write-to-folder", "api", "errors.PathError", "is an existing folder")
def _(w, work):
    from lycoris_core.io import write_safetensors

    (work / "out.safetensors").mkdir()
    return lambda: write_safetensors(work / "out.safetensors", {"a": torch.ones(1)})


@row("write-parent-is-file", "api", "errors.PathError", "is a file, not a folder")
def _(w, work):
    from lycoris_core.io import write_safetensors

    (work / "file").write_text("x")
    return lambda: write_safetensors(work / "file" / "out.safetensors", {"a": torch.ones(1)})


@row("write-oserror-typed", "api", "errors.PathError", "w.bin: cannot write")
def _(w, work):
    from lycoris_core.io import atomic_write

    def failing(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    return lambda: atomic_write(work / "w.bin", failing)


@row("folder-not-empty", "api", "errors.PathError", "already exists")
def _(w, work):
    from lycoris_core.io import atomic_folder

    (work / "full").mkdir()
    (work / "full" / "x").write_text("x")

    def act():
        with atomic_folder(work / "full") as staging:
            (staging / "y").write_text("y")

    return act


@row("save-merged-not-empty", "api", "errors.PathError", "merged model folder")
def _(w, work):
    from lycoris_core.adapters import load_adapter
    from lycoris_core.models import save_merged

    (work / "m").mkdir()
    (work / "m" / "keep").write_text("x")
    adapter = load_adapter(w.good_adapter)
    return lambda: save_merged(w.sd15, [(adapter, 1.0)], work / "m")


def _spec(w: World, work: Path, **kw: Any) -> Any:
    from lycoris_core.config import LycorisConfig
    from lycoris_core.training import DatasetSpec, TrainSpec

    args = {"output": str(work / "run.safetensors"), "steps": 2, **kw}
    return TrainSpec(
        base=w.sd15,
        config=LycorisConfig.from_file(w.good_config),
        dataset=DatasetSpec(folder=str(w.data), resolution=32, bucket_step=8),
        **args,
    )


@row("train-out-is-folder", "api", "errors.PathError", "is an existing folder")
def _(w, work):
    from lycoris_core.training import train

    (work / "run.safetensors").mkdir()
    spec = _spec(w, work)
    return lambda: train(spec)


@row("train-checkpoints-is-file", "api", "errors.PathError", "run-checkpoints")
def _(w, work):
    from lycoris_core.training.job import TrainJob

    (work / "run-checkpoints").write_text("x")
    spec = _spec(w, work)
    return lambda: TrainJob.prepare(spec)


@row("train-out-not-safetensors", "api", "errors.LycorisError", "output must be")
def _(w, work):
    from lycoris_core.training import train

    spec = _spec(w, work, output=str(work / "run.ckpt"))
    return lambda: train(spec)


@row("train-steps-0", "api", "errors.LycorisError", "steps must be")
def _(w, work):
    from lycoris_core.training.job import TrainJob

    spec = _spec(w, work, steps=0)
    return lambda: TrainJob.prepare(spec)


@row("train-validation-strength-1e9", "api", "errors.LycorisError", "validation_lycoris")
def _(w, work):
    from lycoris_core.training import train

    spec = _spec(w, work, validation_lycoris_strength=1e9)
    return lambda: train(spec)


@row("train-lr-negative", "api", "errors.LycorisError", "lr must be")
def _(w, work):
    from lycoris_core.training import train

    spec = _spec(w, work, lr=-1.0)
    return lambda: train(spec)


@row("train-resume-nothing", "api", "training.checkpoint.CheckpointError", "no checkpoint")
def _(w, work):
    from lycoris_core.training.job import TrainJob

    spec = _spec(w, work, resume=str(work / "run.safetensors"))
    return lambda: TrainJob.prepare(spec)


# ---- CLI (main() in this process)
@row("cli-sample-out-folder", "cli", "errors.PathError", "--out")
def _(w, work):
    (work / "img.png").mkdir()
    return ["sample", "--base", str(w.sd15_dir), "--out", str(work / "img.png"), "--steps", "1"]


@row("cli-sample-out-parent-file", "cli", "errors.PathError", "is a file, not a folder")
def _(w, work):
    (work / "f").write_text("x")
    return ["sample", "--base", str(w.sd15_dir), "--out", str(work / "f" / "a.png")]


@row("cli-sample-strength-1e9", "cli", "errors.LycorisError", "strength must be")
def _(w, work):
    argv = ["sample", "--base", str(w.sd15_dir), "--out", str(work / "a.png")]
    return [*argv, "--adapter", f"{w.good_adapter}:1e9"]


@row("cli-sample-strength-nan", "cli", "errors.LycorisError", "strength must be")
def _(w, work):
    argv = ["sample", "--base", str(w.sd15_dir), "--out", str(work / "a.png")]
    return [*argv, "--adapter", f"{w.good_adapter}:nan"]


@row("cli-sample-nan-adapter", "cli", "errors.AdapterFormatError", "holds inf or NaN")
def _(w, work):
    up = torch.full((w.out_dim, 2), float("nan"))
    path = _file(work, "nan.safetensors", w.lora(**{"lora_up.weight": up}))
    argv = ["sample", "--base", str(w.sd15_dir), "--out", str(work / "a.png")]
    return [*argv, "--adapter", str(path), "--steps", "1", "--width", "32", "--height", "32"]


@row("cli-sample-width-12", "cli", "errors.LycorisError", "width 12")
def _(w, work):
    argv = ["sample", "--base", str(w.sd15_dir), "--out", str(work / "a.png")]
    return [*argv, "--width", "12", "--height", "32", "--steps", "1"]


@row("cli-sample-missing-base", "cli", "errors.ModelLoadError", "nobase")
def _(w, work):
    return ["sample", "--base", str(work / "nobase"), "--out", str(work / "a.png")]


@row("cli-inspect-missing", "cli", "errors.AdapterFormatError", "none.safetensors")
def _(w, work):
    return ["inspect", str(work / "none.safetensors")]


@row("cli-inspect-pickle", "cli", "errors.AdapterFormatError", "pickle")
def _(w, work):
    (work / "x.pt").write_bytes(b"\x80\x04")
    return ["inspect", str(work / "x.pt")]


@row("cli-inspect-rank-mismatch", "cli", "errors.AdapterFormatError", "does not match")
def _(w, work):
    path = _file(work, "r.safetensors", w.lora(**{"lora_up.weight": torch.ones(8, 3)}))
    return ["inspect", str(path)]


def _train_argv(w: World, work: Path, out: Path, config: Path | None = None) -> list[str]:
    return [
        "train",
        "--base",
        str(w.sd15_dir),
        "--config",
        str(config or w.good_config),
        "--data",
        str(w.data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--resolution",
        "32",
        "--save-every",
        "1",
    ]


@row("cli-train-out-folder", "cli", "errors.PathError", "is an existing folder")
def _(w, work):
    (work / "x.safetensors").mkdir()
    return _train_argv(w, work, work / "x.safetensors")


@row("cli-train-out-parent-file", "cli", "errors.PathError", "is a file")
def _(w, work):
    (work / "f").write_text("x")
    return _train_argv(w, work, work / "f" / "x.safetensors")


@row("cli-train-bad-config", "cli", "errors.ConfigError", "not valid JSON")
def _(w, work):
    (work / "c.json").write_text("{oops")
    return _train_argv(w, work, work / "x.safetensors", work / "c.json")


@row("cli-train-deep-config", "cli", "errors.ConfigError", "c.json")
def _(w, work):
    (work / "c.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    return _train_argv(w, work, work / "x.safetensors", work / "c.json")


@row("cli-train-out-not-safetensors", "cli", "errors.LycorisError", "output must be")
def _(w, work):
    return _train_argv(w, work, work / "x.bin")


@row("cli-train-out-suffix-before-load", "cli", "errors.LycorisError", "output must be")
def _(w, work):
    argv = _train_argv(w, work, work / "x.bin")  # refused before the (missing) base loads
    argv[argv.index("--base") + 1] = str(work / "no-such-model")
    return argv


@row("cli-make-tiny-not-empty", "cli", "errors.PathError", "already exists")
def _(w, work):
    (work / "t").mkdir()
    (work / "t" / "keep").write_text("x")
    return ["make-tiny", "--family", "sd15", "--out", str(work / "t")]


@row("cli-make-tiny-parent-file", "cli", "errors.PathError", "is a file")
def _(w, work):
    (work / "f").write_text("x")
    return ["make-tiny", "--family", "sd15", "--out", str(work / "f" / "t")]


@row("cli-make-tiny-bad-family", "cli", "errors.LycorisError", "sd16")
def _(w, work):
    return ["make-tiny", "--family", "sd16", "--out", str(work / "t")]


# ---- nodes (the pack as ComfyUI loads it, on the fake host)
TRAIN_WIDGETS = {
    "steps": 2,
    "learning_rate": 1e-3,
    "batch_size": 1,
    "optimizer": "adamw",
    "scheduler": "constant",
    "precision": "no",
    "gradient_checkpointing": False,
    "save_every": 1,
    "validation_prompt": "",
    "validation_every": 0,
    "validation_lycoris_strength": 1.0,
    "seed": 0,
    "resume": False,
}


def _node(w: World, key: str, **inputs: Any) -> Action:
    cls = w.nodes[key]

    def act():
        with torch.inference_mode():
            return getattr(cls(), cls.FUNCTION)(**inputs)

    return act


def _adapter(w: World) -> Any:
    from lycoris_core.adapters import load_adapter

    return load_adapter(w.good_adapter)


for _rid, _name in (
    ("node-save-dotdot", "../../../../escaped"),
    ("node-save-slash", "sub/escaped"),
    ("node-save-empty", ""),
    ("node-save-not-string", 3),
):
    row(_rid, "node", "errors.PathError", "file_name")(
        lambda w, work, n=_name: _node(w, "LycorisSave", adapter=_adapter(w), file_name=n)
    )


@row("node-save-absolute", "node", "errors.PathError", "file_name")
def _(w, work):  # an absolute name (inside this test's folder) is refused like any path
    return _node(w, "LycorisSave", adapter=_adapter(w), file_name=str(work / "escaped"))


@row("node-merged-dotdot", "node", "errors.PathError", "folder_name")
def _(w, work):
    return _node(w, "LycorisSaveMergedModel", model=_handle(w), folder_name="../../escaped")


def _handle(w: World) -> Any:
    handles = sys.modules[PACK + ".nodes.handles"]
    return handles.ModelHandle(w.sd15)


@row("node-train-dotdot", "node", "errors.PathError", "output_name")
def _(w, work):
    from lycoris_core.config import LycorisConfig
    from lycoris_core.training import DatasetSpec

    return _node(
        w,
        "LycorisTrain",
        model=_handle(w),
        config=LycorisConfig.from_file(w.good_config),
        dataset=DatasetSpec(folder=str(w.data), resolution=32, bucket_step=8),
        output_name="../../../escaped",
        **TRAIN_WIDGETS,
    )


@row("node-apply-strength-1e9", "node", "errors.LycorisError", "strength must be")
def _(w, work):
    return _node(
        w, "LycorisApply", model=_handle(w), adapter=_adapter(w), strength=1e9, mode="merge"
    )


@row("node-load-dotdot", "node", "errors.AdapterFormatError", "not in the loras folder")
def _(w, work):
    return _node(w, "LycorisLoad", lycoris_name="../../good.safetensors")


@row("node-load-config-dotdot", "node", "errors.ConfigError", "not found")
def _(w, work):
    return _node(w, "LycorisLoadConfig", config_file="../../../good_config.json", path="")


@row("node-dataset-missing", "node", "errors.PathError", "dataset folder")
def _(w, work):
    return _node(
        w,
        "LycorisDatasetFromFolder",
        folder=str(work / "nothing"),
        resolution=32,
        center_crop=True,
        flip=False,
        caption_dropout=0.0,
        trigger_word="",
        default_caption="",
        skip_bad=False,
    )


@row("node-dataset-is-file", "node", "errors.PathError", "is a file")
def _(w, work):
    (work / "f").write_text("x")
    return _node(
        w,
        "LycorisDatasetFromFolder",
        folder=str(work / "f"),
        resolution=32,
        center_crop=True,
        flip=False,
        caption_dropout=0.0,
        trigger_word="",
        default_caption="",
        skip_bad=False,
    )


@row("node-model-dotdot", "node", "errors.ModelLoadError", "not found")
def _(w, work):
    return _node(
        w,
        "LycorisLoadDiffusersModel",
        model="../../tiny-sd15",
        dtype="auto",
        device="cpu",
        offload="none",
    )


@row("node-sample-width-12", "node", "errors.LycorisError", "width 12")
def _(w, work):
    inputs = dict(prompt="", negative_prompt="", width=12, height=32, steps=1, guidance=1.0)
    return _node(w, "LycorisSample", model=_handle(w), seed=0, batch_size=1, **inputs)


@row("node-config-dim-1e300", "node", "errors.ConfigError", "linear_dim")
def _(w, work):
    widgets = dict(algo="lokr", multiplier=1.0, linear_dim=4, linear_alpha=1.0, factor=4)
    text = dict(target_modules="Attention", module_algo_map="{}", extra='{"linear_dim": 1e300}')
    return _node(w, "LycorisConfig", **widgets, **text)


@row("node-config-extra-deep", "node", "errors.ConfigError", "extra")
def _(w, work):
    widgets = dict(algo="lokr", multiplier=1.0, linear_dim=4, linear_alpha=1.0, factor=4)
    text = dict(
        target_modules="Attention", module_algo_map="{}", extra="[" * 100_000 + "]" * 100_000
    )
    return _node(w, "LycorisConfig", **widgets, **text)


# --------------------------------------------------------------------------- running a row


def outcome(w: World, rid: str, kind: str, build: Callable, capsys: Any = None) -> tuple:
    """Run one row: (exception or None, CLI (status, stderr) or None, changed paths)."""
    from lycoris_core.__main__ import main

    work = w.root / "rows" / rid
    work.mkdir(parents=True)
    action = build(w, work)
    before = _snapshot(w.root)
    exc, cli = None, None
    try:
        if kind == "cli":
            if capsys is not None:
                capsys.readouterr()
            status = main(action)
            err = capsys.readouterr().err if capsys is not None else ""
            cli = (status, err)
        else:
            action()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        exc = e
    after = _snapshot(w.root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return exc, cli, changed


# ---- base precision (quantised bases)
@row("api-base-precision-unknown", "api", "errors.ConfigError", "base_precision must be one of")
def _(w, work):
    from lycoris_core.models import load_model

    return lambda: load_model(w.sd15_dir, device="cpu", base_precision="int4")


@row("api-base-precision-vs-dtype", "api", "errors.ConfigError", "disagree")
def _(w, work):
    from lycoris_core.models import load_model

    return lambda: load_model(w.sd15_dir, device="cpu", dtype="fp32", base_precision="fp16")


@row("api-save-merged-quantised", "api", "errors.ConfigError", "base_precision bf16/fp32")
def _(w, work):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev dependencies")
    from lycoris_core.models import load_model, save_merged

    model = load_model(w.sd15_dir, device="cpu", dtype="fp32", base_precision="nf4")
    return lambda: save_merged(model, [], work / "merged")


@row("cli-train-dora-over-nf4", "cli", "errors.IncompatibleModelError", "--base-precision nf4")
def _(w, work):
    config = work / "dora.json"
    dora = {"algo": "lora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1, "dora_wd": True}
    config.write_text(json.dumps(dora), encoding="utf-8")
    argv = _train_argv(w, work, work / "a.safetensors", config)
    return [*argv[:2], str(work / "not-loaded"), *argv[3:], "--base-precision", "nf4"]


@pytest.mark.parametrize(
    ("rid", "kind", "build", "error", "fragment"), ROWS, ids=[r[0] for r in ROWS]
)
def test_bad_input(world, capsys, rid, kind, build, error, fragment):
    expected = _error_type(error, kind)
    exc, cli, changed = outcome(world, rid, kind, build, capsys)
    if kind == "cli":
        assert exc is None, f"main() raised {exc!r}"
        status, err = cli
        assert status == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], err  # the last line, and one line
        assert "Traceback" not in err, err
        assert errors[0].startswith(f"error: {expected.__name__}: "), errors[0]
        assert fragment in errors[0], errors[0]
    else:
        assert exc is not None, "accepted silently"
        assert type(exc) is expected, f"{type(exc).__name__}: {exc}"
        assert fragment in str(exc), str(exc)
    assert changed == [], f"files created or changed: {changed[:5]}"


def test_the_table_is_large_and_covers_every_surface():
    kinds = {kind for _, kind, *_ in ROWS}
    assert len(ROWS) >= 60 and kinds == {"api", "cli", "node"}
    assert len({rid for rid, *_ in ROWS}) == len(ROWS)  # ids are unique
