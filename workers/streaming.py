"""Streaming data (`data.source: ray`): training rows that never sit in one process's memory.

The factory (`data.factory`, "module:callable", called with `data.kwargs` on the driver)
returns a `ray.data.Dataset` with columns `x` (each row an array of the input shape) and
`y` (an integer class id): the whole pool, split here; or a dict {"train": Dataset,
"val": Dataset or (x, y), "test": Dataset or (x, y)} ("val" optional) used as it is.

- A single Dataset is split by a keyed hash of each row's bytes (`row_uniforms`: blake2b
  of x as float32 and y as int64, keyed by `data.seed`): a row goes to test with
  probability `test_fraction`, to validation with `val_fraction`, else it trains
  (`split_rows`). The split is a pure function of the row, so every pass over the data
  (the driver's, each epoch of the workers') agrees without materialising anything;
  identical rows land in the same split.
- Validation and test are read into memory (`load_eval_dataset`, what
  `workers.data.load_dataset` returns for this source): evaluation, the offline gate,
  the retrieval gallery and serving need them. Each is capped at `data.eval_rows` rows,
  the first ones in the dataset's order (read with Ray Data's `preserve_order`, so the
  same rows every time); the read stops once both are full. The returned `Dataset` has
  an empty `train` split (of the right input shape).
- Training rows stream (`train_stream`): the train share of the pool (or the dict's
  "train", or a generation's own `train_data`), the generation's `train_fraction` kept
  by the same hash (so a later generation with a larger fraction sees a superset) and its
  `label_noise` drawn by a hash keyed by its seed; every batch is checked (columns,
  numbers, the input shape, finite values, labels in [0, num_classes)). The Ray Train
  workers read their shard of it (`stream_batches`); Focal Distillation's old logits are
  added as a column by a Ray Data actor running the production model (`with_old_logits`).
- `data.num_classes` is required: labels of a stream are not scanned up front.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np

from workers.data import Dataset, DataError, Split, call_data_factory, check_arrays
from workers.specs import DataSpec

if TYPE_CHECKING:
    from workers.specs import GenerationSpec, ScalingSpec
    from workers.training import Batch

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {VAL: "val", TEST: "test"}
OLD_LOGITS = "old_logits"  # the column Focal Distillation reads (`with_old_logits`)
EXTRA_COLUMNS = (OLD_LOGITS,)  # columns a worker's batch carries on to the loss terms
SHUFFLE_BATCHES = 4  # each worker shuffles within a buffer of this many of its batches
READ_BATCH = 1024  # rows per batch when the driver reads the eval splits


# --- pure parts (no Ray) ---------------------------------------------------------------------

def row_uniforms(x: np.ndarray, y: np.ndarray, key: int, n: int = 1) -> np.ndarray:
    """(N, n) floats in [0, 1): a pure function of each row's bytes (x as little-endian
    float32, y as int64) and `key` (blake2b keyed by it), independent of the batch the row
    arrives in."""
    if not len(y):
        return np.zeros((0, n))
    xb = np.ascontiguousarray(x, dtype="<f4").reshape(len(x), -1).view(np.uint8)
    yb = np.ascontiguousarray(y, dtype="<i8").reshape(len(y), 1).view(np.uint8)
    rows = np.concatenate([xb, yb], axis=1)
    width, buf, k = rows.shape[1], rows.tobytes(), int(key).to_bytes(8, "little")
    digests = b"".join(hashlib.blake2b(buf[i * width:(i + 1) * width], digest_size=8 * n, key=k).digest()
                       for i in range(len(rows)))
    words = np.frombuffer(digests, dtype="<u8").reshape(len(rows), n)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def split_rows(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float,
               val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(tag, rank) per row: tag TEST with probability `test_fraction`, VAL with
    `val_fraction`, else TRAIN (by `row_uniforms` keyed by `seed`); rank in [0, 1), uniform
    over the train rows, is what `train_fraction` keeps (rank < fraction). With both
    fractions 0 every row trains."""
    u = row_uniforms(x, y, seed)[:, 0]
    held = test_fraction + val_fraction
    tags = np.full(len(u), TRAIN, dtype=np.int8)
    tags[u < held] = VAL
    tags[u < test_fraction] = TEST
    rank = np.clip((u - held) / (1.0 - held), 0.0, None)
    return tags, rank


