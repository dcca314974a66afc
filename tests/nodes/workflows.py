"""Workflow formats: API format ({id: {class_type, inputs}}) <-> UI format (LiteGraph JSON).

Used to build and check ``example_workflows/`` (UI format for the editor, ``api/`` for
``POST /prompt``): both must describe the same graph with the same widget values.
"""

from __future__ import annotations

from typing import Any

# The few ComfyUI core nodes our examples use (their inputs, in widget order).
CORE_NODES: dict[str, dict[str, Any]] = {
    "SaveImage": {
        "inputs": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {})},
        "outputs": [],
    },
    "PreviewImage": {"inputs": {"images": ("IMAGE", {})}, "outputs": []},
    "ImageBatch": {
        "inputs": {"image1": ("IMAGE", {}), "image2": ("IMAGE", {})},
        "outputs": [("IMAGE", "IMAGE")],
    },
    # ComfyUI's stock nodes of the checkpoint example, inputs in their declaration order
    "CheckpointLoaderSimple": {
        "inputs": {"ckpt_name": (["tiny_sd15.safetensors"], {})},
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    },
    "CLIPTextEncode": {
        "inputs": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})},
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "EmptyLatentImage": {
        "inputs": {
            "width": ("INT", {"default": 512}),
            "height": ("INT", {"default": 512}),
            "batch_size": ("INT", {"default": 1}),
        },
        "outputs": [("LATENT", "LATENT")],
    },
    "KSampler": {
        "inputs": {
            "model": ("MODEL", {}),
            "seed": ("INT", {"default": 0, "control_after_generate": True}),
            "steps": ("INT", {"default": 20}),
            "cfg": ("FLOAT", {"default": 8.0}),
            "sampler_name": (["euler"], {}),
            "scheduler": (["normal"], {}),
            "positive": ("CONDITIONING", {}),
            "negative": ("CONDITIONING", {}),
            "latent_image": ("LATENT", {}),
            "denoise": ("FLOAT", {"default": 1.0}),
        },
        "outputs": [("LATENT", "LATENT")],
    },
    "VAEDecode": {
        "inputs": {"samples": ("LATENT", {}), "vae": ("VAE", {})},
        "outputs": [("IMAGE", "IMAGE")],
    },
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def node_spec(class_type: str, classes: dict) -> tuple[dict[str, tuple], list[tuple[str, str]]]:
    """(inputs in declaration order, [(output name, type)]) of a node class."""
    if class_type in classes:
        cls = classes[class_type]
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        return inputs, list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES, strict=True))
    core = CORE_NODES[class_type]
    return core["inputs"], core["outputs"]


def is_widget(value: tuple) -> bool:
    kind = value[0]
    return isinstance(kind, list) or (kind in WIDGET_TYPES and not value[1].get("forceInput"))


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [v for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(str(v[0])) for v in links), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: dict, classes: dict) -> dict:
    """A UI-format workflow (nodes laid out in columns by depth) for an API-format prompt."""
    depth = _depths(api)
    rows: dict[int, int] = {}
    nodes, links = [], []
    outputs: dict[tuple[str, int], list[int]] = {}
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), name])
                outputs.setdefault((str(value[0]), value[1]), []).append(len(links))
    for order, (node_id, node) in enumerate(sorted(api.items(), key=lambda kv: int(kv[0]))):
        inputs, outs = node_spec(node["class_type"], classes)
        d = depth[node_id]
        rows[d] = rows.get(d, 0) + 1
        ui_inputs, widgets = [], []
        for name, value in inputs.items():
            given = node["inputs"].get(name)
            if isinstance(given, list):
                link = next(lk[0] for lk in links if lk[3] == int(node_id) and lk[4] == name)
                ui_inputs.append(
                    {
                        "name": name,
                        "type": value[0] if isinstance(value[0], str) else "COMBO",
                        "link": link,
                    }
                )
            elif is_widget(value):
                widgets.append(given if given is not None else value[1].get("default"))
                if value[1].get("control_after_generate"):
                    widgets.append("fixed")
            elif name in node["inputs"]:
                raise ValueError(f"node {node_id}: input {name} must be a link")
        nodes.append(
            {
                "id": int(node_id),
                "type": node["class_type"],
                "pos": [60 + 380 * d, 60 + 300 * (rows[d] - 1)],
                "size": [340, 260],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": ui_inputs,
                "outputs": [
                    {
                        "name": name,
                        "type": kind,
                        "links": outputs.get((node_id, slot), []),
                        "slot_index": slot,
                    }
                    for slot, (name, kind) in enumerate(outs)
                ],
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
            }
        )
    ui_links = []
    for link_id, src, slot, dst, name in links:
        inputs, _ = node_spec(api[str(dst)]["class_type"], classes)
        dst_slot = [
            k for k, v in inputs.items() if isinstance(api[str(dst)]["inputs"].get(k), list)
        ].index(name)
        _, outs = node_spec(api[str(src)]["class_type"], classes)
        ui_links.append([link_id, src, slot, dst, dst_slot, outs[slot][1]])
    return {
        "last_node_id": max(int(k) for k in api),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": ui_links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def ui_to_api(ui: dict, classes: dict) -> dict:
    """The API-format prompt of a UI-format workflow (the inverse of :func:`api_to_ui`)."""
    links = {lk[0]: lk for lk in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        inputs, _ = node_spec(node["type"], classes)
        values = list(node["widgets_values"])
        out: dict[str, Any] = {}
        linked = {i["name"]: i["link"] for i in node["inputs"] if i.get("link") is not None}
        for name, value in inputs.items():
            if name in linked:
                lk = links[linked[name]]
                out[name] = [str(lk[1]), lk[2]]
            elif is_widget(value):
                out[name] = values.pop(0)
                if value[1].get("control_after_generate"):
                    values.pop(0)
        if values:
            raise ValueError(f"node {node['id']}: {len(values)} widget values left over")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": out}
    return api
