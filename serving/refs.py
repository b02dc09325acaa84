"""What to serve: small typed descriptions passed from the control plane to serving.

Serving never imports `orchestrator`; the CLI (or the rollout controller) resolves these
from the registry or the run directory and hands them over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def app_name_for(generation: str) -> str:
    """The Serve application that hosts a generation."""
    return f"graceful-gen-{generation}"


@dataclass(frozen=True)
class ModelRef:
    """One generation's checkpoint: loaded only if its file still has this sha256.

    `factory`: the model factory the config expects the checkpoint to record
    (`workers.checkpoint.expected_factory`: a custom factory's import path, or
    `workers.checkpoint.BUILTIN`); a checkpoint built by another factory is refused when it
    is loaded. None: whatever factory the checkpoint records (no config to compare with).
    """

    name: str
    uri: str
    sha256: str
    factory: Optional[str] = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"generation name {self.name!r}: letters, digits, _ . - (at most 64)")
        if not _SHA.match(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")

    @property
    def app_name(self) -> str:
        """The Serve application that hosts this generation."""
        return app_name_for(self.name)
