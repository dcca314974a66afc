"""ComfyUI nodes of comfyui-lycoris (V1 dialect): thin glue over lycoris_core.

Only nodes/_host.py may import ComfyUI modules. The node classes arrive with the node-pack
work; until then the pack registers no nodes.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
