"""A worker node lost mid-run (``ray.cluster_utils.Cluster.remove_node``): the job completes on
the node that replaces it, and every image is there exactly once.

The driver's head node offers no CPUs; two workers run the job until the inference actor
reaches a given image, where it waits (``fault_injection``'s ``hang``); then the actor's node is
removed with all its processes and objects, and the other worker finishes the job.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from fault_injection import runtime_env, set_fault
from pipeline_support import job_config, read_all_rows, segmenter_config

pytestmark = pytest.mark.slow


def test_a_worker_node_removed_mid_run_loses_no_image(coco_images, tiny_clip_config, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = sorted(p.name for p in coco_images[:8])
    for path in coco_images[:8]:
        shutil.copy(path, corpus / path.name)
    spec, marker = tmp_path / "fault.json", tmp_path / "hang"
    set_fault(spec, "hang", names[5], marker)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    removed: list[str] = []
    try:
        # Two workers (nodes are added from the main thread: Ray's node start sets signal handlers).
        workers = {n.node_id: n for n in (cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2))}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env(spec))

        def remove_the_actors_node() -> None:
            deadline = time.monotonic() + 120
            node_file = marker.with_name(marker.name + ".node")
            while not node_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if node_file.exists():
                node_id = node_file.read_text()
                cluster.remove_node(workers[node_id])
                removed.append(node_id)

        remover = threading.Thread(target=remove_the_actors_node, daemon=True)
        remover.start()
        summary = run_labelling(job_config(corpus, tmp_path / "labels", segmenter_config(tiny_clip_config),
                                           rows_per_file=2))
        remover.join(timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert len(removed) == 1 and removed[0] in workers, "the inference actor's node was removed mid-run"
    assert (summary.seen, summary.ok, summary.error) == (8, 8, 0)
    ids = read_all_rows(tmp_path / "labels").column("image_id").to_pylist()
    assert sorted(ids) == names, "every image exactly once"
