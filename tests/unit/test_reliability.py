"""Reliability guarantees beside the bad-input table: names re-checked where paths are built,
linked inputs, stale temp files of killed writes, permissions, the run stamp, resume with
another config, symlinked model files."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import LycorisConfig
from lycoris_core.errors import PathError
from lycoris_core.io import atomic_folder, atomic_write, write_safetensors
from lycoris_core.paths import inside, output_child
from lycoris_core.tempfiles import OWNER_FILE, clean_stale, host_tag, is_stale, temp_prefix

ROOT = Path(__file__).resolve().parents[2]
PACK = "comfyui_lycoris_reliability"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- names and paths
@pytest.mark.parametrize(
    "name", ["../x", "../../../../etc/x", "/abs/x", "a/b", "a\\b", "..", "", " x", "x" * 101, None]
)
def test_output_names_stay_inside_their_folder(tmp_path, name):
    with pytest.raises(PathError, match="name"):
        output_child(tmp_path, name, "output_name", ".safetensors")


def test_relative_model_names_may_use_subfolders_but_not_escape(tmp_path):
    assert inside(tmp_path, "sub/x.safetensors", "loras name") == tmp_path / "sub" / "x.safetensors"
    for bad in ("../x", "sub/../../x", "/etc/passwd", "", "a\x00b"):
        with pytest.raises(PathError):
            inside(tmp_path, bad, "loras name")


# --------------------------------------------------------------------------- stale temp files
def test_stale_temp_entries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead, host = _dead_pid(), host_tag()
    stale_file = tmp_path / f".a.safetensors.~{host}_{dead}_abc12345.tmp"
    stale_dir = tmp_path / f".merged.~{host}_{dead}_zz9.tmp"
    mine = tmp_path / f"{temp_prefix('a.safetensors')}x1.tmp"
    live = tmp_path / f".a.safetensors.~{host}_1_live0001.tmp"  # pid 1 is always running
    foreign_new = tmp_path / ".a.safetensors.~00000000_12_f1.tmp"
    foreign_old = tmp_path / ".a.safetensors.~00000000_13_f2.tmp"
    legacy_old = tmp_path / ".a.safetensors.abcd1234.tmp"
    legacy_new = tmp_path / ".a.safetensors.efgh5678.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for f in (stale_file, mine, live, foreign_new, foreign_old, legacy_old, legacy_new, unrelated):
        f.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "unet.safetensors").write_bytes(b"partial")
    day_old = time.time() - 2 * 24 * 3600
    for f in (foreign_old, legacy_old):
        os.utime(f, (day_old, day_old))

    removed = clean_stale(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir, foreign_old, legacy_old])
    for kept in (mine, live, foreign_new, legacy_new, unrelated):
        assert kept.exists()


def test_the_first_write_into_a_folder_cleans_it_once(tmp_path):
    dead, host = _dead_pid(), host_tag()
    own = tmp_path / f".a.safetensors.~{host}_{dead}_abc.tmp"
    other = tmp_path / f".b.safetensors.~{host}_{dead}_abc.tmp"
    live = tmp_path / f".b.safetensors.~{host}_1_abc.tmp"
    for f in (own, other, live):
        f.write_bytes(b"x")
    write_safetensors(tmp_path / "a.safetensors", {"t": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "a.safetensors"]
    later = tmp_path / f".c.safetensors.~{host}_{dead}_abc.tmp"
    later.write_bytes(b"x")
    write_safetensors(tmp_path / "c.safetensors", {"t": torch.ones(2)})
    assert later.exists()  # once per process and folder: a cache's thousands of writes list once
    assert clean_stale(tmp_path) == [later]


def test_checkpoint_staging_of_a_dead_process_is_stale(tmp_path):
    staging = tmp_path / ".step-000003.tmp"
    (staging / "state").mkdir(parents=True)
    (staging / OWNER_FILE).write_text(f"{host_tag()}_{_dead_pid()}")
    assert is_stale(staging)
    (staging / OWNER_FILE).write_text(f"{host_tag()}_{os.getpid()}")
    assert not is_stale(staging)


_KILLED_WRITER = """
import sys, time
from lycoris_core.io import atomic_write

def write(tmp):
    with open(tmp, "wb") as fh:
        fh.write(b"half a file")
        fh.flush()
        print("writing", flush=True)
        time.sleep(60)

