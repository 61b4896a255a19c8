"""Import-only stand-in for torchvision, for test environments whose torchvision wheel does not match the
CPU torch build ("operator torchvision::nms does not exist", hosts.md §4.2).  ComfyUI's core sampling
path only imports it (cosmos / cascade model files); any use raises."""
import types as _types


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is stubbed in this test environment")


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable


transforms = _types.ModuleType("torchvision.transforms")
transforms.__getattr__ = _module_getattr
__getattr__ = _module_getattr

import sys as _sys

transforms.functional = _types.ModuleType("torchvision.transforms.functional")
transforms.functional.__getattr__ = _module_getattr
_sys.modules.setdefault("torchvision.transforms", transforms)
_sys.modules.setdefault("torchvision.transforms.functional", transforms.functional)
