"""Run one grid on the Ray cluster this script runs on: the entry script of `ray submit`.

    ray submit infra/aws.yaml infra/sweep.py -- GRID.yaml --storage s3://BUCKET/PREFIX \
        --tracking-uri http://HEAD_IP:5000 [--resume]

`ray submit` copies only this file to the head node and runs it there with python, so it calls the project
installed on every node (infra/Dockerfile, or infra/local.yaml's setup commands): it is `sau run` with the
same arguments. Without --address (or RAY_ADDRESS) it joins the cluster running on this node ("auto") and
fails if there is none, rather than starting a single-node Ray of its own.
"""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    sys.exit(main(["run", *args]))
