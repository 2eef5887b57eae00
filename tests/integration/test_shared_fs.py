"""distributed.shared_fs on the session's local Ray: the check's task runs on the node it names
and reads the driver's file; on one node there is no other node to ask. (A node that does not
see the folder: tests/integration/test_job_submit.py, a worker node with its own mount namespace.)"""

from __future__ import annotations

import pytest

from pivotal_ray.distributed import shared_fs

pytestmark = pytest.mark.integration


def test_a_node_that_sees_the_folder_passes_and_the_file_goes(ray_session, tmp_path):
    import ray

    assert shared_fs.worker_nodes() == []  # one node, the driver's: nothing to ask
    here = ray.get_runtime_context().get_node_id()
    node = [n for n in ray.nodes() if n["NodeID"] == here]  # asked as if it were another node
    assert shared_fs.nodes_not_sharing(tmp_path, node, look_s=0.0) == ([], [])
    assert list(tmp_path.iterdir()) == []
    assert shared_fs.nodes_not_sharing(tmp_path, []) == ([], [])
    with pytest.raises(OSError):  # a folder the driver cannot write in: said, nothing asked
        shared_fs.nodes_not_sharing(tmp_path / "missing", node)


def test_a_node_gone_since_counts_as_no_answer(ray_session, tmp_path):
    """A node listed alive but gone (or being drained) by the time its task is placed: the task
    cannot run there, and the node is reported as not answering, not as a crash of the check."""
    gone = [{"NodeID": "ab" * 28, "NodeManagerAddress": "10.9.9.9", "Alive": True, "Resources": {"CPU": 1.0}}]
    assert shared_fs.nodes_not_sharing(tmp_path, gone, timeout_s=60.0, look_s=0.0) == ([], ["10.9.9.9"])
    assert list(tmp_path.iterdir()) == []
