"""`graceful catalogue build|add|show CONFIG`: the retrieval catalogue the router searches.

build  embed `retrieval.catalogue`'s items once with the gallery generation (Ray Data
       batch inference, `retrieval.embed_workers` actors) into the index at
       `retrieval.path`; nothing happens when it exists already.
add    embed the items of an .npz (arrays ids, x, optionally y) with the registry's
       production and append them; no stored vector changes. A running router picks the
       new version up within `serving.catalogue_refresh_s`.
transform  map every stored vector not in production's space (or --to GEN's) into it
       with a transformation fitted on the training pool (`retrieval.transform`); no raw
       item is read.
backfill   re-embed `--share` of the items (of `retrieval.catalogue`) with production,
       most uncertain first (`retrieval.backfill_order`, or `--order`).
show   the manifest: version, items, whose space how many vectors are in, the history.

Exit 0; 1 when the catalogue or a checkpoint fails verification; 2 for a bad config,
bad items (an id already present, vectors of another size, NaN), or no catalogue (show).
`add` refuses a tampered catalogue and ids already in it before it starts Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, UsageError, add_config_arg, add_json_arg, emit, load_or_exit


def _log(args: argparse.Namespace):
    return None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))


def _summary(m: dict) -> str:
    counts = ", ".join(f"{g}: {n}" for g, n in m["counts"].items())
    last = (m.get("history") or [{}])[-1]
    return (f"catalogue version {m['version']}: {m['count']} items of {m['dim']} dimensions in a "
            f"{m['index']['type']} index (vectors in each generation's space: {counts}); last change: "
            f"{last.get('op', '?')} of {last.get('items', '?')} items by {last.get('generation', '?')}")


def _with_ray(args: argparse.Namespace, fn, precheck=None) -> int:
    """Run `fn(cfg, reg)` with the registry open and Ray started (or joined at RAY_ADDRESS),
    after `precheck(cfg)`: what can be refused without a cluster is refused first."""
    import ray

    from orchestrator.apps import NotTrained, ServeRequestError
    from orchestrator.config import init_ray
    from orchestrator.registry import IntegrityError, open_registry
    from serving.catalogue import CatalogueError, CatalogueIntegrityError
    from workers.data import DataError
    from workers.factory import FactoryError

    cfg = load_or_exit(args.config)
    reg = open_registry(cfg)
    try:
        if precheck is not None:
            precheck(cfg)
        init_ray(cfg, address=os.environ.get("RAY_ADDRESS"))
        m = fn(cfg, reg)
    except (DataError, FactoryError, ServeRequestError) as e:
        raise UsageError(str(e)) from None
    except CatalogueError as e:
        if not isinstance(e, CatalogueIntegrityError):
            raise UsageError(str(e)) from None
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (NotTrained, IntegrityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        reg.close()
        if ray.is_initialized():
            ray.shutdown()
    emit({**m, "path": str(cfg.catalogue_dir)}, args.json, _summary)
    return EXIT_OK


def _cmd_build(args: argparse.Namespace) -> int:
    from orchestrator.apps import build_catalogue
    from serving.catalogue import read_manifest

    return _with_ray(args, lambda cfg, reg: read_manifest(build_catalogue(cfg, reg, _log(args))))


def _cmd_add(args: argparse.Namespace) -> int:
    from orchestrator.apps import build_catalogue, generation_ref, production_name
    from orchestrator.catalogue import add_to_catalogue
    from workers.data import DataError
    from workers.embedding import load_items_file

    path = Path(args.items)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        items = load_items_file(path)
    except DataError as e:
        raise UsageError(str(e)) from None

    def precheck(cfg):
        """A tampered catalogue or ids already in it: refused before Ray starts."""
        from serving.catalogue import item_ids, load_catalogue, read_manifest, refuse_present

        if read_manifest(cfg.catalogue_dir) is not None:
            refuse_present(load_catalogue(cfg.catalogue_dir), item_ids(items.ids))

    def add(cfg, reg):
        build_catalogue(cfg, reg, _log(args))
        prod = generation_ref(cfg, reg, production_name(cfg, reg))
        return add_to_catalogue(cfg, reg, items, prod, _log(args), actor=args.actor)

    return _with_ray(args, add, precheck)


def _target(cfg, reg, to):
    from orchestrator.apps import generation_ref, production_name

    return generation_ref(cfg, reg, to or production_name(cfg, reg))


def _cmd_transform(args: argparse.Namespace) -> int:
    from orchestrator.apps import generation_ref
    from orchestrator.catalogue import transform_catalogue

    return _with_ray(args, lambda cfg, reg: transform_catalogue(
        cfg, reg, _target(cfg, reg, args.to), lambda g: generation_ref(cfg, reg, g), _log(args), actor=args.actor))


def _cmd_backfill(args: argparse.Namespace) -> int:
    from orchestrator.apps import generation_ref
    from orchestrator.catalogue import backfill_catalogue

    if not 0 < args.share <= 1:
        raise UsageError(f"--share: a fraction in (0, 1], got {args.share}")
    return _with_ray(args, lambda cfg, reg: backfill_catalogue(
        cfg, reg, _target(cfg, reg, args.to), args.share, lambda g: generation_ref(cfg, reg, g), args.order,
        _log(args), actor=args.actor))


def _cmd_show(args: argparse.Namespace) -> int:
    from serving.catalogue import CatalogueError, read_manifest

    cfg = load_or_exit(args.config)
    try:
        m = read_manifest(cfg.catalogue_dir)
    except CatalogueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if m is None:
        raise UsageError(f"no catalogue at {cfg.catalogue_dir} (graceful catalogue build {args.config})")
    emit({**m, "path": str(cfg.catalogue_dir)}, args.json, _summary)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("catalogue", help="the retrieval catalogue: build it once, add items, show it")
    cat_sub = p.add_subparsers(dest="catalogue_command", required=True, metavar="ACTION")

    def action(name: str, func, help: str, actor: bool = True) -> argparse.ArgumentParser:
        x = cat_sub.add_parser(name, help=help)
        add_config_arg(x)
        if actor:
            x.add_argument("--actor", default=os.environ.get("USER", "operator"), help="who (audit log)")
        add_json_arg(x)
        x.set_defaults(func=func)
        return x

    action("build", _cmd_build, "embed retrieval.catalogue's items with the gallery generation (once)", actor=False)
    a = action("add", _cmd_add, "embed new items with production and append them (no re-embedding)")
    a.add_argument("items", help=".npz with arrays ids (strings or integers), x (n, *input_shape), optionally y")
    t = action("transform", _cmd_transform, "map stored vectors into production's space (no item re-embedded)")
    t.add_argument("--to", help="the generation whose space (default: the registry's production)")
    f = action("backfill", _cmd_backfill, "re-embed a share of the items with production, most uncertain first")
    f.add_argument("--share", type=float, required=True, help="fraction of all items to re-embed, e.g. 0.1")
    f.add_argument("--order", choices=["uncertainty", "random"], help="default: retrieval.backfill_order")
    f.add_argument("--to", help="the generation that re-embeds (default: the registry's production)")
    action("show", _cmd_show, "the catalogue's manifest", actor=False)
