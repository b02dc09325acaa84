"""Training one generation on Ray Train, with compatibility terms against older models.

The driver (`run_training`) computes what the constraints need once per generation, as
Ray tasks: the frozen heads of the BCT models, the production model's logits on the
training split (Focal Distillation) and the mean logits of an ensemble of reference models
trained in parallel (ensemble distillation). The workers (`_train_loop_per_worker`) run
DDP over their shard of each global batch and look the cached outputs up by row index, so
no old model runs inside the training step. Each evaluation reports metrics and a
checkpoint; a restarted worker group, or a rerun of the same command, resumes from the
latest one.

A streamed generation (`data.source: ray`, `workers.streaming`) trains on its rows as Ray
Train dataset shards instead: each worker reads `get_dataset_shard("train")`, and the
production model's logits arrive as a column of the batch, added by a Ray Data actor
(`workers.streaming.with_old_logits`); the step loop, recipes, DDP, reports and
checkpoints are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from workers.checkpoint import METRICS_FILE, MODEL_FILE, load_model, save_model
from workers.data import Split, fingerprint, generation_data, load_dataset
from workers.losses import (FrozenHead, bct_influence_loss, ensemble_distillation_loss,
                            focal_distillation_loss, frozen_head)
from workers.interpolation import apply_interpolation, state_mismatch
from workers.models import LinearizedNet, build_model
from workers.specs import CompatSpec, DataSpec, GenerationSpec, ScalingSpec
from workers.streaming import (OLD_LOGITS, cpu_shortfall, stream_batches, stream_problems, streams, train_stream,
                               with_old_logits)
from workers.training import ExtraLoss, Recipe, StandardRecipe, accuracy, fit, predict, run_batches, run_steps

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class ConstraintModel:
    """An older generation a new one is constrained against."""

    name: str
    path: str  # checkpoint directory or file
    sha256: str
    importance: float = 1.0  # weight among the BCT heads
    # What the config expects its checkpoint's factory to be (`checkpoint.expected_factory`);
    # a checkpoint recording another one is refused. None: not checked.
    factory: Optional[str] = None

    def load(self) -> tuple[nn.Module, dict[str, Any]]:
        """Its model, verified by sha256 and factory."""
        return load_model(self.path, self.sha256, factory=self.factory)


@dataclass(frozen=True)
class TrainJob:
    """Everything needed to train one generation; built by the orchestrator from the config."""

    generation: GenerationSpec
    data: DataSpec
    scaling: ScalingSpec
    out_dir: str  # run_dir/generations/<name>
    storage_path: str  # Ray Train storage (local path or URI)
    run_name: str  # stable per (generation, config): a rerun resumes the same run
    config_hash: str = ""  # of the run config, recorded for lineage
    training_hash: str = ""  # of what determines the weights: a rerun with the same one is not retrained
    production: Optional[ConstraintModel] = None  # Focal Distillation target; LQF parent
    bct: tuple[ConstraintModel, ...] = ()
    # Tests only: SIGKILL one worker once at this step (a marker file makes it once).
    fault_at_step: Optional[int] = None
    fault_marker: Optional[str] = None
    verbose: bool = True


@dataclass
class CompatTargets:
    """Cached outputs of older models, aligned with the rows of the generation's train split."""

    heads: list[FrozenHead] = field(default_factory=list)
    old_logits: Optional[np.ndarray] = None
    ensemble_logits: Optional[np.ndarray] = None
    # A streamed generation: the batch column holding the old model's logits (instead of
    # `old_logits` indexed by row).
    old_logits_column: Optional[str] = None


@dataclass(frozen=True)
class TrainResult:
    name: str
    checkpoint: str
    sha256: str
    metrics: dict[str, Any]


