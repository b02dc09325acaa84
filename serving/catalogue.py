"""The retrieval catalogue on disk: named items, their vectors in a faiss index, a manifest.

One owner of the format (the builder in `orchestrator.catalogue` writes through it, the
router reads through it). A catalogue is a directory:

  manifest.json      {"format", "version", "index_file", "index_sha256", "items_file",
                      "items_sha256", "dim", "count", "index": IndexSpec, "generations":
                      [names, in the order they first embedded items], "counts": {name: n},
                      "updated"}
  index.<v>.faiss    the vectors (`serving.index`), faiss id = the item's row in items
  items.<v>.npz      arrays `ids` (unicode item ids), `labels` (int64, -1 when unknown),
                     `generation` (int16, a position in manifest.generations: whose space
                     the item's vector is in), `how` (int8: 0 embedded when added, 1
                     transformed from an older generation's vector, 2 re-embedded by a
                     backfill)

Every change writes a new version's index and items files, then replaces the manifest
atomically: a reader (a router replica on any node that mounts the directory) sees the
old version or the new one, never a mix, and checks both files' sha256 before faiss or
numpy parse a byte. Writers take an exclusive lock on `.lock`; the previous version's
files are kept for readers still loading them, older ones removed.

Items are embedded once: the gallery generation embeds the first items, later ones are
embedded by whichever generation is production when they are added (BCT keeps old and
new vectors comparable). Two operations change stored vectors, each on request and
recorded in the manifest's `history`: a transformation of stored vectors into a newer
generation's space (no raw item needed) and a partial backfill (a share of the items
re-embedded from their inputs).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from serving import index as faiss_index
from serving.index import IndexSpec, RetrievalIndexError

FORMAT = "graceful-catalogue/1"
MANIFEST = "manifest.json"
MAX_ID_CHARS = 256
HOW = ("embedded", "transformed", "reembedded")  # items.npz `how` codes


class CatalogueError(ValueError):
    """A catalogue that cannot be read or changed: missing, or bad items."""


class CatalogueIntegrityError(CatalogueError):
    """A catalogue file missing or changed since its manifest recorded it."""


def catalogue_path(uri: str | Path) -> Path:
    """A local directory from a path or a `file://` URI (the only kinds readable here:
    in a cluster, a volume every replica mounts)."""
    s = str(uri)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if "://" in s:
        raise CatalogueError(f"catalogue {s!r}: only local paths and file:// URIs are supported "
                             f"(mount the storage on every node)")
    return Path(s)


def item_ids(raw: Sequence) -> np.ndarray:
    """Item ids as a unicode array: strings or integers, each 1 to 256 characters, unique.
    CatalogueError naming the first bad one."""
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, (bool, float)) or not isinstance(v, (str, int, np.integer, np.str_)):
            raise CatalogueError(f"item id #{i}: a string or an integer, got {type(v).__name__}")
        s = str(v)
        if not 1 <= len(s) <= MAX_ID_CHARS or not s.isprintable():
            raise CatalogueError(f"item id #{i}: 1 to {MAX_ID_CHARS} printable characters, got {s[:40]!r}")
        out.append(s)
    ids = np.array(out, dtype=str) if out else np.zeros(0, dtype="<U1")
    if len(np.unique(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(s for s in out if s in seen or seen.add(s))  # type: ignore[func-returns-value]
        raise CatalogueError(f"item id {dup!r} appears more than once")
    return ids


@dataclass
class Catalogue:
    """One version of a catalogue, loaded and verified."""

    path: Path
    manifest: dict
    index: object  # a faiss index
    ids: np.ndarray  # (n,) str
    labels: np.ndarray  # (n,) int64, -1 unknown
    generation: np.ndarray  # (n,) int16 into manifest["generations"]
    how: np.ndarray  # (n,) int8 into HOW

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def generations(self) -> list[str]:
        return list(self.manifest["generations"])

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]], list[list[int]]]:
        """(cosine scores (n, k'), item ids, labels) best first, k' = min(k, items)."""
        k = min(int(k), len(self))
        scores, rows = faiss_index.search(self.index, queries, k)
        ids = [[str(self.ids[r]) if r >= 0 else "" for r in row] for row in rows]
        labels = [[int(self.labels[r]) if r >= 0 else -1 for r in row] for row in rows]
        return scores, ids, labels


def read_manifest(path: str | Path) -> Optional[dict]:
    """The manifest, or None when there is no catalogue at `path`."""
    f = catalogue_path(path) / MANIFEST
    try:
        with open(f) as fh:
            m = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CatalogueError(f"{f}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CatalogueError(f"{f}: not a {FORMAT} manifest")
    return m


def load_catalogue(path: str | Path) -> Catalogue:
    """The current version at `path`, both files verified against the manifest's sha256."""
    d = catalogue_path(path)
    m = read_manifest(d)
    if m is None:
        raise CatalogueError(f"no catalogue at {d} (build it: graceful catalogue build CONFIG)")
    try:
        for key in ("index", "items"):  # both verified before faiss or numpy parse a byte
            f = d / m[f"{key}_file"]
            if not f.is_file():
                raise CatalogueIntegrityError(f"{f}: missing (the manifest names it)")
            if faiss_index.sha256_file(f) != m[f"{key}_sha256"]:
                raise CatalogueIntegrityError(f"{f} changed since the manifest recorded it (sha256 mismatch)")
        index = faiss_index.load(d / m["index_file"])
        faiss_index.set_search_params(index, IndexSpec.model_validate(m["index"]))
        with np.load(d / m["items_file"], allow_pickle=False) as f:
            ids, labels, gen = f["ids"], f["labels"].astype(np.int64), f["generation"].astype(np.int16)
            how = f["how"].astype(np.int8) if "how" in f else np.zeros(len(ids), np.int8)
    except RetrievalIndexError as e:
        raise CatalogueError(str(e)) from None
    except (KeyError, OSError, ValueError) as e:
        if isinstance(e, CatalogueError):
            raise
        raise CatalogueError(f"{d}: unreadable catalogue ({type(e).__name__}: {e})") from None
    if not (len(ids) == len(labels) == len(gen) == index.ntotal == m["count"]):
        raise CatalogueError(f"{d}: {len(ids)} items, {index.ntotal} vectors, manifest says {m['count']}")
    return Catalogue(d, m, index, ids, labels, gen, how)


@contextmanager
def _locked(d: Path) -> Iterator[None]:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_rows(vectors: np.ndarray, ids: np.ndarray, labels: Optional[np.ndarray]) -> np.ndarray:
    v = np.asarray(vectors)
    if v.ndim != 2 or len(v) != len(ids) or len(v) == 0:
        raise CatalogueError(f"need (n, dim) vectors for the n = {len(ids)} items, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise CatalogueError("item vectors contain NaN or infinity")
    if labels is None:
        return np.full(len(ids), -1, np.int64)
    lab = np.asarray(labels)
    if lab.shape != (len(ids),) or lab.dtype.kind not in "iu":
        raise CatalogueError(f"labels: (n,) integers for the {len(ids)} items, got {lab.dtype} {lab.shape}")
    return lab.astype(np.int64)


def _write_version(d: Path, m: dict, index, ids: np.ndarray, labels: np.ndarray, gen: np.ndarray,
                   how: np.ndarray) -> dict:
    v = int(m["version"])
    index_file, items_file = f"index.{v}.faiss", f"items.{v}.npz"
    m = {**m, "index_file": index_file, "items_file": items_file, "dim": int(index.d), "count": int(index.ntotal),
         "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    m["index_sha256"] = faiss_index.save(index, d / index_file)
    tmp = d / f".{items_file}.tmp{os.getpid()}.npz"
    np.savez(tmp, ids=ids, labels=labels, generation=gen, how=how)
    os.replace(tmp, d / items_file)
    m["items_sha256"] = faiss_index.sha256_file(d / items_file)
    tmp = d / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
    os.replace(tmp, d / MANIFEST)  # the switch: readers see this version from here on
    for f in d.iterdir():  # keep this version and the previous one (readers mid-load)
        parts = f.name.split(".")
        if len(parts) == 3 and parts[0] in ("index", "items") and parts[1].isdigit() and int(parts[1]) < v - 1:
            f.unlink(missing_ok=True)
    return m


def create_catalogue(path: str | Path, spec: IndexSpec, generation: str, vectors: np.ndarray, ids: Sequence,
                     labels: Optional[np.ndarray] = None, seed: int = 0) -> dict:
    """A new catalogue at `path` (refused if one is there): `generation`'s vectors of the
    items. Returns the manifest."""
    d = catalogue_path(path)
    ids_ = item_ids(ids)
    lab = _check_rows(vectors, ids_, labels)
    with _locked(d):
        if read_manifest(d) is not None:
            raise CatalogueError(f"a catalogue exists at {d}; add items to it, or remove the directory to rebuild")
        try:
            index = faiss_index.build(spec, vectors, np.arange(len(ids_)), seed=seed)
        except RetrievalIndexError as e:
            raise CatalogueError(f"catalogue index: {e}") from None
        m = {"format": FORMAT, "version": 1, "index": spec.model_dump(mode="json"), "generations": [generation],
             "counts": {generation: len(ids_)}, "history": [{"op": "build", "generation": generation,
                                                              "items": len(ids_)}]}
        return _write_version(d, m, index, ids_, lab, np.zeros(len(ids_), np.int16), np.zeros(len(ids_), np.int8))


def refuse_present(cat: Catalogue, ids: np.ndarray) -> None:
    """CatalogueError naming the first of `ids` already in `cat` (an add would change nothing)."""
    dup = np.intersect1d(cat.ids, ids)
    if len(dup):
        raise CatalogueError(f"item ids already in the catalogue: {dup[:5].tolist()}"
                             f"{' ...' if len(dup) > 5 else ''}")


def add_items(path: str | Path, generation: str, vectors: np.ndarray, ids: Sequence,
              labels: Optional[np.ndarray] = None) -> dict:
    """Append items embedded by `generation` to the catalogue at `path`, without touching
    the vectors already in it. An id already present, or vectors of another size, are
    refused and nothing changes. Returns the new manifest."""
    d = catalogue_path(path)
    new_ids = item_ids(ids)
    lab = _check_rows(vectors, new_ids, labels)
    with _locked(d):
        cat = load_catalogue(d)
        if np.asarray(vectors).shape[1] != cat.dim:
            raise CatalogueError(f"{generation} embeds into {np.asarray(vectors).shape[1]} dimensions, the catalogue "
                                 f"at {d} holds {cat.dim}")
        refuse_present(cat, new_ids)
        gens = cat.generations
        if generation not in gens:
            gens.append(generation)
        faiss_index.add(cat.index, vectors, np.arange(len(cat), len(cat) + len(new_ids)))
        counts = dict(cat.manifest["counts"])
        counts[generation] = counts.get(generation, 0) + len(new_ids)
        m = {**cat.manifest, "version": cat.version + 1, "generations": gens, "counts": counts,
             "history": [*cat.manifest.get("history", []), {"op": "add", "generation": generation,
                                                            "items": len(new_ids)}]}
        return _write_version(d, m, cat.index, np.concatenate([cat.ids, new_ids]), np.concatenate([cat.labels, lab]),
                              np.concatenate([cat.generation, np.full(len(new_ids), gens.index(generation), np.int16)]),
                              np.concatenate([cat.how, np.zeros(len(new_ids), np.int8)]))


def replace_vectors(path: str | Path, rows: np.ndarray, vectors: np.ndarray, generation: str, how: str,
                    note: Optional[dict] = None, expect_version: Optional[int] = None) -> dict:
    """Replace the vectors of items at `rows` (positions) by `vectors`, now in
    `generation`'s space (`how`: "transformed" or "reembedded"); the index is rebuilt with
    its spec from every vector (an ivfpq catalogue's untouched vectors are its quantised
    ones). `expect_version`: refuse (nothing changes) when the catalogue moved on since the
    caller read it. Returns the new manifest, its history noting `note`."""
    d = catalogue_path(path)
    if how not in HOW[1:]:
        raise CatalogueError(f"how: one of {HOW[1:]}, got {how!r}")
    rows = np.asarray(rows, dtype=np.int64)
    with _locked(d):
        cat = load_catalogue(d)
        if expect_version is not None and cat.version != expect_version:
            raise CatalogueError(f"the catalogue at {d} changed (version {cat.version}, expected {expect_version}); "
                                 f"run again")
        v = np.asarray(vectors)
        if v.ndim != 2 or len(v) != len(rows) or (len(rows) and (rows.min() < 0 or rows.max() >= len(cat))):
            raise CatalogueError(f"need one vector per row among {len(cat)} items, got {v.shape} for {len(rows)} rows")
        if not np.isfinite(v).all():
            raise CatalogueError("replacement vectors contain NaN or infinity")
        if len(np.unique(rows)) != len(rows):
            raise CatalogueError("rows repeat")
        all_v = faiss_index.vectors_of(cat.index)
        if v.shape[1] != all_v.shape[1]:
            # A new size is only possible when every vector moves (all rows, one generation).
            if len(rows) != len(cat):
                raise CatalogueError(f"{generation} embeds into {v.shape[1]} dimensions, the catalogue holds "
                                     f"{all_v.shape[1]}: only a replacement of every vector can change the size")
            all_v = np.zeros((len(cat), v.shape[1]), np.float32)
        all_v[rows] = faiss_index.normalized(v)
        spec = IndexSpec.model_validate(cat.manifest["index"])
        try:
            index = faiss_index.build(spec, all_v, np.arange(len(cat)))
        except RetrievalIndexError as e:
            raise CatalogueError(f"catalogue index: {e}") from None
        gens = cat.generations
        if generation not in gens:
            gens.append(generation)
        gen_arr, how_arr = cat.generation.copy(), cat.how.copy()
        gen_arr[rows] = gens.index(generation)
        how_arr[rows] = HOW.index(how)
        counts = {g: int((gen_arr == i).sum()) for i, g in enumerate(gens) if (gen_arr == i).any()}
        m = {**cat.manifest, "version": cat.version + 1, "generations": gens, "counts": counts,
             "history": [*cat.manifest.get("history", []), {"op": how, "generation": generation,
                                                            "items": int(len(rows)), **(note or {})}]}
        return _write_version(d, m, index, cat.ids, cat.labels, gen_arr, how_arr)
