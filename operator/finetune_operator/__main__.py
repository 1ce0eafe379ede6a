"""`python -m finetune_operator crds [--check]` and `python -m finetune_operator run`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_operator")
    sub = parser.add_subparsers(dest="command", required=True)
    crds = sub.add_parser("crds", help="write crds/ from the pydantic models")
    crds.add_argument("--check", action="store_true", help="exit 1, naming the drift, if crds/ is stale")
    crds.add_argument("--out", default=None, help="output folder (default: crds/ of the repository)")
    sub.add_parser("run", help="run the controller")
    args = parser.parse_args(argv)
    if args.command == "crds":
        from finetune_operator.crdgen import main as crds_main

        return crds_main(check=args.check, out=args.out)
    from finetune_operator.runner import main as run_main

    return run_main()


if __name__ == "__main__":
    sys.exit(main())
