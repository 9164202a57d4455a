"""``python -m t2t_fast.info``: the same as ``t2t-fast info`` (:mod:`t2t_fast.cli.info`)."""
import sys

from t2t_fast.cli.info import main

if __name__ == "__main__":
    sys.exit(main())