atomic_write(sys.argv[1], write)
"""


def test_a_killed_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    target = tmp_path / "x.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and not target.exists()
    write_safetensors(target, {"t": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


# --------------------------------------------------------------------------- permissions
def test_outputs_get_the_umask_permissions_not_the_temp_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_safetensors(tmp_path / "a.safetensors", {"t": torch.ones(2)})
        with atomic_folder(tmp_path / "folder") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def test_os_errors_while_writing_are_typed_and_leave_nothing(tmp_path, monkeypatch):
    import lycoris_core.io as io

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", no_rename)
    with pytest.raises(PathError, match=r"a\.bin: cannot write"):
        atomic_write(tmp_path / "a.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the run stamp
def test_a_failed_stamp_write_keeps_the_previous_stamp(tmp_path, monkeypatch):
    import lycoris_core.io as io
    from lycoris_core.training.job import read_stamp, stamp_path, write_stamp

    out = tmp_path / "run.safetensors"
    out.write_bytes(b"adapter")
    write_stamp(out, "first", {"steps": 1})
    before = stamp_path(out).read_bytes()
    monkeypatch.setattr(io.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(PathError):
        write_stamp(out, "second", {"steps": 2})
    assert stamp_path(out).read_bytes() == before and read_stamp(out)["hash"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.run.json", "run.safetensors"]
    stamp_path(out).write_bytes(before[: len(before) // 2])  # truncated by a crash elsewhere
    assert read_stamp(out) is None  # counts as absent: the run trains again


# --------------------------------------------------------------------------- training
CONFIG = {
    "algo": "lora",
    "multiplier": 1.0,
    "linear_dim": 2,
    "linear_alpha": 2,
    "apply_preset": {"target_module": ["Attention"]},
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from lycoris_core.models import from_pipeline
    from lycoris_core.tiny import build_pipeline
    from lycoris_core.training.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("reliability")
    data = make_demo_dataset(root / "data", count=2, size=32)
    with torch.inference_mode(False):
        model = from_pipeline(build_pipeline("flux"), "demo: tiny-flux", device="cpu")
    return model, data


def _spec(model, data, out, config=CONFIG, **kw):
    from lycoris_core.training import DatasetSpec, TrainSpec

    ds = DatasetSpec(folder=str(data), resolution=32, bucket_step=8)
    args = {"steps": 1, "lr": 1e-3, "save_every": 1, **kw}
    return TrainSpec(
        base=model, config=LycorisConfig.from_dict(config), dataset=ds, output=str(out), **args
    )


def test_resume_with_another_config_names_the_field(flux, tmp_path):
    from lycoris_core.training import CheckpointError, train
    from lycoris_core.training.job import TrainJob

    model, data = flux
    out = tmp_path / "run.safetensors"
    assert train(_spec(model, data, out)).completed
    other = {**CONFIG, "linear_dim": 4}
    with pytest.raises(CheckpointError, match="'linear_dim' was 2, now 4"):
        train(_spec(model, data, out, config=other, steps=2, resume=str(out)))
    with pytest.raises(CheckpointError, match="linear_dim"):  # the node's path: before training
        TrainJob.prepare(_spec(model, data, out, config=other, steps=2, resume=str(out)))
    assert train(_spec(model, data, out, steps=2, resume=str(out))).steps_done == 2  # same: ok


def test_a_run_removes_what_killed_runs_of_its_output_left(flux, tmp_path):
    from lycoris_core.training import train

    model, data = flux
    out, dead, host = tmp_path / "run.safetensors", _dead_pid(), host_tag()
    ckpts = tmp_path / "run-checkpoints"
    stale_tmp = tmp_path / f".run.safetensors.~{host}_{dead}_q1.tmp"
    other_output = tmp_path / f".other.safetensors.~{host}_1_q1.tmp"
    stale_stage = ckpts / ".step-000007.tmp"
    (stale_stage / "state").mkdir(parents=True)
    (stale_stage / OWNER_FILE).write_text(f"{host}_{dead}")
    stale_tmp.write_bytes(b"x")
    other_output.write_bytes(b"x")
    assert train(_spec(model, data, out)).completed
    assert not stale_tmp.exists() and not stale_stage.exists()
    assert other_output.exists()  # a live writer's (pid 1): never removed
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())


def test_an_output_that_is_a_folder_fails_before_any_step(flux, tmp_path):
    from lycoris_core.training import train

    model, data = flux
    (tmp_path / "run.safetensors").mkdir()
    steps = []
    with pytest.raises(PathError, match="is an existing folder"):
        train(_spec(model, data, tmp_path / "run.safetensors"), on_step=steps.append)
    assert steps == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]


# --------------------------------------------------------------------------- nodes
@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    host = tmp_path_factory.mktemp("host")
    mp = pytest.MonkeyPatch()
    mp.setenv("LYCORIS_HOST_ROOT", str(host))
    spec = importlib.util.spec_from_file_location(
        PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    yield module.NODE_CLASS_MAPPINGS, host
    mp.undo()
    for key in [k for k in sys.modules if k == PACK or k.startswith(PACK + ".")]:
        del sys.modules[key]


def test_linked_string_inputs_pass_validation_and_are_checked_in_run(nodes):
    mapping, host = nodes
    linked = {  # ComfyUI passes None for an input that comes from another node
        "LycorisSave": {"file_name": None},
        "LycorisSaveMergedModel": {"folder_name": None},
        "LycorisTrain": {"output_name": None},
        "LycorisDatasetFromFolder": {"folder": None},
        "LycorisLoad": {"lycoris_name": None},
        "LycorisLoadDiffusersModel": {"model": None},
    }
    for key, inputs in linked.items():
        assert mapping[key].VALIDATE_INPUTS(**inputs) is True, key
    assert "plain name" in mapping["LycorisSave"].VALIDATE_INPUTS(file_name="../x")
    assert "plain name" in mapping["LycorisTrain"].VALIDATE_INPUTS(output_name="a/b")

    errors = sys.modules[PACK + ".lycoris_core.errors"]
    adapters = sys.modules[PACK + ".lycoris_core.adapters"]
    adapter = adapters.adapter_from_state_dict({"lycoris_x.diff": torch.ones(2, 2)})
    save = mapping["LycorisSave"]()
    with pytest.raises(errors.PathError, match="file_name"):
        save.run(adapter, "../../../../escaped")
    written = Path(save.run(adapter, "from_a_string_node")["result"][0])
    assert written == host / "models" / "loras" / "lycoris" / "from_a_string_node.safetensors"
    assert written.is_file() and not (host.parent / "escaped.safetensors").exists()


def test_a_symlinked_file_in_the_loras_folder_loads(nodes, tmp_path):
    mapping, host = nodes
    real = tmp_path / "elsewhere.safetensors"
    save_file({"lycoris_x.diff": torch.ones(2, 2)}, str(real))
    loras = host / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "linked.safetensors").symlink_to(real)
    load = mapping["LycorisLoad"]
    assert "linked.safetensors" in load.INPUT_TYPES()["required"]["lycoris_name"][0]
    assert load.VALIDATE_INPUTS(lycoris_name="linked.safetensors") is True
    adapter = load().run("linked.safetensors")[0]
    assert set(adapter.layers) == {"lycoris_x"}


# --------------------------------------------------------------------------- the CLI
def test_a_multi_line_error_prints_on_one_line(monkeypatch, capsys):
    import lycoris_core.cli.files as commands
    from lycoris_core.__main__ import main
    from lycoris_core.errors import ModelLoadError

    def fails(args):
        raise ModelLoadError("x: cannot load\n  - unet: missing\n  - vae: missing\n\nfix it")

    monkeypatch.setattr(commands, "cmd_inspect", fails)
    assert main(["inspect", "whatever.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ModelLoadError: x: cannot load; - unet: missing; - vae: missing; fix it"]


# --------------------------------------------------------------------------- datasets
def test_unpaired_captions_and_images_get_one_summarised_warning(tmp_path, caplog):
    from PIL import Image

    from lycoris_core.training import DatasetSpec, TrainingData

    for name in ("a", "b", "c"):
        Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "renamed.txt").write_text("its image was renamed")
    (tmp_path / "gone.txt").write_text("its image was deleted")
    with caplog.at_level("WARNING"):
        TrainingData(DatasetSpec(folder=str(tmp_path), resolution=32, bucket_step=8))
    warnings = [r.getMessage() for r in caplog.records if "without" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "2 caption file(s) without an image" in warnings[0]
    assert "2 image(s) without a caption file" in warnings[0]
