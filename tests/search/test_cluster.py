"""A search on a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``: a head and
one worker node, 1 CPU each, so that each of the 2 workers runs on its own node). The driver ships
the importance scores through Ray's object store; every actor places them and checks them at
start-up, so a node that cannot see the run folder still searches with the driver's scores."""

from pathlib import Path

import pytest

from evaluators import shipped
from evaluators.shipped import ShippedFileMismatch, sha256_of
from evaluators.workers import RayPool
from search.job import run_search
from search.rundir import IMPORTANCE
from tests.search.test_search import finished, tiny_config

OBJECT_STORE = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_text_dir):
    """The cluster; its worker node has a score cache of its own (another machine's), and both see the
    tiny data (the raylets keep the environment they were started with)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM_PRUNER_DATA", str(tiny_text_dir))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE,
                                                                "include_dashboard": False})
        node_cache = tmp_path_factory.mktemp("node-cache")
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE, env_vars={"LLM_PRUNER_CACHE": str(node_cache)})
    try:
        yield cluster, node_cache
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_search_runs_on_two_nodes_with_the_drivers_scores(two_nodes, tiny_model_dir, tiny_data, tmp_path,
                                                             monkeypatch):
    cluster, node_cache = two_nodes
    sent = []
    put = shipped.ShippedFile.put.__func__

    def put_then_remove(cls, path):  # as on a node that does not see the run folder: only the object store has it
        file = put(cls, path)
        Path(path).unlink()
        sent.append(file)
        return file

    monkeypatch.setattr(shipped.ShippedFile, "put", classmethod(put_then_remove))
    run_dir = tmp_path / "run"
    result = run_search(tiny_config(tiny_model_dir, trials=6), run_dir, workers=2, ray_address=cluster.address,
                        progress=False, final=False)
    assert result.completed == 6 and len(cluster.list_all_nodes()) == 2
    assert len({t.user_attrs["worker"] for t in finished(run_dir)}) == 2  # one worker per node
    assert [f.path for f in sent] == [str(run_dir / IMPORTANCE)]
    assert sha256_of(run_dir / IMPORTANCE) == sent[0].sha256  # placed back by the actors, the driver's bytes
    assert not (node_cache / "importance").exists()  # the worker node read the shipped scores, computed none


class _ReplacesTheFile:
    """An evaluator that replaces the shipped file, as one that computed its own scores would."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self):
        self.path.write_bytes(b"other scores")
        return lambda payload: {"value": 0.0}


@pytest.mark.slow
def test_a_worker_with_other_scores_than_the_driver_stops_the_job_with_one_message(two_nodes, tmp_path):
    cluster, _ = two_nodes
    scores = tmp_path / IMPORTANCE
    scores.write_bytes(b"the driver's scores")
    pool = RayPool(_ReplacesTheFile(scores), 1, address=cluster.address, files=(scores,))
    try:
        pool.submit(0, {"subnet": {}})
        with pytest.raises(ShippedFileMismatch, match="after its evaluator was built.*not the driver's"):
            pytest.fail(f"the job came back: {pool.wait()}")
    finally:
        pool.close()
