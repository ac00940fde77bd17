"""Command line: ``python -m pipeline pretrain --config configs/tiny.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="run a recipe end to end on this machine")
    pretrain.add_argument("--config", default="configs/tiny.yaml")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pipeline.pretrain import pretrain as run_pretrain

    run_pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
