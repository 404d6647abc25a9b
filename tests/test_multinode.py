"""Placement by node labels on Ray's own multi-node test cluster (several raylets, one machine)."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.local import ClusterResourceError, check_placement
from orchestrator.job import run_job
from specs import parse_spec
from test_job_ray import check_pruned_checkpoints, quick_digits_spec

ROLE = "stillhouse-role"


def _spec(teacher: dict | None = None, **resources):
    spec = quick_digits_spec("multinode", "multinode")
    if teacher:
        spec["teacher"] = teacher
    spec["wandb"]["mode"] = "disabled"
    spec["resources"].update(teacher_labels={ROLE: "teacher"}, student_labels={ROLE: "student"},
                             placement_timeout_s=30, **resources)
    return parse_spec(spec)


def _node(node_id, cpus, role, alive=True):
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus},
            "Labels": {ROLE: role}}


def test_placement_check_counts_only_labelled_live_nodes():
    spec = _spec()  # 2 replicas x 0.5 on teacher nodes, 2 workers x 0.5 on student nodes
    check_placement(spec, [_node("a", 1, "teacher"), _node("b", 1, "student")])
    with pytest.raises(ClusterResourceError, match="student workers need 1 CPUs"):
        check_placement(spec, [_node("a", 1, "teacher"), _node("b", 1, "student", alive=False)])
    with pytest.raises(ClusterResourceError, match="teacher replicas"):
        check_placement(spec, [_node("a", 2, "student"), _node("b", 2, "student")])


@pytest.mark.ray
def test_teacher_and_students_run_on_their_labelled_nodes(tmp_path, digits_teacher):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    teacher_node = cluster.add_node(num_cpus=1, labels={ROLE: "teacher"})
    student_node = cluster.add_node(num_cpus=1, labels={ROLE: "student"})
    try:
        cluster.wait_for_nodes()
        report = run_job(_spec(digits_teacher), run_dir=str(tmp_path / "run"),
                         address=cluster.address)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    placement = report["placement"]
    assert placement["teacher_nodes"] == [teacher_node.node_id] * 2
    assert placement["student_nodes"] == [student_node.node_id] * 2
    check_pruned_checkpoints(tmp_path / "run", rounds=1)
    assert report["final"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