def noisy_labels(x: np.ndarray, y: np.ndarray, seed: int, noise: float, num_classes: int) -> np.ndarray:
    """`y` with a share `noise` of labels replaced by random classes; which rows and which
    classes are a pure function of the row and `seed` (key 10000 + seed)."""
    if noise <= 0 or not len(y):
        return y
    w = row_uniforms(x, y, 10_000 + seed, 2)
    out = y.copy()
    flip = w[:, 0] < noise
    out[flip] = np.minimum((w[flip, 1] * num_classes).astype(np.int64), num_classes - 1)
    return out


def batch_arrays(batch: dict, where: str, input_shape: Optional[tuple[int, ...]] = None,
                 num_classes: Optional[int] = None) -> Split:
    """A numpy batch of a Dataset as a checked float32/int64 `Split` (DataError naming
    `where`: missing columns, ragged or non-numeric x, rows of another shape than
    `input_shape`, NaN/Inf, labels outside [0, num_classes)). An empty batch is allowed."""
    if "x" not in batch or "y" not in batch:
        raise DataError(f"{where}: rows need columns 'x' and 'y', got {sorted(batch)}")
    x, y = batch["x"], np.asarray(batch["y"])
    if isinstance(x, np.ndarray) and x.dtype == object:
        try:
            x = np.stack([np.asarray(r) for r in x]) if len(x) else np.zeros((0,) + tuple(input_shape or ()))
        except ValueError:
            raise DataError(f"{where}: column x holds arrays of different shapes") from None
    x = np.asarray(x)
    if not len(y):
        shape = tuple(input_shape) if input_shape is not None else tuple(x.shape[1:])
        return Split(np.zeros((0,) + shape, np.float32), np.zeros(0, np.int64))
    s = check_arrays(x, y, where, num_classes)
    if input_shape is not None and tuple(s.x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{where}: rows of shape {tuple(s.x.shape[1:])}, expected {tuple(input_shape)} "
                        f"(the run's input shape: every generation takes the same)")
    return s


@dataclass(frozen=True)
class StreamPlan:
    """What `train_rows` does to each batch of a training stream (picklable: it travels to
    Ray Data's tasks)."""

    where: str  # named in errors
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int  # key of the row hash
    test_fraction: float = 0.0  # held out of training (0 and 0: every row trains)
    val_fraction: float = 0.0
    train_fraction: float = 1.0
    label_noise: float = 0.0
    noise_seed: int = 0


def train_rows(batch: dict, plan: StreamPlan) -> dict:
    """The training rows of one batch: checked, held-out rows and those beyond the
    generation's `train_fraction` dropped, label noise applied; columns x (float32), y (int64)."""
    s = batch_arrays(batch, plan.where, plan.input_shape, plan.num_classes)
    tags, rank = split_rows(s.x, s.y, plan.seed, plan.test_fraction, plan.val_fraction)
    keep = (tags == TRAIN) & (rank < plan.train_fraction)
    x, y = s.x[keep], s.y[keep]
    return {"x": x, "y": noisy_labels(x, y, plan.noise_seed, plan.label_noise, plan.num_classes)}


def eval_rows(batch: dict, where: str, seed: int, test_fraction: float, val_fraction: float) -> dict:
    """The held-out rows of one batch of a pool, with their split tag (column `split`)."""
    s = batch_arrays(batch, where)
    tags, _ = split_rows(s.x, s.y, seed, test_fraction, val_fraction)
    keep = tags != TRAIN
    return {"x": s.x[keep], "y": s.y[keep], "split": tags[keep]}


def collect_splits(batches: Iterable[dict], cap: int, where: str, wanted: tuple[int, ...],
                   tag: Optional[int] = None) -> dict[int, Split]:
    """The first `cap` rows of each split in `wanted` from numpy batches (tagged by their
    `split` column, or all of split `tag`), in order; stops reading once every wanted split
    is full. DataError when rows differ in shape."""
    parts: dict[int, list[Split]] = {t: [] for t in wanted}
    count = dict.fromkeys(wanted, 0)
    shape: Optional[tuple[int, ...]] = None
    for b in batches:
        s = batch_arrays(b, where)
        if not len(s):
            continue
        if shape is None:
            shape = tuple(s.x.shape[1:])
        elif tuple(s.x.shape[1:]) != shape:
            raise DataError(f"{where}: rows of shape {tuple(s.x.shape[1:])} after rows of shape {shape}")
        tags = np.asarray(b["split"]) if tag is None else np.full(len(s), tag)
        for t in wanted:
            room = cap - count[t]
            if room > 0:
                m = np.flatnonzero(tags == t)[:room]
                if len(m):
                    parts[t].append(Split(s.x[m], s.y[m]))
                    count[t] += len(m)
        if all(count[t] >= cap for t in wanted):
            break
    out = {}
    for t in wanted:
        if parts[t]:
            out[t] = Split(np.concatenate([p.x for p in parts[t]]), np.concatenate([p.y for p in parts[t]]))
        else:
            out[t] = Split(np.zeros((0,) + (shape or ()), np.float32), np.zeros(0, np.int64))
    return out


