"""The labelling job on a two-node Ray cluster (``ray.cluster_utils.Cluster``): the driver on a
head node that offers no CPUs, so every decode task, inference actor and write task runs on
the other node and the listing blocks, models' text embeddings and results cross nodes."""

from __future__ import annotations

import pytest
from pipeline_support import (
    check_rows_match_library,
    job_config,
    read_all_rows,
    reference_label_maps,
    segmenter_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_labelling_on_two_nodes(two_node_cluster, coco_images, tiny_clip_config, tmp_path):
    import ray

    from clipdiy.pipeline.control.run import run_labelling

    _, worker = two_node_cluster
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2
    assert ray.cluster_resources()["CPU"] == 2  # all of them on the worker node

    photos = coco_images[:4]
    images = tmp_path / "images"
    images.mkdir()
    for path in photos:
        (images / path.name).write_bytes(path.read_bytes())
    segmenter = segmenter_config(tiny_clip_config)
    summary = run_labelling(job_config(images, tmp_path / "labels", segmenter, rows_per_file=2))
    assert (summary.listed, summary.seen, summary.ok, summary.error) == (4, 4, 4, 0)

    rows = read_all_rows(tmp_path / "labels").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(p.name for p in photos)
    reference, library = reference_label_maps(segmenter, photos)
    check_rows_match_library(rows, reference, library)
    # The cluster is still whole: the work did not run by losing a node.
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert worker.remaining_processes_alive()
