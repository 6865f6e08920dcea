"""Average the parameters of the last k checkpoints into ``<workdir>/averaged``.

  python -m transformer_jax.training.average --workdir runs/wmt14 --last 5

The result is a params-only checkpoint at the newest averaged step; read it with
``load_params(workdir, averaged=True)`` (or ``load_params(f"{workdir}/averaged")``). The work
is ``transformer_jax.checkpoints.average_into_workdir``; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys

from transformer_jax.checkpoints import average_into_workdir

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training work directory")
    parser.add_argument("--last", type=int, default=5, help="number of checkpoints to average")
    args = parser.parse_args(argv)
    try:
        out, steps = average_into_workdir(args.workdir, args.last)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"averaged steps {steps} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
