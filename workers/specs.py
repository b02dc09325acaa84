"""Typed configuration of the training data plane (data, architectures, training, compatibility).

These models are composed into the run config by `orchestrator.config`; they live here so
that `workers` never imports `orchestrator` (see docs/architecture.md, dependency direction).
Every model rejects unknown keys; ranges are checked by the field constraints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from workers.factory import FACTORY_PATTERN


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _json_kwargs(v: dict[str, Any]) -> dict[str, Any]:
    """Factory kwargs are recorded in checkpoints and hashes: plain JSON values only."""
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"kwargs must be plain JSON values (numbers, strings, lists, mappings): {e}") from None
    return v


class DataSpec(StrictModel):
    """Where the samples come from and how they are split (deterministic by `seed`)."""

    # custom: `factory(**kwargs)` returns (x, y) or {"train": (x, y), "val": ..., "test": ...};
    # ray: `factory(**kwargs)` returns a ray.data.Dataset with columns x and y (or such a
    # dict of them), streamed to the Ray Train workers (workers.streaming).
    source: Literal["mnist1d", "digits", "npz", "custom", "ray"] = "mnist1d"
    # npz: a file with arrays `x` (N, *input_shape) and `y` (N,) int; relative to the config file.
    path: Optional[Path] = None
    factory: Optional[str] = Field(None, pattern=FACTORY_PATTERN, description="custom / ray: 'module:callable'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="custom / ray: passed to the factory")
    # Default: the largest label in the data + 1.
    num_classes: Optional[int] = Field(None, ge=2)
    num_samples: int = Field(15000, gt=0, description="mnist1d only: samples generated")
    seed: int = Field(0, ge=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    # ray only: the validation and the test split are read into memory (evaluation, the
    # offline gate, the retrieval gallery need them), each capped at this many rows; the
    # training rows stream (docs/training.md, Streaming data).
    eval_rows: int = Field(10000, gt=0, description="ray only: rows of the val and of the test split held in memory")
    # Cache for generated datasets; default ~/.cache/graceful (or $GRACEFUL_CACHE).
    cache_dir: Optional[Path] = None

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if v is None:
            return v
        base = (info.context or {}).get("base_dir")
        p = v if v.is_absolute() or base is None else Path(base) / v
        if not p.is_file():
            raise ValueError(f"file not found: {p}")
        return p

    _kwargs_json = field_validator("kwargs")(classmethod(lambda cls, v: _json_kwargs(v)))

    @model_validator(mode="after")
    def _npz_needs_path(self) -> "DataSpec":
        if self.source == "npz" and self.path is None:
            raise ValueError("source 'npz' needs `path` to a .npz file with arrays x and y")
        if self.source in ("custom", "ray") and self.factory is None:
            raise ValueError(f"source {self.source!r} needs `factory: package.module:callable`")
        if self.source not in ("custom", "ray") and (self.factory is not None or self.kwargs):
            raise ValueError(f"`factory` and `kwargs` are for source custom or ray, not {self.source!r}")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction must leave at least 10% for training")
        return self


class ItemsSpec(StrictModel):
    """The items of the retrieval catalogue (docs/serving.md, Catalogue).

    gallery_split: the data's gallery split (the second half of the test split), item ids
    its row numbers. npz: a file with arrays `ids` (strings or integers), `x` (n,
    *input_shape) and optionally `y` (class ids, used only to score retrieval).
    custom: `factory(**kwargs)` returns {"ids", "x"[, "y"]} or (ids, x) or (ids, x, y).
    """

    source: Literal["gallery_split", "npz", "custom"] = "gallery_split"
    path: Optional[Path] = Field(None, description="npz: relative to the config file")
    factory: Optional[str] = Field(None, pattern=FACTORY_PATTERN, description="custom: 'module:callable'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="custom: passed to the factory")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        return DataSpec._path_exists(v, info)

    _kwargs_json = field_validator("kwargs")(classmethod(lambda cls, v: _json_kwargs(v)))

    @model_validator(mode="after")
    def _source_needs(self) -> "ItemsSpec":
        if self.source == "npz" and self.path is None:
            raise ValueError("source 'npz' needs `path` to a .npz file with arrays ids and x")
        if self.source == "custom" and self.factory is None:
            raise ValueError("source 'custom' needs `factory: package.module:callable`")
        if self.source != "custom" and (self.factory is not None or self.kwargs):
            raise ValueError(f"`factory` and `kwargs` are for source custom, not {self.source!r}")
        if self.source != "npz" and self.path is not None:
            raise ValueError(f"`path` is for source npz, not {self.source!r}")
        return self


BUILTIN_FACTORY = "(built-in)"


class ArchSpec(StrictModel):
    """A model: an embedding network and a classifier head on top of it.

    custom: `factory(input_shape, num_classes, **kwargs)` builds the module (workers.models,
    "Bring your own model"); width, depth and kernel_size are then unused.
    """

    type: Literal["mlp", "cnn1d", "cnn2d", "custom"] = "cnn1d"
    factory: Optional[str] = Field(None, pattern=FACTORY_PATTERN, description="custom only: 'module:callable'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="custom only: passed to the factory")
    width: int = Field(32, gt=0, description="hidden units (mlp) or channels (cnn1d, cnn2d)")
    depth: int = Field(3, ge=1, le=16, description="hidden layers (mlp), conv layers (cnn1d), residual blocks (cnn2d)")
    kernel_size: int = Field(5, ge=1, le=31, description="cnn1d only (cnn2d uses 3x3)")
    embed_dim: int = Field(64, gt=0)
    # cosine: L2-normalised embedding and a cosine head (normalised softmax) -- what BCT
    # needs (docs/training.md, Data and models); linear: ReLU-free embedding + linear head.
    head: Literal["cosine", "linear"] = "cosine"
    scale: float = Field(16.0, gt=0, description="cosine head: logit scale")
    activation: Literal["relu", "leaky_relu"] = "relu"
    negative_slope: float = Field(0.01, gt=0, lt=1, description="leaky_relu only")

    _kwargs_json = field_validator("kwargs")(classmethod(lambda cls, v: _json_kwargs(v)))

    @property
    def checkpoint_factory(self) -> str:
        """What a checkpoint of this arch records as its factory (`BUILTIN_FACTORY` for mlp,
        cnn1d, cnn2d): loaders compare the two before importing anything."""
        return self.factory or BUILTIN_FACTORY

    @model_validator(mode="after")
    def _custom_needs_factory(self) -> "ArchSpec":
        if self.type == "custom" and self.factory is None:
            raise ValueError("type 'custom' needs `factory: package.module:callable`")
        if self.type != "custom" and (self.factory is not None or self.kwargs):
            raise ValueError(f"`factory` and `kwargs` are for type custom, not {self.type!r}")
        return self


class TrainSpec(StrictModel):
    """Optimisation settings of one generation."""

    steps: int = Field(3000, gt=0, description="optimiser steps (global batches)")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = Field(0, ge=0)
    eval_every: int = Field(500, gt=0, description="steps between validation + checkpoint")


class BCTSpec(StrictModel):
    """Backward-compatible training: new embedding through frozen old heads (influence loss)."""

    weight: float = Field(1.0, ge=0)
    # production: only the model in production; ancestors: every ancestor with weight
    # decay**distance (normalised), which always includes the gallery's model.
    against: Literal["production", "ancestors"] = "ancestors"
    decay: float = Field(0.5, gt=0, le=1)


class FocalDistillationSpec(StrictModel):
    """Positive-congruent training (Yan et al. 2021): per-sample weight alpha + beta*[old right]."""

    form: Literal["kl", "lm"] = "kl"
    alpha: float = Field(0.0, ge=0)
    beta: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    weight: float = Field(1.0, ge=0)


class EnsembleSpec(StrictModel):
    """ELODI-style distillation from an ensemble of same-architecture reference models."""

    members: int = Field(4, ge=1, le=32)
    weight: float = Field(0.5, ge=0)
    top_k: Optional[int] = Field(None, ge=1, description="only the ensemble's top-K classes")
    margin: float = Field(0.0, ge=0, description="ignore logit gaps below this margin")


class WeightInterpolationSpec(StrictModel):
    """BCWI: start from the parent's weights, fine-tune, then move the weights back toward
    the parent's, theta = alpha * parent + (1 - alpha) * fine-tuned (workers.interpolation)."""

    # auto: the largest alpha of workers.interpolation.ALPHA_GRID whose validation error is
    # within the fine-tuned model's + max_error_increase.
    alpha: Union[Literal["auto"], float] = "auto"
    max_error_increase: float = Field(0.0, ge=0, le=1, description="auto only: validation error budget")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: "float | str") -> "float | str":
        if v != "auto" and not 0.0 <= float(v) < 1.0:
            raise ValueError(f"alpha must be 'auto' or in [0, 1) (1 would be the parent itself), got {v}")
        return v


