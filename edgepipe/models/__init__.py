"""Where models come from: ``package.module:factory``, ``.pt2``, TorchScript, ``.onnx``, or the bundled example.

Every source resolves to a :class:`ModelSource`: a torch module (to compress and export) or an ONNX file
(compression is then skipped), with a hash of its weights for the manifest.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepipe._hashing import sha256_file
from edgepipe._imports import first_line as _first_line
from edgepipe.errors import ModelLoadError

if TYPE_CHECKING:
    from torch import nn

EXAMPLE = "edgepipe.models.example:digits_resnet"
# model files that are code: loading one can run whatever its author put in it
CODE_SUFFIXES = (".pt2", ".pt", ".ts")
TRUST_HINT = "pass --trust-code (trust_code=True) only if you trust whoever wrote it"

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("edgepipe_trust_code", default=False)


@contextlib.contextmanager
def trusting(trust_code: bool) -> Iterator[None]:
    """Within the block, model files that are code (``.pt2``, TorchScript) load without ``trust_code``
    being passed to each :func:`load_model` (a recipe's teacher, the pipeline's own model load)."""
    token = _TRUST.set(bool(trust_code))
    try:
        yield
    finally:
        _TRUST.reset(token)


def _require_trust(path: Path, role: str, trust_code: bool | None) -> None:
    """Refuse a file that runs code when loaded unless the user said they trust it."""
    if trust_code if trust_code is not None else _TRUST.get():
        return
    if path.suffix == ".pt2":
        why = ("is a torch.export program, and torch.export.load unpickles parts of it with "
               "weights_only=False, which can run any code the file's author chose")
    else:
        why = "is a TorchScript archive, which is code: loading and running it executes what its author wrote"
    alt = ("or give the weights as .safetensors or a torch.save'd state dict" if role == "weights" else
           "or give package.module:factory with --weights FILE.safetensors, or an .onnx")
    raise ModelLoadError(f"{role} file {str(path)!r} {why}; it was not loaded: {TRUST_HINT}, {alt}")


@dataclass
class ModelSource:
    """A loaded model: ``module`` for torch sources, ``onnx_path`` for ONNX ones."""

    spec: str
    kind: str  # "torch" or "onnx"
    module: nn.Module | None = None
    onnx_path: Path | None = None
    weights_sha256: str = ""

    @property
    def is_onnx(self) -> bool:
        return self.kind == "onnx"


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of every tensor in the module's state dict, by sorted name."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_weights(module: nn.Module, weights: Path, trust_code: bool | None = None) -> None:
    import torch

    if not weights.is_file():
        raise ModelLoadError(f"weights file {str(weights)!r} not found")
    if weights.suffix == ".pt2":
        _require_trust(weights, "weights", trust_code)
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        elif weights.suffix == ".pt2":  # e.g. the output of `edgepipe compress`
            state = torch.export.load(str(weights)).state_dict
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as e:
        raise ModelLoadError(
            f"weights file {str(weights)!r} could not be read ({e}); give a .safetensors file, a "
            "torch.save'd state_dict or a .pt2 program"
        ) from e
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        hint = ("; a .pt2 whose layers a recipe replaced (lowrank) no longer fits its factory: build or pack "
                "it with the recipe instead" if weights.suffix == ".pt2" else "")
        raise ModelLoadError(f"weights {str(weights)!r} do not fit the model: {first}{hint}") from e


def save_program(module: nn.Module, input_shape: tuple[int, ...] | dict[str, tuple[int, ...]], out: Path,
                 dtypes: dict[str, str] | None = None) -> Path:
    """Save ``module`` as a torch.export ``.pt2`` program with a dynamic batch, atomically.

    Args:
        module: the model.
        input_shape: one input's shape (batch first, any rank), or a shape per forward argument by name.
        out: where the ``.pt2`` goes.
        dtypes: numpy dtype by input name (``"int64"`` for token ids); floats and inputs not named: float32.
    """
    import torch

    from edgepipe.export import _resolve_inputs

    spec = _resolve_inputs(module, input_shape, dtypes)
    # an example batch of 1 would let torch.export specialise the batch dimension to 1
    example = spec.examples(2)
    try:
        program = torch.export.export(module, example, dynamic_shapes=spec.dynamic_shapes())
    except Exception as e:
        raise ModelLoadError(f"the model does not export with torch.export, so no .pt2 was written: {e}") from e
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # torch.export.save names the archive's folder after the file: save under the final name in a private
    # directory beside ``out`` (not a random temp name, which would make the bytes differ run to run), then
    # rename it into place
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir) / out.name
        torch.export.save(program, str(tmp))
        os.replace(tmp, out)
    return out


def _import(spec: str, mod_name: str) -> Any:
    """Import the factory's module (the current directory last, never for the bundled example)."""
    from edgepipe._imports import import_module

    return import_module(spec, mod_name, "model", ModelLoadError, search_cwd=spec != EXAMPLE)


