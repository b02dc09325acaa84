"""`graceful train CONFIG [--generation NAME]`: train the next (or the named) generation."""

from __future__ import annotations

import argparse

from orchestrator.chain import ChainError, embed_dim_problems, next_untrained, train_generation, trained_with_this_config
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, UsageError, add_config_arg, add_json_arg, emit, load_or_exit
from orchestrator.registry import RegistryError, open_registry


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    name = args.generation or next_untrained(cfg)
    if name is None:
        print(f"every generation of {args.config} is trained already "
              f"({', '.join(g.name for g in cfg.generations)}); name one with --generation to retrain")
        return EXIT_OK
    try:
        cfg.generation(name)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    try:
        with open_registry(cfg) as reg:
            problems = embed_dim_problems(cfg, reg, name)
            done = trained_with_this_config(cfg, name, reg)
    except (ChainError, RegistryError) as e:
        print(f"error: {e}")
        return EXIT_FAILED
    if problems:
        raise UsageError(f"{args.config}: " + "; ".join(problems))
    if done is not None and not args.force:
        emit(done, args.json, lambda m: f"{name} is trained already with this config "
                                        f"(test_acc {m.get('test_accuracy', float('nan')):.4f}); --force retrains")
        return EXIT_OK
    try:
        result = train_generation(cfg, name, log=(lambda s: None) if args.json else print, fresh=args.force)
    except (ChainError, RegistryError) as e:
        print(f"error: {e}")
        return EXIT_FAILED
    emit(result.metrics, args.json, lambda m: f"trained {name}: test accuracy {m['test_accuracy']:.4f}, "
                                              f"{m['train_seconds']:.1f}s")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the next (or the named) generation on Ray Train")
    add_config_arg(p)
    p.add_argument("--generation", help="generation to train (default: the first untrained one)")
    p.add_argument("--force", action="store_true", help="retrain from scratch, even if trained or interrupted with this config")
    add_json_arg(p)
    p.set_defaults(func=_cmd_train)
