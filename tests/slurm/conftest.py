"""`slurm_cluster`: a real single-node Slurm for the session (installed with apt-get if missing);
`slurm_two_nodes`: a two-node one (each slurmd in its own network namespace) for one test module.

Tests that use them are marked `slurm`; where no cluster can be started (no apt, not root) they are
skipped with the reason (or fail, with DLM_REQUIRE_SLURM=1 as CI sets it where Slurm is installed).
Where Slurm works but network namespaces cannot be made (no `ip`, no CAP_NET_ADMIN in a container) the
two-node tests are skipped even under DLM_REQUIRE_SLURM=1, with a reason that says so loudly.
SLURM_CONF is exported while a cluster is in use: every Slurm client needs it."""

import os

import local_cluster
import pytest


def _start(nodes: int):
    try:
        return local_cluster.start(nodes=nodes)
    except local_cluster.NamespacesUnavailable as e:
        pytest.skip(f"TWO-NODE SLURM TESTS NOT RUN: network namespaces could not be made here ({e}); "
                    "multi-node launch is untested on this machine")
    except local_cluster.ClusterUnavailable as e:
        if os.environ.get("DLM_REQUIRE_SLURM") == "1":  # .ci/run sets it where the packages are installed
            pytest.fail(f"DLM_REQUIRE_SLURM=1 but no Slurm cluster could be started: {e}")
        pytest.skip(f"no Slurm cluster could be started here: {e}")


def _use(cluster):
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    yield from _use(_start(1))


@pytest.fixture(scope="module")
def slurm_two_nodes():
    """Two slurmd (dlmnode1, dlmnode2, one CPU each) in their own network namespaces, one slurmctld on this
    host; SLURM_CONF points at it for the module (restored after, for the single-node tests)."""
    yield from _use(_start(2))


# Shared by the single- and two-node tests (built once a session: the reference run is the slow part).
@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The tiny quickstart task's shards, as the tests' training jobs read them."""
    from test_slurm_launch import QUICKSTART, TINY

    from data_pipeline.build import ensure_shards
    from pretrain.config import load_config

    path = tmp_path_factory.mktemp("shards") / "sudoku"
    cfg = load_config(QUICKSTART, [*TINY, f"data.shard_dir={path}"])
    ensure_shards(cfg.data, progress=False)
    return path


@pytest.fixture(scope="session")
def reference(shards, tmp_path_factory):
    """The same 2-rank run, uninterrupted, with the local launcher: what every Slurm training job must match."""
    from test_slurm_launch import TINY, launch, run_dir_of

    cwd = tmp_path_factory.mktemp("local")
    r = launch(cwd, *TINY, f"data.shard_dir={shards}", "tracking.enabled=false")
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir_of(cwd)
