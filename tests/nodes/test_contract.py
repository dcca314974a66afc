"""Contract tests over every node: ids, INPUT_TYPES, tooltips, signatures, outputs, snapshot."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("interface.json")
COMFY_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "MODEL", "CLIP"}
OUR_TYPES = {"LYCORIS_MODEL", "LYCORIS_ADAPTER", "LYCORIS_CONFIG", "LYCORIS_DATASET"}


def interface(nodes) -> dict:
    out = {}
    for key, cls in sorted(nodes.items()):
        spec = cls.INPUT_TYPES()
        out[key] = {
            "inputs": {
                section: {
                    name: (value[0] if isinstance(value[0], str) else "COMBO")
                    for name, value in spec.get(section, {}).items()
                }
                for section in ("required", "optional", "hidden")
                if section in spec
            },
            "outputs": list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES, strict=True)),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return json.loads(json.dumps(out))


def test_ids_and_display_names(pack):
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    assert set(names) == set(pack.NODE_CLASS_MAPPINGS)
    assert len(set(names.values())) == len(names)
    assert all(key.startswith("Lycoris") for key in names)


def test_every_node_is_well_formed(nodes):
    for key, cls in nodes.items():
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 30, key
        assert cls.CATEGORY.startswith("LyCORIS"), key
        n = len(cls.RETURN_TYPES)
        assert len(cls.RETURN_NAMES) == n == len(cls.OUTPUT_TOOLTIPS), key
        assert all(t in COMFY_TYPES | OUR_TYPES for t in cls.RETURN_TYPES), key
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec, key
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert isinstance(value, tuple) and len(value) == 2, (key, name)
                kind, options = value
                assert isinstance(kind, list) or kind in COMFY_TYPES | OUR_TYPES, (key, name, kind)
                assert isinstance(options.get("tooltip"), str) and options["tooltip"], (key, name)
        run = getattr(cls, cls.FUNCTION)
        params = inspect.signature(run).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for section in ("required", "optional", "hidden"):
            for name in spec.get(section, {}):
                assert name in params or takes_kwargs, (key, name)
        for name, p in params.items():
            if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            declared = any(name in spec.get(s, {}) for s in ("required", "optional", "hidden"))
            assert declared, f"{key}.{cls.FUNCTION} takes {name!r}, which is not an input"
            if name not in spec["required"]:
                assert p.default is not inspect.Parameter.empty, (key, name)


def test_validate_inputs_keep_the_hosts_own_checks(nodes):
    """ComfyUI skips its min/max/combo checks for every input a VALIDATE_INPUTS names, and for
    all inputs when it takes **kwargs: ours name only what they check themselves."""
    for key, cls in nodes.items():
        check = getattr(cls, "VALIDATE_INPUTS", None)
        if check is None:
            continue
        spec = inspect.getfullargspec(check)
        assert spec.varkw is None, f"{key}.VALIDATE_INPUTS takes **kwargs"
        declared = {n for s in ("required", "optional") for n in cls.INPUT_TYPES().get(s, {})}
        assert set(spec.args[1:]) <= declared, key


def test_interface_snapshot(nodes):
    """Node ids, input names/types and outputs are saved in users' workflows: change on purpose.

    To accept a deliberate change: UPDATE_INTERFACE_SNAPSHOT=1 pytest tests/nodes.
    """
    current = interface(nodes)
    if os.environ.get("UPDATE_INTERFACE_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert SNAPSHOT.exists(), "no interface snapshot: run with UPDATE_INTERFACE_SNAPSHOT=1"
    assert current == json.loads(SNAPSHOT.read_text())