def stream_fingerprint(pool: DataSpec, gen: "GenerationSpec") -> str:
    """metrics.json's `data_fingerprint` of a streamed generation: a hash of what selects its
    rows (the pool's data spec, train_fraction, label_noise and its seed), not of the rows."""
    blob = {"data": pool.model_dump(mode="json", exclude={"cache_dir", "eval_rows"}),
            "train_fraction": gen.train_fraction, "label_noise": gen.label_noise, "noise_seed": gen.train.seed}
    return "spec-" + hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def streams(data: DataSpec, gen: "GenerationSpec") -> bool:
    """Whether generation `gen` trains on a stream: its own `train_data` has source ray, or
    it has none and the run's data has."""
    return (gen.train_data if gen.train_data is not None else data).source == "ray"


def stream_problems(gen: "GenerationSpec") -> list[str]:
    """Why `gen` cannot train on a stream, if it cannot (the settings that need every
    training row in memory)."""
    out = []
    if gen.compat.ensemble is not None:
        out.append(f"{gen.name}: compat.ensemble trains reference models and caches their logits per training "
                   f"row, which a streamed training set (source: ray) does not have; drop compat.ensemble or "
                   f"use an in-memory source")
    return out


def cpu_shortfall(cluster_cpus: float, scaling: "ScalingSpec", old_model: bool) -> Optional[str]:
    """A warning when the Ray cluster leaves Ray Data no CPU beside the training workers:
    the factory's read tasks need 1 and the old model's actor 1 more (a stream then waits
    for CPUs that never come, unless the cluster grows)."""
    need = scaling.num_workers * scaling.cpus_per_worker + 1 + (1 if old_model else 0)
    if cluster_cpus >= need:
        return None
    return (f"the Ray cluster has {cluster_cpus:g} CPUs; the training workers take "
            f"{scaling.num_workers * scaling.cpus_per_worker:g} and the stream needs {need - scaling.num_workers * scaling.cpus_per_worker:g} more "
            f"(read tasks{' and the old model' if old_model else ''}): it waits until they exist; lower "
            f"scaling.cpus_per_worker or add CPUs")


# --- Ray Data -----------------------------------------------------------------------------

def is_ray_dataset(obj: object) -> bool:
    try:
        import ray.data
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, ray.data.Dataset)


@contextmanager
def ray_running():
    """A Ray connection for the duration of the block: the running one, or a local Ray
    started here and shut down afterwards (so a caller that starts Ray later can); Ray
    Data's progress lines for the driver's reads are kept out of the caller's output."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with quiet_ray_data():
        try:
            yield
        finally:
            if started:
                ray.shutdown()


@contextmanager
def quiet_ray_data():
    """Ray Data's INFO lines (one block per dataset executed) off for the block."""
    import ray.data  # noqa: F401  its import configures its loggers: before the level is set

    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


_DATA_ERROR = re.compile(r"workers\.data\.DataError: (.*)")


def data_error_in(e: BaseException) -> Optional[DataError]:
    """The DataError a Ray Data task raised, from the error Ray hands back (it carries the
    task's traceback as text), or None."""
    found = _DATA_ERROR.findall(str(e))
    return DataError(found[-1]) if found else None


@contextmanager
def data_errors():
    """Re-raise a DataError raised inside a Ray Data task as itself (not buried in Ray's
    wrapping of the task's traceback)."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        err = data_error_in(e)
        if err is None:
            raise
        raise err from None


def _in_order(ds: Any) -> Any:
    """`ds`, executed with Ray Data's preserve_order (the eval splits are its first rows)."""
    ds.context.execution_options.preserve_order = True
    return ds


