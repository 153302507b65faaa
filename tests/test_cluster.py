"""A sweep on a two-node Ray cluster (both nodes on this machine), joined by address."""

import json

import ray
from ray.cluster_utils import Cluster

from orchestrator.spec import load_grid
from orchestrator.sweep import run_sweep

WORKER_IP = "127.0.0.2"  # a second loopback address, so that Tune's node_ip tells the nodes apart


def test_trials_run_on_the_node_that_has_their_resources(write_grid, tmp_path):
    # The grid's resources name CPUs and GPUs only, so the worker is told apart by size: only it has 2 CPUs.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, node_ip_address=WORKER_IP)
        cluster.wait_for_nodes()
        grid = load_grid(write_grid(name="cluster", sau={"eps": [0.1, 0.2]}, resources={"cpu": 2, "gpu": 0}))
        storage = tmp_path / "sweep"
        lines = []
        df = run_sweep(grid, storage=storage, resume=False, address=cluster.address, tracking_uri=None,
                       out=lines.append)
        assert lines[0] == f"joined the Ray cluster at {cluster.address} (2 nodes)"  # says which one
        assert not ray.is_initialized()  # run_sweep left the cluster it joined
    finally:
        cluster.shutdown()
    assert len(df) == 2
    results = [json.loads(p.read_text().splitlines()[-1]) for p in (storage / "tune").glob("*/*/result.json")]
    assert sorted(r["trial"] for r in results) == sorted(df["trial_id"])
    assert {r["node_ip"] for r in results} == {WORKER_IP}
