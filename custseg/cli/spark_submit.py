"""The spark-submit entry: ``spark-submit [options] custseg/cli/spark_submit.py INPUT --out OUTPUT [...]``.

spark-submit runs a .py file; this one takes the arguments of `custseg score` and adds ``--engine spark``.
"""

import sys

from custseg.cli import main


def run() -> None:
    sys.argv = ["custseg", "score", *sys.argv[1:], "--engine", "spark"]
    main()


if __name__ == "__main__":
    run()