def _read(ds: Any) -> Iterator[dict]:
    return ds.iter_batches(batch_size=READ_BATCH, batch_format="numpy")


def load_eval_dataset(spec: DataSpec) -> Dataset:
    """`workers.data.load_dataset` for `source: ray`: the validation and test splits in
    memory (each at most `spec.eval_rows` rows), an empty train split of the input shape,
    `spec.num_classes` classes. DataError naming the problem."""
    where = f"data.factory {spec.factory}"
    if spec.num_classes is None:
        raise DataError("data.source ray needs data.num_classes: the training rows stream, their labels are not "
                        "scanned up front")
    cap = spec.eval_rows
    got: dict[int, Split] = {}
    with ray_running(), data_errors():
        out = call_data_factory(spec)
        if is_ray_dataset(out):
            wanted = (VAL, TEST) if spec.val_fraction > 0 else (TEST,)
            tagged = _in_order(out).map_batches(
                eval_rows, fn_kwargs={"where": where, "seed": spec.seed, "test_fraction": spec.test_fraction,
                                      "val_fraction": spec.val_fraction}, batch_format="numpy")
            got = collect_splits(_read(tagged), cap, where, wanted)
        elif isinstance(out, dict):
            unknown = sorted(set(out) - {"train", "val", "test"})
            if unknown or "train" not in out or "test" not in out:
                raise DataError(f"{where}: a dict of splits needs keys 'train' and 'test' (and optionally 'val'), "
                                f"got {sorted(out)}")
            if not is_ray_dataset(out["train"]):
                raise DataError(f"{where}: with source ray, split 'train' must be a ray.data.Dataset, got "
                                f"{type(out['train']).__name__} (arrays in memory: use source custom)")
            for name, t in (("val", VAL), ("test", TEST)):
                v = out.get(name)
                if v is None:
                    continue
                if is_ray_dataset(v):
                    got[t] = collect_splits(_read(_in_order(v)), cap, f"{where}: {name}", (t,), tag=t)[t]
                elif isinstance(v, (tuple, list)) and len(v) == 2:
                    got[t] = check_arrays(v[0], v[1], f"{where}: {name}").take(cap)
                else:
                    raise DataError(f"{where}: split {name!r} must be a ray.data.Dataset or a pair (x, y), "
                                    f"got {type(v).__name__}")
        else:
            raise DataError(f"{where}: source ray needs a ray.data.Dataset with columns x and y, or "
                            f"{{'train': Dataset, 'val': Dataset or (x, y), 'test': Dataset or (x, y)}}, "
                            f"got {type(out).__name__}")
    test = got.get(TEST)
    if test is None or not len(test):
        raise DataError(f"{where}: no test rows (data.test_fraction {spec.test_fraction} of the dataset)")
    val = got.get(VAL)
    if val is None or not len(val):
        val = Split(test.x[:0], test.y[:0])
    if val.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"{where}: the splits' rows differ in shape: val {val.x.shape[1:]}, test {test.x.shape[1:]}")
    for name, s in (("val", val), ("test", test)):
        if len(s) and int(s.y.max()) >= spec.num_classes:
            raise DataError(f"data: the {name} split holds class {int(s.y.max())}, outside "
                            f"[0, {spec.num_classes}) (data.num_classes)")
    return Dataset(train=Split(test.x[:0], test.y[:0]), val=val, test=test, num_classes=spec.num_classes)


@dataclass(frozen=True)
class TrainStream:
    """A generation's training rows as a lazy `ray.data.Dataset` (columns x float32, y int64)."""

    dataset: Any
    num_classes: int
    fingerprint: str


