"""``python -m t2t_fast.train``: the same as ``t2t-fast train`` (:mod:`t2t_fast.cli.train`), for launchers
that take a module, e.g. ``torchrun --nproc_per_node=8 -m t2t_fast.train --data DIR``."""
import sys

from t2t_fast.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
