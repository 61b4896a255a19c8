"""ComfyUI entry point of ADO (Adaptive Diffusion Optimizer).

ComfyUI imports this file when the repository sits in ``custom_nodes/``.  It registers the ADO nodes, the
frontend extension in ``web/`` and the ``ado_adaptive`` entry of the KSampler sampler dropdown.  Imports
stay light: torch and numpy (which ComfyUI already has), no model files are loaded here.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_dropdown

WEB_DIRECTORY = "./web"

register_dropdown()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
