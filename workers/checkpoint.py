"""Model checkpoints: one self-describing file, written atomically, verified by sha256.

The file holds only tensors and plain values, so it loads with
`torch.load(weights_only=True)`: no pickle of arbitrary objects is ever executed.

`load_model` is the one loader, for every consumer (serving, BCT constraints, evaluation):
it dispatches on the file's `kind` -- absent or "plain": a `GracefulNet` (`save_model`);
"lqf": a `workers.models.LinearizedNet` (written by `workers.lqf.save_lqf`). Both have the serving
interface: `input_dim`, `num_classes`, `spec`, `embed(x)`, `forward(x)` -> logits,
`embed_and_logits(x)`, `head(z)` and `classifier` (what BCT freezes).
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

from workers.models import GracefulNet, LinearizedNet, build_model
from workers.specs import ArchSpec

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
    """Write `model` (a `GracefulNet`, or with `kind` another model of `BUILDERS`) to
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
        "input_dim": model.input_dim,
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


def model_from_checkpoint(f: Path, blob: dict[str, Any]) -> tuple[GracefulNet, dict[str, Any]]:
    """The `GracefulNet` (eval mode) and meta of a plain checkpoint `read_checkpoint` returned."""
    try:
        spec = ArchSpec.model_validate(blob["arch"])
        model = build_model(spec, int(blob["input_dim"]), int(blob["num_classes"]))
        model.load_state_dict(blob["state_dict"], strict=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {f} does not match its architecture: {e}") from None
    model.eval()
    return model, dict(blob.get("meta") or {})


def _lqf_from_checkpoint(f: Path, blob: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The `LinearizedNet` (eval mode) and meta of an LQF checkpoint `read_checkpoint`
    returned (kind "lqf", written by `workers.lqf.save_lqf`)."""
    try:
        spec = ArchSpec.model_validate(blob["arch"])
        parent = build_model(spec, int(blob["input_dim"]), int(blob["num_classes"]))
        model = LinearizedNet(parent, spec)
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


def load_model(path: str | Path, sha256: Optional[str] = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load any generation's checkpoint (weights_only), verifying its sha256 first when one
    is given; the verified bytes are the loaded bytes (one read, see `read_checkpoint`).

    Dispatches on the checkpoint's kind (`BUILDERS`): a `GracefulNet` for plain ones, a
    `workers.lqf.LinearizedNet` for `recipe: lqf`. Raises CheckpointError for a kind it
    does not know, naming the kind and the file."""
    f, blob = read_checkpoint(path, sha256)  # reports missing, changed, corrupt or foreign files
    kind = checkpoint_kind(blob)
    builder = BUILDERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        raise CheckpointError(f"checkpoint {f} is of kind {kind!r}, which cannot be loaded "
                              f"(known kinds: {', '.join(sorted(BUILDERS))})")
    return builder(f, blob)