def make_extra_loss(compat: CompatSpec, targets: CompatTargets,
                    device: torch.device = torch.device("cpu")) -> Optional[ExtraLoss]:
    """The sum of the configured compatibility terms, as an `ExtraLoss` for the loop.

    Cached outputs are looked up by the batch's rows (`idx`); a streamed batch brings the
    old model's logits as its column `targets.old_logits_column` instead."""
    terms: list[Callable[..., torch.Tensor]] = []
    if compat.bct is not None and compat.bct.weight > 0 and targets.heads:
        w, heads = compat.bct.weight, targets.heads
        terms.append(lambda model, y, idx, z, logits, ex: w * bct_influence_loss(z, y, heads, _unit_embeddings(model)))
    fd = compat.focal_distillation
    if fd is not None and fd.weight > 0 and (targets.old_logits is not None or targets.old_logits_column):
        if targets.old_logits is not None:
            old = torch.as_tensor(targets.old_logits, device=device)
            old_of = lambda idx, ex: old[idx]  # noqa: E731
        else:
            column = targets.old_logits_column
            old_of = lambda idx, ex: _column(ex, column)  # noqa: E731
        terms.append(lambda model, y, idx, z, logits, ex: fd.weight * focal_distillation_loss(
            logits, old_of(idx, ex), y, fd.form, fd.alpha, fd.beta, fd.temperature))
    ens = compat.ensemble
    if ens is not None and ens.weight > 0 and targets.ensemble_logits is not None:
        ref = torch.as_tensor(targets.ensemble_logits, device=device)
        terms.append(lambda model, y, idx, z, logits, ex: ens.weight * ensemble_distillation_loss(
            logits, ref[idx], ens.top_k, ens.margin))
    if not terms:
        return None

    def extra(model, x, y, idx, z, logits, **extras):
        loss = terms[0](model, y, idx, z, logits, extras)
        for t in terms[1:]:
            loss = loss + t(model, y, idx, z, logits, extras)
        return loss

    return extra


def _column(extras: dict, name: str) -> torch.Tensor:
    if name not in extras:
        raise KeyError(f"the batch has no column {name!r} (it has {sorted(extras)}): a streamed generation's "
                       f"old logits come with its batches (workers.streaming.with_old_logits)")
    return extras[name]


def _unit_embeddings(model: Optional[nn.Module]) -> bool:
    """Whether `model` L2-normalises its embeddings (cosine heads): BCT then skips doing it
    again. `unit_embeddings` of a `GracefulNet`, or an LQF `LinearizedNet` around one, with
    a cosine head; False for a custom model's own `embed` and anything unknown."""
    return bool(getattr(model, "unit_embeddings", False))


# --- driver-side preparation (Ray tasks) ---------------------------------------------------

def _logits_of(c: ConstraintModel, x: np.ndarray) -> np.ndarray:
    model, _ = c.load()  # plain or LQF (served through a JVP)
    return predict(model, x)[1]


def constraint_head(c: ConstraintModel) -> FrozenHead:
    """The frozen head of BCT constraint `c`, from its verified checkpoint (plain or LQF:
    an LQF generation's head has the folded weights w0 + delta, `LinearizedNet.classifier`)."""
    model, _ = c.load()
    return frozen_head(model, c.name, c.importance)


# --- on-disk caches in a generation's directory ---------------------------------------------

ENSEMBLE_CACHE_PREFIX = "ensemble_logits_"
CACHE_PATTERNS = (f"{ENSEMBLE_CACHE_PREFIX}*.npy",)  # everything `clear_caches` removes


def ensemble_seeds(gen: GenerationSpec) -> list[int]:
    """The seeds of `gen`'s ensemble references."""
    assert gen.compat.ensemble is not None
    return [1000 + 17 * k + gen.train.seed for k in range(gen.compat.ensemble.members)]


