"""Shared run-time loading of ADO's learned parts (quality monitor, PPO policy): an ONNX graph named by a JSON
manifest, verified by sha256 before ONNX Runtime sees it.

Only numpy, hashlib and (lazily) onnxruntime are imported here: no training library and no pickle, so a shipped
file can only be a graph and a JSON document.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np


def sha256_of_bytes(data: bytes) -> str:
    """Hex sha256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_of_file(path: str | Path) -> str:
    """Hex sha256 digest of the file at ``path``."""
    return sha256_of_bytes(Path(path).read_bytes())


def import_onnxruntime(what: str, error: type[Exception]):
    """The onnxruntime module, or ``error`` saying that ``what`` needs it."""
    try:
        import onnxruntime
    except ImportError:
        raise error(f"the {what} needs ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def open_verified_session(manifest_path: Path, onnx_file: str, sha256: str, device: str, what: str,
                          load_error: type[Exception], integrity_error: type[Exception]):
    """An ONNX Runtime session over ``manifest_path.parent / onnx_file`` after checking its sha256.

    Returns (session, providers in use).  ``device``: "cpu", "cuda" (CUDA provider, CPU as fallback, with a
    warning when CUDA is not there) or "auto".  A missing file or a graph ONNX Runtime rejects raises
    ``load_error``; a sha256 mismatch raises ``integrity_error`` (a corrupt or swapped file).
    """
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"unknown {what} device {device!r}: expected 'cpu', 'cuda' or 'auto'")
    onnx_path = Path(manifest_path).parent / onnx_file
    if not onnx_path.is_file():
        raise load_error(f"{what} graph not found: {onnx_path} (named in {manifest_path})")
    graph = onnx_path.read_bytes()
    digest = sha256_of_bytes(graph)
    if digest != sha256:
        raise integrity_error(f"{onnx_path}: sha256 {digest} does not match the manifest's {sha256}; the file is "
                              f"corrupt or not the one the manifest describes")
    ort = import_onnxruntime(what, load_error)
    available = ort.get_available_providers()
    wants_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
    providers = ["CPUExecutionProvider"]
    if wants_cuda:
        if "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            warnings.warn(f"{what}: CUDA asked for, but ONNX Runtime offers only {available}; using the CPU")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1   # tiny MLPs: threads only add latency
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(graph, sess_options=options, providers=providers)
    except Exception as e:  # ONNX Runtime raises its own exception types for a bad graph
        raise load_error(f"{onnx_path}: ONNX Runtime could not load the graph: {e}") from None
    used = list(session.get_providers())
    if device == "cuda" and "CUDAExecutionProvider" not in used:
        warnings.warn(f"{what}: CUDA asked for, but the session runs on {used}")
    return session, used


def graph_runner(session, input_name: str, output_name: str, probe: np.ndarray):
    """A callable ``x -> output array`` running the single-input graph of ``session`` on a float32 array ``x``.

    For the per-step calls of ADO's tiny graphs (a decision of the 64-64 policy is a few µs of arithmetic):
    ONNX Runtime's Python ``InferenceSession.run`` re-checks the feed names and the input ownership on every call,
    about 10 µs, a third of a policy decision on a slow CPU.  On a CPU-only session this calls the session's
    compiled core (``session._sess.run``, what the public method ends in) once it gave the same output on
    ``probe`` as the public method; otherwise (a CUDA session, whose public method also handles the provider
    fallback, or an ONNX Runtime without that core) it calls the public ``run``.  The names were checked at load
    (:func:`check_io_names`).
    """
    names = [output_name]

    def public(x):
        return session.run(names, {input_name: x})[0]

    core = getattr(session, "_sess", None)
    if core is None or list(session.get_providers()) != ["CPUExecutionProvider"]:
        return public

    def direct(x):
        return core.run(names, {input_name: x}, None)[0]

    try:
        same = np.array_equal(direct(probe), public(probe), equal_nan=True)
    except Exception:   # an ONNX Runtime whose core has another signature
        return public
    return direct if same else public


def check_io_names(session, input_name: str, output_name: str, where, load_error: type[Exception]) -> None:
    """Raise ``load_error`` unless the graph has the manifest's input and output tensor names."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if input_name not in inputs or output_name not in outputs:
        raise load_error(f"{where}: graph inputs {inputs} / outputs {outputs} do not match the manifest's "
                         f"{input_name!r} / {output_name!r}")


__all__ = ["JsonManifest", "check_io_names", "graph_runner", "import_onnxruntime", "load_cached",
           "open_verified_session", "parse_manifest", "sha256_of_bytes", "sha256_of_file"]


def parse_manifest(text: str, cls, fmt: str, required: set[str], what: str, load_error: type[Exception]):
    """Build the manifest dataclass ``cls`` from its JSON ``text``, checking format, unknown and missing keys.

    A manifest shipped next to an ONNX file is data a user may receive from someone else, so it is parsed as
    plain JSON (never unpickled) and rejected with ``load_error`` naming ``what`` when anything is off.
    """
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise load_error(f"the {what} manifest is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise load_error(f"the {what} manifest must be a JSON object")
    if d.get("format") != fmt:
        raise load_error(f"unknown {what} manifest format {d.get('format')!r}: expected {fmt!r}")
    unknown, missing = set(d) - set(cls.__dataclass_fields__), set(required) - set(d)
    if unknown or missing:
        raise load_error(f"{what} manifest: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return cls(**d)


class JsonManifest:
    """Mixin for the manifest dataclasses of the shipped ONNX parts (monitor, policy): JSON text both ways.

    A subclass sets ``FORMAT`` (the manifest's format tag), ``REQUIRED`` (keys that must be present),
    ``WHAT`` (the part's name in error messages) and ``LOAD_ERROR`` (the exception raised on a bad manifest).
    """

    FORMAT: str
    REQUIRED: frozenset[str]
    WHAT: str
    LOAD_ERROR: type[Exception]

    def to_json(self) -> str:
        """The manifest as indented JSON text."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str):
        """Parse a manifest written by :meth:`to_json`; a wrong format, missing or unknown key raises ``LOAD_ERROR``."""
        return parse_manifest(text, cls, cls.FORMAT, cls.REQUIRED, cls.WHAT, cls.LOAD_ERROR)


def load_cached(cache: dict, path: Path, manifest_cls: type[JsonManifest], device: str, build):
    """``build(path, device)`` — a loaded monitor or policy — reused while its manifest and graph files are
    unchanged (keyed by the manifest's resolved path, both files' mtimes and sizes, and the device; ``cache``
    keeps one entry).  A manifest that cannot be read or parsed goes straight to ``build``, which raises the
    error naming the problem."""
    try:
        st = path.stat()
        manifest = manifest_cls.from_json(path.read_text())
        graph = (path.parent / manifest.onnx_file).stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size, graph.st_mtime_ns, graph.st_size, device)
    except (OSError, manifest_cls.LOAD_ERROR):
        return build(path, device)
    if key not in cache:
        cache.clear()
        cache[key] = build(path, device)
    return cache[key]
