"""Model checkpoints: one self-describing file, written atomically, verified by sha256.

The file holds only tensors and plain values, so it loads with
`torch.load(weights_only=True)`: no pickle of arbitrary objects is ever executed.

`load_model` is the one loader, for every consumer (serving, BCT constraints, evaluation):
it dispatches on the file's `kind` -- absent or "plain": the network `arch` describes
(`workers.models.build_model`: a `GracefulNet`, or a custom factory's `UserNet`);
"lqf": a `workers.models.LinearizedNet` (written by `workers.lqf.save_lqf`). All have the
serving interface: `input_shape`, `num_classes`, `spec`, `embed(x)`, `forward(x)` -> logits,
`embed_and_logits(x)`, `head(z)` and `classifier` (what BCT freezes).

The file records the architecture (for a custom model its factory's import path and
kwargs), the input shape, the number of classes and the state dict. A custom model is
rebuilt by calling its factory again, so loading one imports user code: callers that have
the run config pass `factory=` (the config's), and a checkpoint naming another factory is
refused before anything is imported.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlparse

import torch
from torch import nn

from workers.models import LinearizedNet, build_model
from workers.specs import BUILTIN_FACTORY, ArchSpec

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
# What training records beside the checkpoint (written by workers.train.run_training).
METRICS_FILE = "metrics.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, changed, truncated or not one of ours."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_file(path: str | Path) -> Path:
    """The model file a checkpoint reference names: the checkpoint directory or the file
    itself, as a path or a `file://` URI (every loader and verifier resolves through this).
    CheckpointError for another URI scheme (only local files can be verified here)."""
    if isinstance(path, str) and "://" in path:
        parsed = urlparse(path)
        if parsed.scheme != "file":
            raise CheckpointError(f"checkpoint URI {path!r}: only local paths and file:// URIs can be loaded here")
        path = unquote(parsed.path)
    p = Path(path)
    return p / MODEL_FILE if p.is_dir() else p


def save_model(model: nn.Module, path: str | Path, meta: Optional[dict[str, Any]] = None,
               kind: Optional[str] = None) -> str:
    """Write `model` (a `build_model` network, or with `kind` another model of `BUILDERS`) to
    `path` (a directory, or a file name) and return the file's sha256. The one writer of
    the format: `workers.lqf.save_lqf` comes through here with kind "lqf"."""
    target = Path(path)
    if target.suffix != ".pt":
        target = target / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT_VERSION,
        **({"kind": kind} if kind is not None else {}),
        "arch": model.spec.model_dump(mode="json"),
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, target)  # a reader never sees a half-written checkpoint
    return sha256_file(target)


def read_checkpoint(path: str | Path, sha256: Optional[str] = None) -> tuple[Path, dict[str, Any]]:
    """The model file `path` names and its contents (`torch.load(weights_only=True)`), after
    checking the sha256 when one is given.

    The file is read ONCE: the bytes that are hashed are the bytes that are loaded, so a
    retrain replacing model.pt between the check and the load cannot slip in unverified
    weights. Raises CheckpointError when it is missing, changed, unreadable or not ours."""
    f = model_file(path)
    try:
        data = f.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"checkpoint not found: {f}") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {f} cannot be read: {type(e).__name__}: {e}") from None
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CheckpointError(
                f"checkpoint {f} was changed or truncated: sha256 {actual[:12]}... "
                f"!= recorded {sha256[:12]}...; refusing to load it"
            )
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {f} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {f} is not a graceful model file (format {FORMAT_VERSION})")
    return f, blob


def input_shape_of(blob: dict[str, Any]) -> tuple[int, ...]:
    """The recorded input shape (files written before shapes existed hold `input_dim`)."""
    if "input_shape" in blob:
        return tuple(int(d) for d in blob["input_shape"])
    return (int(blob["input_dim"]),)


# What `factory_of` says of a built-in architecture (mlp, cnn1d, cnn2d).
BUILTIN = BUILTIN_FACTORY


def factory_of(blob: dict[str, Any]) -> str:
    """The import path of a custom checkpoint's factory; `BUILTIN` for a built-in architecture."""
    arch = blob.get("arch") or {}
    return (arch.get("factory") if isinstance(arch, dict) else None) or BUILTIN


def expected_factory(arch: ArchSpec) -> str:
    """What a config's `arch` expects `factory_of` a checkpoint to say."""
    return arch.checkpoint_factory


def _rebuild(f: Path, blob: dict[str, Any]) -> nn.Module:
    """The (untrained) network a checkpoint's arch, input shape and classes describe."""
    from workers.factory import FactoryError

    try:
        spec = ArchSpec.model_validate(blob["arch"])
        return build_model(spec, input_shape_of(blob), int(blob["num_classes"]))
    except FactoryError as e:
        raise CheckpointError(f"checkpoint {f}: {e}") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {f} does not describe a buildable model: {type(e).__name__}: {e}") from None


def model_from_checkpoint(f: Path, blob: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The model (eval mode) and meta of a plain checkpoint `read_checkpoint` returned."""
    model = _rebuild(f, blob)
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {f} does not match its architecture: {e}") from None
    model.eval()
    return model, dict(blob.get("meta") or {})


def _lqf_from_checkpoint(f: Path, blob: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The `LinearizedNet` (eval mode) and meta of an LQF checkpoint `read_checkpoint`
    returned (kind "lqf", written by `workers.lqf.save_lqf`)."""
    parent = _rebuild(f, blob)
    try:
        model = LinearizedNet(parent, parent.spec)
        model.load_state_dict(blob["state_dict"], strict=True)
    except Exception as e:
        raise CheckpointError(f"LQF checkpoint {f} does not match its architecture: {e}") from None
    return model.eval(), dict(blob.get("meta") or {})



# kind (the file's "kind"; absent = "plain") -> builder of (model in eval mode, meta).
BUILDERS: dict[str, Callable[[Path, dict[str, Any]], tuple[nn.Module, dict[str, Any]]]] = {
    "plain": model_from_checkpoint,
    "lqf": _lqf_from_checkpoint,
}


def checkpoint_kind(blob: dict[str, Any]) -> str:
    kind = blob.get("kind")
    return "plain" if kind is None else kind


def load_model(path: str | Path, sha256: Optional[str] = None,
               factory: Optional[str] = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load any generation's checkpoint (weights_only), verifying its sha256 first when one
    is given; the verified bytes are the loaded bytes (one read, see `read_checkpoint`).

    `factory`: what the caller's config expects (`expected_factory(arch)`: the factory's
    import path, or `BUILTIN`); a checkpoint recording another one is refused before its
    factory is imported. None: the recorded factory is used.

    Dispatches on the checkpoint's kind (`BUILDERS`): the `arch` network for plain ones, a
    `workers.lqf.LinearizedNet` for `recipe: lqf`. Raises CheckpointError for a kind it
    does not know, naming the kind and the file."""
    f, blob = read_checkpoint(path, sha256)  # reports missing, changed, corrupt or foreign files
    if factory is not None and factory_of(blob) != factory:
        raise CheckpointError(f"checkpoint {f} was built by factory {factory_of(blob)}, "
                              f"the config names {factory}; refusing to load it")
    kind = checkpoint_kind(blob)
    builder = BUILDERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        raise CheckpointError(f"checkpoint {f} is of kind {kind!r}, which cannot be loaded "
                              f"(known kinds: {', '.join(sorted(BUILDERS))})")
    return builder(f, blob)
