"""A worker node lost mid-run (``ray.cluster_utils.Cluster.remove_node``): the job completes on
the node that replaces it, and every image is there exactly once.

The driver's head node offers no CPUs; worker A runs everything until its inference actor
reaches a given image, where it waits (``fault_injection``'s ``hang``); then worker B joins (as
an autoscaler would replace a lost node) and A is removed with all its processes and objects.
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

    from clipdiy.pipeline.run import run_labelling

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
        node_a = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env(spec))

        def replace_node_a() -> None:
            deadline = time.monotonic() + 300
            node_file = marker.with_name(marker.name + ".node")
            while not node_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if node_file.exists():
                removed.append(node_file.read_text())
                cluster.add_node(num_cpus=2)
                cluster.remove_node(node_a)

        remover = threading.Thread(target=replace_node_a, daemon=True)
        remover.start()
        summary = run_labelling(job_config(corpus, tmp_path / "labels", segmenter_config(tiny_clip_config),
                                           rows_per_file=2))
        remover.join(timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert removed == [node_a.node_id], "the inference actor was on worker A, which was removed mid-run"
    assert (summary.seen, summary.ok, summary.error) == (8, 8, 0)
    ids = read_all_rows(tmp_path / "labels").column("image_id").to_pylist()
    assert sorted(ids) == names, "every image exactly once"
