"""nodes/_host.py inside ComfyUI asks folder_paths for model files (its cached listing, its
path resolution); folders (diffusers pipelines) fall back to walking the model folders."""

from __future__ import annotations

from pathlib import Path


class FakeFolderPaths:
    """The three folder_paths functions _host calls, over one folder per kind."""

    def __init__(self, root: Path):
        self.root = root
        self.listed: list[str] = []

    def get_folder_paths(self, kind: str) -> list[str]:
        return [str(self.root / kind)]

    def get_filename_list(self, kind: str) -> list[str]:
        self.listed.append(kind)
        if kind == "unknown":
            raise KeyError(kind)
        folder = self.root / kind
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def get_full_path(self, kind: str, name: str) -> str | None:
        path = self.root / kind / name
        return str(path) if path.is_file() else None


def test_inside_comfyui_files_come_from_folder_paths(pack, tmp_path, monkeypatch):
    host = pack.nodes._host
    (tmp_path / "loras" / "lycoris").mkdir(parents=True)
    (tmp_path / "loras" / "lycoris" / "a.safetensors").write_bytes(b"x")
    (tmp_path / "loras" / "b.ckpt").write_bytes(b"x")
    (tmp_path / "diffusers" / "pipe").mkdir(parents=True)
    fake = FakeFolderPaths(tmp_path)
    monkeypatch.setattr(host, "folder_paths", fake)
    monkeypatch.setattr(host, "IN_COMFY", True)

    assert host.list_files("loras", host.SAFETENSORS) == ["lycoris/a.safetensors"]
    assert fake.listed == ["loras"]
    assert host.list_files("unknown", host.SAFETENSORS) == []
    assert (
        host.resolve("loras", "lycoris/a.safetensors") == tmp_path / "loras/lycoris/a.safetensors"
    )
    assert host.resolve("loras", "missing.safetensors") is None
    assert host.resolve("diffusers", "pipe") == (tmp_path / "diffusers" / "pipe").resolve()
