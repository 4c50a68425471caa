"""Drive a running Label Studio through label-studio-sdk: run by the Label Studio virtual
environment's Python (the SDK is not in the project's environment), from tests/test_review.py.

    python label_studio_driver.py URL EMAIL PASSWORD WORKDIR

WORKDIR holds ``tasks.json`` and ``tasks.xml`` (from ``jobs/review.py export``) and ``edit.json``
(``{"image_id", "class_name", "mask": "<file>.npy"}``: the one mask to change). The driver logs in,
gets a personal access token (the token flow the SDK documents: legacy tokens are off), creates
a project with the config, imports the tasks with their predictions, reads every prediction back
and decodes its masks with the SDK's own ``decode_rle`` into ``predictions.npz`` (key
``image_id|class_name``) and ``predictions.json`` (model versions and scores), submits an
annotation equal to the prediction but for the edited mask (encoded with the SDK's
``encode_rle``), and writes the project's JSON export to ``export.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import requests
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle, encode_rle


def personal_access_token(url: str, email: str, password: str) -> str:
    """Log in as a browser does, then create the user's personal access token (``/api/token/``)."""
    session = requests.Session()
    session.get(f"{url}/user/login/", timeout=60).raise_for_status()
    response = session.post(f"{url}/user/login/", timeout=60, headers={"Referer": f"{url}/user/login/"},
                            data={"email": email, "password": password,
                                  "csrfmiddlewaretoken": session.cookies.get("csrftoken")})
    response.raise_for_status()
    response = session.post(f"{url}/api/token/", timeout=60,
                            headers={"X-CSRFToken": session.cookies.get("csrftoken"), "Referer": f"{url}/"})
    response.raise_for_status()
    return response.json()["token"]


def main(url: str, email: str, password: str, workdir: str) -> int:
    work = Path(workdir)
    client = LabelStudio(base_url=url, api_key=personal_access_token(url, email, password))
    project = client.projects.create(title="clipdiy review", label_config=(work / "tasks.xml").read_text())
    tasks = json.loads((work / "tasks.json").read_text())
    client.projects.import_tasks(id=project.id, request=tasks)

    masks, described, by_image = {}, {}, {}
    for task in client.tasks.list(project=project.id):
        predictions = client.predictions.list(task=task.id)
        image_id = task.data["image_id"]
        by_image[image_id] = (task, predictions)
        described[image_id] = [{"model_version": p.model_version, "score": p.score,
                                "results": [{"class_name": r["value"]["brushlabels"][0], "score": r.get("score")}
                                            for r in p.result]} for p in predictions]
        for prediction in predictions:
            for result in prediction.result:
                height, width = result["original_height"], result["original_width"]
                alpha = np.reshape(decode_rle(result["value"]["rle"]), (height, width, 4))[:, :, 3]
                masks[f"{image_id}|{result['value']['brushlabels'][0]}"] = alpha > 0
    np.savez(work / "predictions.npz", **masks)
    (work / "predictions.json").write_text(json.dumps(described))

    edit = json.loads((work / "edit.json").read_text())
    task, predictions = by_image[edit["image_id"]]
    changed = np.load(work / edit["mask"])
    result = []
    for item in predictions[0].result:
        item = {k: v for k, v in item.items() if k not in ("score", "origin")}
        if item["value"]["brushlabels"][0] == edit["class_name"]:
            rgba = np.repeat(changed.astype(np.uint8).ravel() * 255, 4)
            item["value"] = {**item["value"], "rle": encode_rle(rgba)}
        result.append(item)
    client.annotations.create(id=task.id, result=result, was_cancelled=False, ground_truth=False)

    export = b"".join(client.projects.exports.download_sync(project.id, export_type="JSON", download_all_tasks=True))
    (work / "export.json").write_bytes(export)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