class CompatSpec(StrictModel):
    """Compatibility terms added to the task loss; all off by default."""

    bct: Optional[BCTSpec] = None
    focal_distillation: Optional[FocalDistillationSpec] = None
    ensemble: Optional[EnsembleSpec] = None
    # Not a loss term: the generation starts from its parent's weights and is interpolated
    # back toward them after training (same architecture as the parent).
    weight_interpolation: Optional[WeightInterpolationSpec] = None


class LQFSpec(StrictModel):
    """Linearised fine-tuning around the parent's weights (Achille et al. 2021)."""

    target_scale: float = Field(5.0, gt=0, description="one-hot targets are scaled by this")
    damping: float = Field(1e-3, gt=0)
    update_interval: int = Field(20, ge=1, description="steps between K-FAC factor updates")
    precondition: bool = True
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum on the (preconditioned) gradient")
    exact_step: bool = Field(True, description="scale each step to the batch's exact quadratic minimiser")


class GenerationSpec(StrictModel):
    """One generation of the chain: what it sees, its model, how it is trained."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    arch: ArchSpec = Field(default_factory=ArchSpec)
    # New data for this generation: replaces the run's training pool (new rows, new
    # classes); every generation is still evaluated on the run's common test split.
    train_data: Optional[DataSpec] = None
    # How much of the training pool this generation sees (a prefix, so later generations
    # see a superset: continual learning). Fraction of the pool in (0, 1].
    train_fraction: float = Field(1.0, gt=0, le=1)
    label_noise: float = Field(0.0, ge=0, lt=1, description="fraction of training labels replaced")
    train: TrainSpec = Field(default_factory=TrainSpec)
    compat: CompatSpec = Field(default_factory=CompatSpec)
    recipe: Literal["standard", "lqf"] = "standard"
    lqf: LQFSpec = Field(default_factory=LQFSpec)
    # enforce: a candidate failing the offline gate is rejected and never goes live.
    # advisory: the failure is recorded and reported, and the live rollout decides (the
    # controller still rolls back a regression; the demo's g2 shows exactly that).
    offline_gate: Literal["enforce", "advisory"] = "enforce"

    @model_validator(mode="after")
    def _interpolation_is_standard(self) -> "GenerationSpec":
        if self.compat.weight_interpolation is not None and self.recipe != "standard":
            raise ValueError("compat.weight_interpolation fine-tunes the parent's own network and interpolates its "
                             "weights; recipe lqf trains a linearisation instead: use one or the other")
        return self


class ScalingSpec(StrictModel):
    """Ray Train scaling: the same config runs on 2 CPU workers here and on a GPU cluster."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0)
    # Ray Train checkpoints: a path or a URI (s3://, gs://) reachable from every node;
    # default run_dir/ray. A multi-node cluster needs shared storage here.
    storage_path: Optional[str] = Field(None, min_length=1)