def train_stream(data: DataSpec, gen: "GenerationSpec", input_shape: tuple[int, ...],
                 run_classes: int) -> TrainStream:
    """The rows generation `gen` trains on (Ray must be running; nothing is read yet): the
    train share of the run's pool (`data`), or every row of `gen.train_data` (its
    "train" split when the factory returns a dict), checked to have rows of `input_shape`.
    Its classes: `run_classes`, or max(run_classes, train_data.num_classes)."""
    own = gen.train_data
    pool = own if own is not None else data
    where = f"{'generations[].train_data' if own is not None else 'data'}.factory {pool.factory}"
    if own is not None:
        if own.num_classes is None:
            raise DataError(f"{gen.name}: train_data with source ray needs train_data.num_classes (a stream's labels "
                            f"are not scanned up front)")
        classes = max(run_classes, own.num_classes)
    else:
        classes = run_classes
    out = call_data_factory(pool)
    held = (0.0, 0.0)
    if isinstance(out, dict) and "train" in out:
        ds = out["train"]
    else:
        ds = out
        if own is None:
            held = (pool.test_fraction, pool.val_fraction)
    if not is_ray_dataset(ds):
        raise DataError(f"{where}: source ray needs a ray.data.Dataset of training rows, got {type(ds).__name__}")
    plan = StreamPlan(where=where, input_shape=tuple(int(d) for d in input_shape), num_classes=classes,
                      seed=pool.seed, test_fraction=held[0], val_fraction=held[1],
                      train_fraction=gen.train_fraction, label_noise=gen.label_noise, noise_seed=gen.train.seed)
    with quiet_ray_data(), data_errors():  # the first rows, checked here: a bad stream fails before training
        first = ds.take(READ_BATCH)
    if not first:
        raise DataError(f"{where}: the dataset has no rows")
    train_rows({k: _column_of(first, k, where) for k in ("x", "y")},
               replace(plan, test_fraction=0.0, val_fraction=0.0, train_fraction=1.0, label_noise=0.0))
    rows = ds.map_batches(train_rows, fn_kwargs={"plan": plan}, batch_format="numpy")
    return TrainStream(rows, classes, stream_fingerprint(pool, gen))


def _column_of(rows: list[dict], name: str, where: str) -> np.ndarray:
    if any(name not in r for r in rows):
        raise DataError(f"{where}: rows need columns 'x' and 'y', got {sorted(rows[0])}")
    values = [np.asarray(r[name]) for r in rows]
    if len({v.shape for v in values}) > 1:
        raise DataError(f"{where}: column {name} holds arrays of different shapes")
    return np.stack(values)


class OldLogits:
    """Ray Data callable class: loads the production model once per actor (verified by
    sha256, `ConstraintModel.load`) and adds its logits on each batch as column
    `old_logits`."""

    def __init__(self, model_ref: Any):
        import torch

        torch.set_num_threads(1)
        self.model, _ = model_ref.load()
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        from workers.training import predict

        _, logits = predict(self.model, np.ascontiguousarray(batch["x"], dtype=np.float32))
        return {**batch, OLD_LOGITS: logits.astype(np.float32)}


def with_old_logits(rows: Any, model_ref: Any, batch_size: int = READ_BATCH) -> Any:
    """`rows` with column `old_logits`: the model of `model_ref` (a
    `workers.train.ConstraintModel`) run by one Ray Data actor (1 CPU) as batches pass."""
    from ray.data import ActorPoolStrategy

    return rows.map_batches(OldLogits, fn_constructor_args=(model_ref,), batch_size=batch_size,
                            batch_format="numpy", compute=ActorPoolStrategy(size=1), num_cpus=1)


def stream_batches(shard: Any, batch_size: int, *, device: Any = None, seed: int = 0,
                   shuffle_batches: int = SHUFFLE_BATCHES) -> "Iterator[Batch]":
    """A Ray Train worker's batches of `batch_size` rows from its shard
    (`ray.train.get_dataset_shard`), epoch after epoch, without end; the shard's columns
    other than x and y that a loss term reads (`EXTRA_COLUMNS`) ride along in
    `Batch.extras`. Rows are shuffled within a buffer of `shuffle_batches` batches (seeded
    by `seed` and the epoch); the last partial batch of an epoch is dropped, so with
    Ray Train's equal shards every worker gets the same number of batches. DataError when an
    epoch gives no batch at all."""
    from workers.training import Batch

    epoch = 0
    while True:
        got = 0
        kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": True}
        if device is not None:
            kwargs["device"] = device
        if shuffle_batches > 0:
            kwargs.update(local_shuffle_buffer_size=shuffle_batches * batch_size, local_shuffle_seed=seed + epoch)
        with data_errors():
            for b in shard.iter_torch_batches(**kwargs):
                got += 1
                yield Batch(b["x"], b["y"], None, {k: b[k] for k in EXTRA_COLUMNS if k in b})
        if got == 0:
            raise DataError(f"the training stream gave this worker no batch of {batch_size} rows in a whole epoch: "
                            f"fewer training rows than train.batch_size")
        epoch += 1