def ensemble_cache_key(gen: GenerationSpec, data: DataSpec, split: Split) -> str:
    """sha256 of everything the ensemble references' mean logits depend on: the generation's
    arch and train spec (seed included), the data spec (its cache_dir aside: where the
    generated samples are kept changes nothing), train_fraction, label_noise, the member
    seeds and count, and the fingerprint of the training split. Same inputs, same key; a
    change to any of them is a new key, so stale targets are never reused."""
    assert gen.compat.ensemble is not None
    blob = {
        "arch": gen.arch.model_dump(mode="json"),
        "train": gen.train.model_dump(mode="json"),
        "data": data.model_dump(mode="json", exclude={"cache_dir"}),
        "train_fraction": gen.train_fraction,
        "label_noise": gen.label_noise,
        "members": gen.compat.ensemble.members,
        "seeds": ensemble_seeds(gen),
        "split": fingerprint(split),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def ensemble_cache_path(job: TrainJob, split: Split) -> Path:
    return Path(job.out_dir) / f"{ENSEMBLE_CACHE_PREFIX}{ensemble_cache_key(job.generation, job.data, split)}.npy"


def clear_caches(out_dir: str | Path) -> list[Path]:
    """Remove the cached constraint targets (ensemble logits, any key, old-style names too)
    in generation directory `out_dir`, e.g. for `graceful train --force`; returns what was
    removed. The checkpoint and metrics are left alone."""
    removed: list[Path] = []
    d = Path(out_dir)
    if not d.is_dir():
        return removed
    for pattern in CACHE_PATTERNS:
        for f in sorted(d.glob(pattern)):
            if f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def _read_cached_logits(cache: Path, rows: int) -> Optional[np.ndarray]:
    """The cached array, or None when absent, unreadable or of the wrong number of rows."""
    if not cache.is_file():
        return None
    try:
        arr = np.load(cache, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == rows else None


def _write_cached_logits(cache: Path, arr: np.ndarray) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, cache)  # a reader never sees a half-written cache


def _train_reference(gen: GenerationSpec, data: DataSpec, seed: int) -> np.ndarray:
    """One ensemble reference: the generation's architecture and data, another seed, no
    compatibility terms; returns its logits on the generation's training rows."""
    torch.set_num_threads(1)
    ds = load_dataset(data)
    split, classes = generation_data(ds, gen)
    torch.manual_seed(seed)
    model = build_model(gen.arch, ds.input_shape, classes)
    fit(model, split, gen.train.model_copy(update={"seed": seed}))
    return predict(model, split.x)[1]


def embedding_size(gen: GenerationSpec, data: DataSpec,
                   shape: Optional[tuple[tuple[int, ...], int]] = None) -> int:
    """The size of the embeddings `gen` produces: `arch.embed_dim`, except for a custom
    model with its own `embed`, whose size is known once its factory has built it (for
    `shape` = (input shape, classes) when given, else those of the data)."""
    if gen.arch.type != "custom":
        return gen.arch.embed_dim
    if shape is None:
        ds = load_dataset(data)
        shape = (ds.input_shape, generation_data(ds, gen)[1])
    return int(build_model(gen.arch, shape[0], shape[1]).embed_dim)


def build_targets(job: TrainJob, split: Optional[Split], log: Callable[[str], None] = print,
                  shape: Optional[tuple[tuple[int, ...], int]] = None) -> CompatTargets:
    """Compute the cached outputs the configured constraints need, as Ray tasks.

    `split` None: the generation streams (`workers.streaming`); Focal Distillation's old
    logits then come with each batch (column `old_logits`) and ensemble distillation is
    refused. `shape`: (input shape, classes) of the generation, when the caller knows them."""
    import ray

    gen, compat = job.generation, job.generation.compat
    targets = CompatTargets()
    if split is None and stream_problems(gen):
        raise ValueError("; ".join(stream_problems(gen)))
    if compat.bct is not None:
        new_dim = embedding_size(gen, job.data, shape)
        for c in job.bct:
            head = constraint_head(c)  # verified by sha256 on every call: nothing cached on disk
            if head.embed_dim != new_dim:  # fail here, not in every restarted worker
                raise ValueError(f"BCT against {c.name}: its head scores embeddings of size {head.embed_dim}, "
                                 f"{gen.name} produces {new_dim}")
            targets.heads.append(head)
    if compat.focal_distillation is not None:
        if job.production is None:
            raise ValueError("focal_distillation needs a production model")
        if split is None:
            targets.old_logits_column = OLD_LOGITS
        else:
            task = ray.remote(num_cpus=1)(_logits_of)
            targets.old_logits = ray.get(task.remote(job.production, split.x))
    if compat.ensemble is not None and split is not None:
        cache = ensemble_cache_path(job, split)
        cached = _read_cached_logits(cache, len(split))
        if cached is not None:
            targets.ensemble_logits = cached
            log(f"[{gen.name}] ensemble logits from cache {cache.name}")
        else:
            t0 = time.time()
            task = ray.remote(num_cpus=1)(_train_reference)
            seeds = ensemble_seeds(gen)
            log(f"[{gen.name}] training {len(seeds)} ensemble references in parallel on Ray ...")
            refs = [task.remote(gen, job.data, s) for s in seeds]
            targets.ensemble_logits = np.mean(ray.get(refs), axis=0).astype(np.float32)
            _write_cached_logits(cache, targets.ensemble_logits)
            log(f"[{gen.name}] ensemble references done in {time.time() - t0:.1f}s")
    return targets


# --- the per-worker loop ---------------------------------------------------------------------

class _EmbedAndLogits(nn.Module):
    """DDP synchronises gradients only through forward(): expose both outputs there."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.embed_and_logits(x)


def _train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    targets: CompatTargets = config["targets"]
    progress = config.get("progress")  # a ray.util.queue.Queue the driver prints from
    gen, spec = job.generation, job.generation.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))

    stream = config.get("stream")  # a streamed generation: its val split, input shape, classes
    if stream is None:
        ds = load_dataset(job.data)
        split, classes = generation_data(ds, gen)
        val, input_shape = ds.val, ds.input_shape
    else:
        split, val, input_shape, classes = None, stream["val"], stream["input_shape"], stream["classes"]
    torch.manual_seed(spec.seed)  # identical initial weights on every worker
    recipe: Recipe
    if gen.recipe == "lqf":
        from workers.lqf import make_lqf

        parent, _ = job.production.load()
        recipe = make_lqf(parent, gen)
    else:
        net = build_model(gen.arch, input_shape, classes)
        if gen.compat.weight_interpolation is not None:
            net.load_state_dict(parent_state(job))  # fine-tuned from the parent (BCWI)
        recipe = StandardRecipe(net, spec)
    model, opt, sched = recipe.model, recipe.opt, recipe.sched
    model.to(device)
    ddp = ray.train.torch.prepare_model(_EmbedAndLogits(model))
    extra = make_extra_loss(gen.compat, targets, device)

    start, history, resumed_from = 0, [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = int(state["step"]), list(state["history"])
        resumed_from = start
        if rank == 0 and progress is not None:
            progress.put(f"[{gen.name}] resuming from the checkpoint at step {start}/{spec.steps}")

    def inject_fault(step: int) -> None:
        if job.fault_at_step is not None and step == job.fault_at_step and rank == world - 1:
            marker = Path(job.fault_marker or Path(job.out_dir) / ".fault-injected")
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    def report(step: int, loss: float) -> None:
        # Every rank reports (Ray Train expects it); rank 0 alone evaluates and checkpoints.
        row = {"step": step, "loss": loss, "seconds": round(time.time() - t0, 2),
               "resumed_from_step": resumed_from}
        peaks = _peak_rss_mb_of_workers(world, device)  # a collective: every rank calls it here
        if rank == 0:
            row["worker_peak_rss_mb"] = peaks
            row["val_accuracy"] = accuracy(model, val) if len(val) else float("nan")
            history.append(row)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step, "history": history},
                           Path(d) / STATE_FILE)
                ray.train.report({**row, "history": json.dumps(history)},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
            if progress is not None:
                progress.put(f"[{gen.name}] step {step}/{spec.steps}  loss {row['loss']:.4f}  "
                             f"val_acc {row['val_accuracy']:.4f}  ({row['seconds']:.1f}s)")
        else:
            ray.train.report(row)

    t0 = time.time()
    # DDP (`ddp`) all-reduces the gradients in backward; each worker trains on its slice
    # of every global batch; a resumed run continues from the checkpoint's step.
    if split is not None:
        run_steps(recipe, split, spec, extra_loss=extra, forward=ddp, rank=rank, world=world, start=start,
                  device=device, after_step=inject_fault, on_eval=report)
    else:
        # Each worker's shard of the stream (Ray Train splits it into equal shards, so every
        # worker gets as many batches: DDP needs it); a resumed run restarts the stream.
        batches = stream_batches(ray.train.get_dataset_shard("train"), spec.batch_size // world, device=device,
                                 seed=spec.seed)
        run_batches(recipe, batches, spec, extra_loss=extra, forward=ddp, start=start, after_step=inject_fault,
                    on_eval=report)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (getrusage; Linux counts KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _peak_rss_mb_of_workers(world: int, device: torch.device) -> list[float]:
    """Every training worker's `peak_rss_mb`, by rank (an all-gather: all ranks must call it)."""
    mine = peak_rss_mb()
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    t = torch.tensor([mine], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    torch.distributed.all_gather(out, t)
    return [round(float(o.item()), 1) for o in out]


# --- the driver ----------------------------------------------------------------------------

def check_buildable(job: TrainJob, input_shape: tuple[int, ...], classes: int) -> None:
    """Build the generation's network once on the driver, so that a factory that fails, or
    an LQF generation with more classes than its parent, is reported here as itself (a
    FactoryError or ValueError naming it) rather than inside every Ray Train worker."""
    gen = job.generation
    if gen.recipe == "lqf":
        parent, _ = job.production.load()  # type: ignore[union-attr]
        if classes > parent.num_classes:
            raise ValueError(f"{gen.name}: recipe lqf linearises its parent {job.production.name!r}, which has "  # type: ignore[union-attr]
                             f"{parent.num_classes} classes; its data has {classes}; a linearised network cannot "
                             f"add classes: train it with recipe standard")
        return
    model = build_model(gen.arch, input_shape, classes)
    if gen.compat.weight_interpolation is not None:
        if job.production is None:
            raise ValueError(f"{gen.name}: compat.weight_interpolation starts from the parent's weights, and there "
                             f"is no parent (production) model")
        parent, _ = job.production.load()
        if isinstance(parent, LinearizedNet):
            raise ValueError(f"{gen.name}: compat.weight_interpolation interpolates plain weights, and its parent "
                             f"{job.production.name!r} is an LQF generation (w0 + delta served through a JVP)")
        problems = state_mismatch(parent.state_dict(), model.state_dict())
        if problems:
            raise ValueError(f"{gen.name}: compat.weight_interpolation needs the parent's architecture, and "
                             f"{job.production.name!r} differs: " + "; ".join(problems[:3]) +
                             (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))


def parent_state(job: TrainJob) -> dict[str, torch.Tensor]:
    """The parent's (production's) weights, from its verified checkpoint."""
    assert job.production is not None
    parent, _ = job.production.load()
    return {k: v.detach().cpu() for k, v in parent.state_dict().items()}


def run_training(job: TrainJob, log: Callable[[str], None] = print) -> TrainResult:
    """Train `job.generation` on Ray Train (ray must be initialised) and write
    `out_dir/model.pt` and `out_dir/metrics.json`. Resumes an interrupted run.

    A streamed generation (`workers.streaming.streams`) gives Ray Train its rows as the
    dataset "train" (with the old model's logits as a column for Focal Distillation)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    gen = job.generation
    t_start = time.time()
    ds = load_dataset(job.data)  # source ray: the val and test splits only
    if gen.recipe == "lqf" and job.production is None:
        raise ValueError(f"{gen.name}: recipe lqf needs a parent (production) model")
    config: dict[str, Any] = {"job": job}
    datasets = None
    if streams(job.data, gen):
        if stream_problems(gen):  # before anything is read
            raise ValueError("; ".join(stream_problems(gen)))
        if gen.train.batch_size < job.scaling.num_workers:
            raise ValueError(f"{gen.name}: train.batch_size {gen.train.batch_size} is smaller than "
                             f"scaling.num_workers {job.scaling.num_workers}: a streamed batch is split evenly")
        stream = train_stream(job.data, gen, ds.input_shape, ds.num_classes)
        split, classes = None, stream.num_classes
        check_buildable(job, ds.input_shape, classes)  # before the Ray tasks of the targets
        targets = build_targets(job, None, log, shape=(ds.input_shape, classes))
        rows = stream.dataset
        if targets.old_logits_column is not None:
            rows = with_old_logits(rows, job.production)
        datasets = {"train": rows}
        config["stream"] = {"val": ds.val, "input_shape": ds.input_shape, "classes": classes}
        per_worker = gen.train.batch_size // job.scaling.num_workers
        train_samples = gen.train.steps * per_worker * job.scaling.num_workers  # rows the steps consume
        data_fingerprint = stream.fingerprint
        what = "a stream (Ray Data)"
        short = cpu_shortfall(float(ray.cluster_resources().get("CPU", 0)), job.scaling,
                              targets.old_logits_column is not None)
        if short:
            log(f"[{gen.name}] warning: {short}")
    else:
        split, classes = generation_data(ds, gen)
        check_buildable(job, ds.input_shape, classes)  # before the Ray tasks of the targets
        # the shape known here: the data (and its factory) are not loaded again for it
        targets = build_targets(job, split, log, shape=(ds.input_shape, classes))
        train_samples, data_fingerprint, what = len(split), fingerprint(split), f"{len(split)} samples"
    config["targets"] = targets
    log(f"[{gen.name}] training on Ray Train: {job.scaling.num_workers} worker(s), "
        f"{'GPU' if job.scaling.use_gpu else 'CPU'}, {what}, {gen.train.steps} steps")
    resources = {"CPU": job.scaling.cpus_per_worker}
    if job.scaling.use_gpu:
        resources["GPU"] = 1
    from ray.util.queue import Queue

    progress = Queue() if job.verbose else None
    config["progress"] = progress
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=config,
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=job.scaling.num_workers,
                                               use_gpu=job.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=job.run_name, storage_path=job.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=job.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = _fit_printing(trainer, progress, log)
    if result.checkpoint is None:
        raise RuntimeError(f"{gen.name}: training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    history = list(state["history"])
    meta = {"generation": gen.name, "parent": job.production.name if job.production else None}
    interpolation: Optional[dict] = None  # compat.weight_interpolation: the alpha applied
    if gen.recipe == "lqf":
        from workers.lqf import make_lqf, save_lqf

        parent, _ = job.production.load()
        model = make_lqf(parent, gen).model
        model.load_state_dict(state["model"])
        sha = save_lqf(model.eval(), job.out_dir, meta)
    else:
        model = build_model(gen.arch, ds.input_shape, classes)
        model.load_state_dict(state["model"])
        wi = gen.compat.weight_interpolation
        if wi is not None:
            interpolation = apply_interpolation(model, parent_state(job), wi.alpha, wi.max_error_increase,
                                                ds.val.x, ds.val.y)
            log(f"[{gen.name}] weights interpolated toward {job.production.name}: alpha "  # type: ignore[union-attr]
                f"{interpolation['alpha']:g}")
        sha = save_model(model.eval(), job.out_dir, meta)
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {
        "name": gen.name, "parent": meta["parent"], "sha256": sha, "recipe": gen.recipe,
        "config_hash": job.config_hash, "training_hash": job.training_hash,
        "train_seconds": round(time.time() - t_start, 2), "val_accuracy": last.get("val_accuracy"),
        "test_accuracy": accuracy(model, ds.test), "history": history,
        "resumed_from_step": next((h["resumed_from_step"] for h in history if h.get("resumed_from_step")), None),
        "data_fingerprint": data_fingerprint, "train_samples": train_samples, "streamed": split is None,
        "worker_peak_rss_mb": last.get("worker_peak_rss_mb"),
        "input_shape": list(ds.input_shape), "num_classes": classes,
        "factory": gen.arch.factory,
        "constraints": constraint_records(job),
        "scaling": job.scaling.model_dump(),
    }
    if interpolation is not None:
        metrics["weight_interpolation"] = interpolation
    out = Path(job.out_dir)
    tmp = out / f".{METRICS_FILE}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / METRICS_FILE)
    log(f"[{gen.name}] done in {metrics['train_seconds']:.1f}s: val_acc {metrics['val_accuracy']:.4f}, "
        f"test_acc {metrics['test_accuracy']:.4f}; checkpoint {out / MODEL_FILE} (sha256 {sha[:12]}...)")
    return TrainResult(gen.name, str(out / MODEL_FILE), sha, metrics)


def constraint_records(job: TrainJob) -> list[dict]:
    """What `job` was constrained against, for metrics.json: one entry per term and model."""
    compat = job.generation.compat
    out: list[dict] = []
    if compat.bct is not None:
        out += [{"kind": "bct", "name": c.name, "sha256": c.sha256, "importance": c.importance,
                 "weight": compat.bct.weight} for c in job.bct]
    if compat.focal_distillation is not None and job.production is not None:
        out.append({"kind": "focal_distillation", "name": job.production.name, "sha256": job.production.sha256,
                    "weight": compat.focal_distillation.weight})
    if compat.ensemble is not None:
        out.append({"kind": "ensemble", "members": compat.ensemble.members, "weight": compat.ensemble.weight})
    if compat.weight_interpolation is not None and job.production is not None:
        out.append({"kind": "weight_interpolation", "name": job.production.name, "sha256": job.production.sha256,
                    "alpha": compat.weight_interpolation.alpha})
    return out


def _fit_printing(trainer, progress, log: Callable[[str], None]):
    """trainer.fit(), printing the workers' progress lines as they arrive."""
    if progress is None:
        return trainer.fit()
    from ray.util.queue import Empty

    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                log(progress.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return
            except Exception:  # the queue actor is gone: nothing more to print
                return

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        return trainer.fit()
    finally:
        done.set()
        t.join(timeout=5)
        try:
            import ray

            ray.kill(progress.actor)
        except Exception:
            pass


def with_fault(job: TrainJob, at_step: int, marker: str) -> TrainJob:
    """A copy of `job` whose last worker SIGKILLs itself once at `at_step` (tests)."""
    return replace(job, fault_at_step=at_step, fault_marker=marker)