def _from_factory(spec: str, weights: Path | None, trust_code: bool | None = None) -> Any:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelLoadError(f"model {spec!r}: give package.module:factory (e.g. {EXAMPLE})")
    mod = _import(spec, mod_name)
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"model {spec!r}: module {mod_name!r} has no callable {attr!r}")
    try:
        module = factory()
    except Exception as e:
        raise ModelLoadError(f"model {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    from torch import nn

    if isinstance(module, (str, Path)) and str(module).endswith(".onnx"):  # a factory that locates an ONNX file
        if weights is not None:
            raise ModelLoadError(f"model {spec!r}: the factory gives an ONNX file ({module}), which holds its weights; "
                                 "drop --weights")
        return Path(module)
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"model {spec!r}: the factory returned {type(module).__name__}, not a torch.nn.Module "
                             "or the path of an .onnx file")
    if weights is not None:
        _load_weights(module, weights, trust_code)
    return module


def load_model(spec: str | None = None, weights: Path | None = None, *,
               trust_code: bool | None = None) -> ModelSource:
    """Resolve a model source.

    Args:
        spec: ``package.module:factory`` (returning a torch module, or the path of an ``.onnx`` file), a ``.pt2``
            ExportedProgram, a TorchScript ``.pt``/``.ts`` file,
            an ``.onnx`` file, or ``None`` for the bundled example.
        weights: for a factory, a ``.safetensors`` file or a state dict saved with ``torch.save`` (both
            read as data only), or a ``.pt2`` program (code: needs ``trust_code``).
        trust_code: load ``.pt2`` and TorchScript files, which can run code when loaded. ``None``: as
            the enclosing :func:`trusting` block says (default: refuse them).
    """
    spec = spec or EXAMPLE
    path = Path(spec)
    if path.suffix in (".onnx", ".pt2", ".pt", ".ts", ".pth") or path.exists():
        if not path.is_file():
            raise ModelLoadError(f"model file {spec!r} not found")
        if path.suffix in CODE_SUFFIXES:
            _require_trust(path, "model", trust_code)
        if path.suffix == ".onnx":
            return ModelSource(spec, "onnx", onnx_path=path, weights_sha256=_check_onnx(path))
        if path.suffix == ".pt2":
            return _from_pt2(path)
        if path.suffix in (".pt", ".ts"):
            return _from_torchscript(path)
        raise ModelLoadError(f"model file {spec!r}: unknown kind; give .onnx, .pt2, a TorchScript .pt, or module:factory")
    if ":" not in spec:
        raise ModelLoadError(
            f"model {spec!r} is neither a file nor 'package.module:factory' (e.g. {EXAMPLE})"
        )
    module = _from_factory(spec, weights, trust_code)
    if isinstance(module, Path):
        if not module.is_file():
            raise ModelLoadError(f"model {spec!r}: the factory gave the ONNX file {str(module)!r}, which does not exist")
        return ModelSource(spec, "onnx", onnx_path=module, weights_sha256=_check_onnx(module))
    module.eval()
    return ModelSource(spec, "torch", module=module, weights_sha256=state_dict_sha256(module))


def _check_onnx(path: Path) -> str:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model file {str(path)!r} is not a valid ONNX model: {first}") from e
    return sha256_file(path)


def _from_pt2(path: Path) -> ModelSource:
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"model file {str(path)!r} is not a torch.export .pt2 program ({_first_line(e)})") from e
    module = ep.module()
    return ModelSource(str(path), "torch", module=module, weights_sha256=sha256_file(path))


def _from_torchscript(path: Path) -> ModelSource:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelLoadError(
            f"model file {str(path)!r} is not a TorchScript archive ({_first_line(e)}); for a state dict use "
            "'module:factory --weights FILE'"
        ) from e
    return ModelSource(str(path), "torch", module=module.eval(), weights_sha256=sha256_file(path))
