"""Validate tests/reference_trident.py (and the implementation) against the authors' own ``Trident`` class.

    python benchmarks/validate_trident_reference.py --authors /path/to/YuHengsss/Trident \\
        --dino /path/to/facebookresearch/dino [--photos 2] [--workdir DIR]

A one-off check, not a test: it needs a checkout of the authors' repository (commit a93b346) and
of facebookresearch/dino (for ``vision_transformer.py``, the hub model the authors load). Their
``Trident`` class runs unchanged, in float32 on the CPU (``Tensor.half`` made the identity), in a subprocess (their vendored
``open_clip`` and ``segment_anything`` shadow the installed ones): mmseg, mmengine, openpyxl and
skimage are stubbed with the few names ``trident.py`` imports (none is used without SAM
refinement), ``__init__`` is skipped (it downloads models) and its attributes are set as it sets
them, on the same random weights the tests use (tests/model_factories.py). The COCO-Object
setting (prob_thd 0.25), a logit scale of 400 (on a random model every pixel falls under the
threshold at 40), photos of two shapes from tests/data. Prints, per photo, the largest difference
in logits and class probabilities and the label agreement where the top-2 margin exceeds 1e-4,
for the transcription and for the implementation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = ((229, 171), (157, 233))
LOGIT_SCALE = 400.0
PROB_THD = 0.25

AUTHORS_SIDE = r'''
import sys, types, torch, numpy as np, cv2
authors, dino_dir, work = sys.argv[1:4]
torch.set_grad_enabled(False)
# float32: the class casts its CLIP and DINO inputs with Tensor.half(); make that the identity
# (its models are built here in float32; nothing else in the class is changed).
torch.Tensor.half = lambda self, *args, **kwargs: self
# Stubs for what trident.py imports and does not use without refinement.
def module(name, **attrs):
    m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
class BaseSegmentor(torch.nn.Module):
    def __init__(self, *a, **k): super().__init__()
class Registry:
    def register_module(self, *a, **k): return lambda cls: cls
for name in ("mmseg", "mmseg.models", "mmengine"):
    module(name)
module("mmseg.models.segmentors", BaseSegmentor=BaseSegmentor)
module("mmseg.models.data_preprocessor", SegDataPreProcessor=object)
module("mmseg.registry", MODELS=Registry())
module("mmengine.structures", PixelData=dict)
module("openpyxl"); module("skimage", measure=None)
sys.path[:0] = [authors, dino_dir]
import trident as T
from open_clip import create_model
from segment_anything import sam_model_registry, SamPredictor
from myutils import UnNormalize
from torchvision import transforms
import vision_transformer as dino_vits

state = torch.load(f"{work}/weights.pt", weights_only=True)
model = T.Trident.__new__(T.Trident)
torch.nn.Module.__init__(model)
model.clip = create_model("ViT-B-16-quickgelu", pretrained=None, precision="fp32").eval()
print("clip", model.clip.load_state_dict(torch.load(state["clip"], weights_only=True), strict=False))
model.tokenizer = None
model.clip_stride = 16
model.vfm_model = "dino"
model.vfm = dino_vits.vit_base(patch_size=16, num_classes=0).eval()
print("dino", model.vfm.load_state_dict(torch.load(state["dino"], weights_only=True), strict=True))
model.unnorm = UnNormalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
model.norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
words = state["words"]
model.query_idx = torch.tensor(state["owners"], dtype=torch.int64)
model.num_queries, model.num_classes = len(words), int(max(state["owners"])) + 1
model.dataset_type = "COCODataset"
model.query_features = state["text"]
model.dtype = model.query_features.dtype
model.logit_scale, model.prob_thd = state["logit_scale"], state["prob_thd"]
model.slide_stride, model.slide_crop, model.beta, model.gamma = 224, 336, 1.2, 3.0
model.debug, model.cross_patch_fusion, model.query_words = True, "ave", words
model.sam = sam_model_registry["vit_b"](checkpoint=state["sam"]).eval()
model.cos_fac, model.refine_neg_cos, model.sam_iou_thresh = 1.2, True, 0.8
model.sam_predictor = SamPredictor(model.sam)
model.pamr, model.sam_heads, model.sam_refine, model.kwargs = None, 12, False, {}
out = []
for i, (path, inputs) in enumerate(zip(state["paths"], state["inputs"])):
    h0, w0 = cv2.imread(path).shape[:2]
    logits = model.get_trident_seg(inputs, path, [dict(ori_shape=(h0, w0))])
    pred, probs = model.postprocess_result(logits, None, path)
    out.append((logits[0], probs, pred[0]))
    print("authors photo", i, tuple(logits.shape), flush=True)
torch.save(out, f"{work}/authors.pt")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", required=True, help="checkout of YuHengsss/Trident")
    parser.add_argument("--dino", required=True, help="folder with facebookresearch/dino's vision_transformer.py and utils.py")
    parser.add_argument("--photos", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import cv2
    from model_factories import SAMPLE_IMAGES, make_clip_config, make_trident_config
    from PIL import Image
    from reference_naclip import reference_features, reference_normalise, reference_resize
    from reference_trident import CLIP_MEAN_255, CLIP_STD_255, mmcv_resize, reference_decide, reference_logits

    from clipdiy.segmentation.config import SegmenterConfig
    from clipdiy.segmentation.methods.naclip import query_words
    from clipdiy.segmentation.methods.trident import TridentMethod
    from clipdiy.segmentation.models.clip import create_clip_model
    from clipdiy.segmentation.models.trident_weights import load_sam, load_trident_dino
    from clipdiy.segmentation.segmenter import prepare_input
    from clipdiy.segmentation.vocabulary import load_vocabulary

    work = Path(args.workdir or tempfile.mkdtemp(prefix="trident-validate-"))
    clip_config = make_clip_config(work, arch="ViT-B-16-quickgelu")
    trident = make_trident_config(work, logit_scale=LOGIT_SCALE)
    clip = create_clip_model(clip_config)
    dino, _ = load_trident_dino(trident)
    sam, _ = load_sam(trident)
    vocabulary = load_vocabulary("trident-coco-object")
    words, owners = query_words(vocabulary)
    unique = list(dict.fromkeys(words))
    images = sorted(SAMPLE_IMAGES.glob("*.jpg"))
    with Image.open(images[10]) as image:
        features = reference_features(clip.model.visual, reference_normalise(reference_resize(np.asarray(image.convert("RGB")))))
    flat = features.reshape(-1, features.shape[-1])
    picks = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))[: len(unique)]
    text = flat[picks][[unique.index(w) for w in words]].clone()

    photos, paths, inputs = [], [], []
    for i, (path, size) in enumerate(zip(images[3 : 3 + args.photos], SIZES)):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))
        png = work / f"photo{i}.png"  # lossless: the authors' SAM path re-reads the file
        cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        photos.append(rgb)
        paths.append(str(png))
        tensor = torch.from_numpy(mmcv_resize(rgb)).permute(2, 0, 1)[None].float()
        inputs.append((tensor - torch.tensor(CLIP_MEAN_255).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD_255).view(1, 3, 1, 1))
    torch.save(
        {"clip": clip_config.checkpoint, "dino": trident.dino_checkpoint, "sam": trident.sam_checkpoint, "words": list(words),
         "owners": list(owners), "text": text, "paths": paths, "inputs": inputs, "logit_scale": LOGIT_SCALE, "prob_thd": PROB_THD},
        work / "weights.pt",
    )
    (work / "authors_side.py").write_text(AUTHORS_SIDE)
    subprocess.run([sys.executable, str(work / "authors_side.py"), args.authors, args.dino, str(work)], check=True, cwd=work)
    authors = torch.load(work / "authors.pt", weights_only=True)

    config = SegmenterConfig(method="trident", vocabulary="trident-coco-object", clip=clip_config, trident=trident, refine="none")
    method = TridentMethod(clip, dino, sam, vocabulary, config, text, torch.device("cpu"))
    prepared = [prepare_input(photo, config) for photo in photos]
    implementation = {}
    with torch.inference_mode():
        for indices, forward in method.forward_groups(prepared):
            decision = method.decide(forward.logits, forward)
            for offset, i in enumerate(indices):
                implementation[i] = (forward.logits[offset], decision.probabilities[offset], decision.labels[offset])
    columns = [words.index(u) for u in unique]
    for i, photo in enumerate(photos):
        a_logits, a_probs, a_pred = authors[i]
        normalised = a_probs / a_probs.sum(dim=0, keepdim=True)
        top2 = a_probs.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 1e-4) & ((top2[0] - PROB_THD).abs() > 1e-4)
        with torch.no_grad():
            r_logits = reference_logits(clip.model.visual, dino, sam.image_encoder, photo, text)
        r_probs, r_pred = reference_decide(r_logits, len(vocabulary), PROB_THD, LOGIT_SCALE)
        i_logits, i_probs, i_pred = implementation[i]
        classes = int((torch.bincount(a_pred.flatten(), minlength=len(vocabulary)) > 0).sum())
        print(
            f"photo {i} {photo.shape[1]}x{photo.shape[0]}: authors' labels use {classes} classes, "
            f"{float(decided.float().mean()):.1%} of pixels decided (margin > 1e-4)\n"
            f"  transcription:  logits {float((r_logits - a_logits).abs().max()):.2e}  probabilities "
            f"{float((r_probs - a_probs).abs().max()):.2e}  labels {float((r_pred == a_pred)[decided].float().mean()):.4%} (all pixels {float((r_pred == a_pred).float().mean()):.4%})\n"
            f"  implementation: logits {float((i_logits - a_logits[columns]).abs().max()):.2e}  probabilities "
            f"{float((i_probs - normalised).abs().max()):.2e}  labels {float((i_pred == a_pred)[decided].float().mean()):.4%} (all pixels {float((i_pred == a_pred).float().mean()):.4%})\n"
            f"  implementation vs transcription: logits {float((i_logits - r_logits[columns]).abs().max()):.2e}  probabilities "
            f"{float((i_probs - r_probs / r_probs.sum(dim=0, keepdim=True)).abs().max()):.2e}  labels {float((i_pred == r_pred)[decided].float().mean()):.4%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
