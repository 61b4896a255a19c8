"""ComfyUI node classes of ADO (see ``ado_nodes``) and the sampler function ComfyUI runs (``comfy_sampler``)."""
from .ado_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .comfy_sampler import SAMPLER_NAME, register_dropdown, sample_ado

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "SAMPLER_NAME", "register_dropdown", "sample_ado"]
