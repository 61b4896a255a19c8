"""Load k-diffusion's ``sampling`` module without running the package's ``__init__``.

``import k_diffusion`` imports torchvision, clip, wandb... through the package ``__init__``; the samplers in
``k_diffusion/sampling.py`` need only torch, scipy, torchsde, torchdiffeq, tqdm and one helper of
``k_diffusion.utils``.  So the benchmark executes that one file against a stub parent package instead.
No k-diffusion code is copied: the installed file is what runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

INSTALL_HINT = "pip install --no-deps k-diffusion torchsde torchdiffeq trampoline"

_sampling: types.ModuleType | None = None


def _append_dims(x, target_dims: int):
    """Append trailing singleton dimensions to ``x`` until it has ``target_dims`` dimensions."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_kdiffusion_sampling() -> types.ModuleType:
    """Return k-diffusion's ``sampling`` module (Crowson's k-diffusion, the samplers of Karras et al. 2022, EDM).

    The installed ``k_diffusion/sampling.py`` is located with :func:`importlib.util.find_spec` (which does not
    execute the package) and executed as ``k_diffusion.sampling`` under a stub ``k_diffusion`` package whose
    ``utils`` provides only ``append_dims``.  The stubs are in ``sys.modules`` only while the file executes, so a
    later real ``import k_diffusion`` (A1111 ships one) is not shadowed.  If the real package is already imported,
    its own ``sampling`` module is returned.  The result is cached.

    Raises:
        ImportError: k-diffusion or one of the sampling module's dependencies is not installed.
    """
    global _sampling
    if _sampling is not None:
        return _sampling
    if "k_diffusion" in sys.modules and not getattr(sys.modules["k_diffusion"], "_ado_stub", False):
        _sampling = importlib.import_module("k_diffusion.sampling")
        return _sampling

    spec = importlib.util.find_spec("k_diffusion")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    paths = [os.path.join(loc, "sampling.py") for loc in locations]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise ImportError(f"k-diffusion is not installed (k_diffusion/sampling.py not found); run: {INSTALL_HINT}")

    package = types.ModuleType("k_diffusion")
    package.__path__ = []  # a package, but nothing else is importable from it
    package._ado_stub = True
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    package.utils = utils
    file_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
    module = importlib.util.module_from_spec(file_spec)

    names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils, "k_diffusion.sampling": module})
    try:
        file_spec.loader.exec_module(module)
    except ImportError as e:
        raise ImportError(f"k-diffusion's sampling module needs {e.name!r}; run: {INSTALL_HINT}") from e
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    _sampling = module
    return _sampling
