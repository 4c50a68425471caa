"""A plain, per-image transcription of Trident (TRIDENT.md; YuHengsss/Trident a93b346), float32.

Used only by the tests to check the batched implementation (clipdiy.segmentation.methods.trident,
clipdiy.segmentation.models.trident); nothing here imports those modules. It follows the
authors' code line by line where it can: ``preprocess_image``, ``get_windowed_imgs``,
``custom_attn``, ``guidance_attn``, ``get_sam_sim``, ``get_sam_feat`` and ``postprocess_result``
are theirs with the fp16 casts left out; DINO's ``prepare_tokens``/``interpolate_pos_encoding`` and
its blocks are written out (explicit softmax attention); SAM's encoder is the segment-anything
package's, whose last block is re-run as the authors' patched ``Attention.forward`` (all 4096
query rows, then cropped); the SAM input goes through the package's own ``ResizeLongestSide``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN_255 = [122.771, 116.746, 104.094]
CLIP_STD_255 = [68.501, 66.632, 70.323]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]


def mmcv_resize(rgb: np.ndarray, scale=(2048, 448)) -> np.ndarray:
    """mmcv Resize(scale, keep_ratio=True) with cv2 INTER_LINEAR."""
    h, w = rgb.shape[:2]
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return cv2.resize(rgb, (int(w * f + 0.5), int(h * f + 0.5)), interpolation=cv2.INTER_LINEAR)


def preprocess_image(image, stride=16, slide_crop=336):
    """seg_utils/utils.py, verbatim."""
    longer_side = max(image.shape[2:])
    h, w = image.shape[2:]
    if h % stride == 0 and w % stride == 0:
        return image
    if longer_side % stride != 0:
        dst_longer = (longer_side // stride + 1) * stride
    else:
        dst_longer = longer_side
    new_h = int(h * dst_longer / longer_side)
    new_w = int(w * dst_longer / longer_side)
    if new_h % stride != 0:
        new_h = (new_h // stride + 1) * stride
    if new_w % stride != 0:
        new_w = (new_w // stride + 1) * stride
    new_h, new_w = max(new_h, slide_crop), max(new_w, slide_crop)
    return torch.nn.functional.interpolate(image, (new_h, new_w), mode="bilinear", align_corners=False)


def get_windowed_imgs(img, stride=224, crop=336, patch_size=16):
    """trident.py ``get_windowed_imgs`` (no padding ever triggers with 336-px windows)."""
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    crops, locs = [], []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            assert y1 % patch_size == 0 and x1 % patch_size == 0 and y2 % patch_size == 0 and x2 % patch_size == 0
            crops.append(img[:, :, y1:y2, x1:x2])
            locs.append((y1 // patch_size, x1 // patch_size, y2 // patch_size, x2 // patch_size))
    return torch.cat(crops, dim=0), locs, (h_grids, w_grids)


def dino_interpolate_pos_encoding(pos_embed, x, w, h, patch=16):
    """facebookresearch/dino ``VisionTransformer.interpolate_pos_encoding``."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch
    h0 = h // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dino_features(dino, imgs):
    """``get_intermediate_layers(x)[0]`` of the hub DINO, written out on timm's modules: B x 768 x g x g."""
    B, _, w, h = imgs.shape
    x = dino.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
    x = torch.cat((dino.cls_token.expand(B, -1, -1), x), dim=1)
    x = x + dino_interpolate_pos_encoding(dino.pos_embed, x, w, h)
    for blk in dino.blocks:
        y = blk.norm1(x)
        n, t, c = y.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(y).reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, t, c)
        x = x + blk.attn.proj(y)
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    feat = dino.norm(x)
    vh, vw = imgs.shape[-2] // 16, imgs.shape[-1] // 16
    return feat[:, 1:, :].reshape(B, vh, vw, -1).permute(0, 3, 1, 2)


def clip_interpolate_pos_encoding(visual, x, w, h):
    """Trident's open_clip ``VisionTransformer.interpolate_pos_encoding``."""
    N = visual.positional_embedding.shape[0] - 1
    class_pos_embed = visual.positional_embedding[[0]]
    patch_pos_embed = visual.positional_embedding[1:]
    dim = x.shape[-1]
    w0, h0 = w // 16 + 0.1, h // 16 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def custom_attn(attn_layer, x, ex_feats, beta=1.2, gamma=3.0, token_size=(21, 21)):
    """Trident's ``custom_attn``, verbatim (x: L x B x D)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    B, C, H, W = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v.reshape(bsz * num_heads, token_size[0], token_size[1], head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, H * W, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def get_sam_sim(sam_v, sam_attn, cos_fac, heads, refine_neg_cos=True):
    """Trident's ``get_sam_sim``, verbatim."""
    sam_v = sam_v.flatten(2, 3)
    sam_v = F.normalize(sam_v, dim=-1)
    sam_sim = torch.einsum("b h m c, b h n c -> b h m n", sam_v, sam_v)
    sim_thresh = cos_fac * sam_sim.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        sim_thresh = torch.where(sim_thresh < 0.0, 0.6, sim_thresh)
    sim_thresh = torch.where(sim_thresh > 0.9, 0.9, sim_thresh)
    refined_sam_attn = torch.where(sam_sim > sim_thresh, sam_attn, torch.zeros_like(sam_attn))
    refined_sam_attn = refined_sam_attn.mean(dim=1)
    similarity = refined_sam_attn / refined_sam_attn.sum(dim=-1, keepdim=True)
    return similarity.unsqueeze(0).repeat(1, heads, 1, 1)


def guidance_attn(attn_layer, x, win_sizes, dst_coords, dst_vh, dst_vw, sam_attn, sam_v, cos_fac, refine_neg_cos, vfm_token_size=(21, 21)):
    """Trident's ``guidance_attn`` (not the Cityscapes branch), verbatim (x: L x B x D)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    win_h, win_w = win_sizes
    v = x.view(-1, bsz, num_heads, head_dim).permute(1, 2, 0, 3).contiguous()
    v = v.permute(2, 0, 1, 3).flatten(2)
    v_img = v.view(vfm_token_size[0], vfm_token_size[1], bsz, embed_dim).permute(2, 3, 0, 1).contiguous()
    ratio = 1
    dst_v = v.new_zeros(1, embed_dim, dst_vh * ratio, dst_vw * ratio)
    count_mat = v.new_zeros(1, 1, dst_vh * ratio, dst_vw * ratio)
    for h_idx in range(win_h):
        for w_idx in range(win_w):
            coord = dst_coords[h_idx * win_w + w_idx]
            raw_v = v_img[h_idx * win_w + w_idx]
            dst_v[0, :, coord[0] : coord[2], coord[1] : coord[3]] += raw_v
            count_mat[:, :, coord[0] : coord[2], coord[1] : coord[3]] += 1
    dst_v = dst_v / count_mat
    dst_v = F.interpolate(dst_v, size=(sam_v.shape[2], sam_v.shape[3]), mode="bilinear", align_corners=False)
    attn_weights = get_sam_sim(sam_v, sam_attn, cos_fac, num_heads, refine_neg_cos)
    dst_v = dst_v.view(1, num_heads, head_dim, -1).permute(0, 1, 3, 2).contiguous()
    attn_output = torch.matmul(attn_weights, dst_v)
    return attn_output.permute(2, 0, 1, 3).flatten(2).contiguous()


def sam_encoder_last(encoder, x):
    """The authors' patched ``ImageEncoderViT.forward``: last_attn (B*heads x 4096 x 4096) and
    last_v (B x heads x 64 x 64 x d) of the last block (global), its ``Attention.forward`` written
    out, and the encoder's output (the neck, ``predictor.features``)."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for blk in encoder.blocks[:-1]:
        x = blk(x)
    blk = encoder.blocks[-1]
    a = blk.attn
    y = blk.norm1(x)
    B, H, W, _ = y.shape
    qkv = a.qkv(y).reshape(B, H * W, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * a.num_heads, H * W, -1).unbind(0)
    attn = (q * a.scale) @ k.transpose(-2, -1)
    if a.use_rel_pos:
        attn = add_decomposed_rel_pos(attn, q, a.rel_pos_h, a.rel_pos_w, (H, W), (H, W))
    attn = attn.softmax(dim=-1)
    out = (attn @ v).view(B, a.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    x = x + a.proj(out)
    x = x + blk.mlp(blk.norm2(x))
    features = encoder.neck(x.permute(0, 3, 1, 2))
    return attn, v.view(B, a.num_heads, H, W, -1), features


def get_sam_feat(encoder, tmp_img):
    """``SamPredictor.set_image`` + Trident's ``get_sam_feat``: (sam_attn 1 x 12 x N x N, sam_v, hs,
    ws, and the predictor's state: features, input_size, original_size)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    input_image = ResizeLongestSide(1024).apply_image(tmp_img)
    t = torch.as_tensor(input_image).permute(2, 0, 1).contiguous()[None, :, :, :].float()
    input_size = t.shape[-2:]
    t = (t - torch.tensor(SAM_MEAN).view(-1, 1, 1)) / torch.tensor(SAM_STD).view(-1, 1, 1)
    t = F.pad(t, (0, 1024 - t.shape[-1], 0, 1024 - t.shape[-2]))
    last_attn, last_v, features = sam_encoder_last(encoder, t)
    hs, ws = int(input_size[0] // 16), int(input_size[1] // 16)
    heads = last_v.shape[1]
    sam_attn = last_attn.view(1, heads, 64, 64, 64, 64)[:, :, :hs, :ws, :hs, :ws].flatten(2, 3).flatten(3, 4)
    sam_v = last_v[:, :, :hs, :ws, :]
    state = {"features": features, "input_size": tuple(input_size), "original_size": tuple(tmp_img.shape[:2])}
    return sam_attn, sam_v, hs, ws, state


@torch.no_grad()
def reference_logits(visual, dino, sam_encoder, rgb: np.ndarray, query_features: torch.Tensor, stride=224, cos_fac=1.2,
                     refine_neg_cos=True, short_side=448, beta=1.2, gamma=3.0, return_sam_state=False):
    """``get_trident_seg`` for one H0 x W0 x 3 uint8 RGB photo: Q x H0 x W0 float32 logits (and,
    with ``return_sam_state``, the SAM predictor's state the refinement reads)."""
    h0, w0 = rgb.shape[:2]
    # Path B: SAM re-reads the original, stretches it to multiples of 16.
    tmp_h, tmp_w = h0, w0
    if tmp_h % 16 != 0:
        tmp_h = (tmp_h // 16 + 1) * 16
    if tmp_w % 16 != 0:
        tmp_w = (tmp_w // 16 + 1) * 16
    tmp_img = cv2.resize(rgb, (tmp_w, tmp_h))
    sam_attn, sam_v, hs, ws, sam_state = get_sam_feat(sam_encoder, tmp_img)
    # Path A: mmseg's resize and normalisation.
    resized = mmcv_resize(rgb, (2048, short_side))
    inputs = torch.from_numpy(resized).permute(2, 0, 1)[None].float()
    inputs = (inputs - torch.tensor(CLIP_MEAN_255).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD_255).view(1, 3, 1, 1)
    processed = preprocess_image(inputs, 16, 336)
    feat_h, feat_w = processed.shape[-2] // 16, processed.shape[-1] // 16
    img_batch, patch_locs, win_sizes = get_windowed_imgs(processed, stride)
    imgs_norm = []
    for i in range(len(img_batch)):
        t = img_batch[i].clone()
        for c, (m, s) in enumerate(zip(CLIP_MEAN, CLIP_STD)):
            t[c].mul_(s).add_(m)
        imgs_norm.append((t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))
    vfm_feats = dino_features(dino, torch.stack(imgs_norm))
    # CLIP encode_image with Trident's VisionTransformer.forward.
    B, nc, w, h = img_batch.shape
    x = visual.conv1(img_batch).reshape(B, visual.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(B, 1, -1), x], dim=1)
    x = x + clip_interpolate_pos_encoding(visual, x, w, h)
    x = visual.ln_pre(x)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)  # open_clip's blocks are batch-first here; the authors' run L x B x D
    x = x.permute(1, 0, 2)[1:]  # LND, class token removed
    blk = visual.transformer.resblocks[-1]
    x = custom_attn(blk.attn, blk.ln_1(x), vfm_feats, beta, gamma, (h // 16, w // 16))
    x = guidance_attn(blk.attn, x, win_sizes, patch_locs, feat_h, feat_w, sam_attn, sam_v, cos_fac, refine_neg_cos)
    x = x.permute(1, 0, 2)
    x = visual.ln_post(x) @ visual.proj
    clip_features = x / x.norm(dim=-1, keepdim=True)
    logits = clip_features @ query_features.T
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], hs, ws)
    logits = F.interpolate(logits, size=(h0, w0), mode="bilinear")[0].float()
    return (logits, sam_state) if return_sam_state else logits


def reference_decide(logits: torch.Tensor, num_classes: int, prob_thd: float, logit_scale: float = 40.0):
    """``postprocess_result``: (C x H x W class probabilities, H x W labels)."""
    seg_logits = (logits * logit_scale).softmax(0)
    if num_classes != seg_logits.shape[0]:
        seg_fg = seg_logits[-num_classes + 1 :]
        seg_bg = seg_logits[: -num_classes + 1].max(0)[0]
        seg_logits = torch.cat([seg_bg.unsqueeze(0), seg_fg], dim=0)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_logits, seg_pred[0]


# --- SAM refinement: seg_utils/utils.py ``sam_refinement`` and its helpers, verbatim but for
# skimage's ``measure.label`` (scipy's, 8-connectivity: the same components) and the predictor,
# segment-anything's own ``SamPredictor`` given the state ``get_sam_feat`` computed.


def _label_8(mask):
    from scipy import ndimage

    labeled, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    return labeled


def split_connected_regions(segmentation: np.ndarray, seg_logits, split_last=False, minimal_area=0, coarse_thresh=0.0):
    from torchvision.ops import masks_to_boxes

    C, H, W = segmentation.shape
    regions, boxes, clip_box_score, points = {}, {}, {}, {}
    for c in range(C):
        if not split_last and c == C - 1:
            continue
        regions[c], points[c], clip_box_score[c], boxes[c] = [], [], [], []
        class_mask = segmentation[c]
        class_logit = seg_logits[c]
        if class_logit.max() < coarse_thresh:
            continue
        labeled_mask = _label_8(class_mask)
        num_regions = labeled_mask.max()
        for region_label in range(1, num_regions + 1):
            region_mask = (labeled_mask == region_label).astype(np.uint8)
            if region_mask.sum() < minimal_area:
                continue
            region_score = class_logit[region_mask.astype(bool)].mean()
            region_logit = class_logit * torch.tensor(region_mask).to(class_logit.device)
            max_pos = torch.argmax(region_logit)
            max_h, max_w = max_pos // class_logit.size(1), max_pos % class_logit.size(1)
            points[c].append(torch.tensor([max_w, max_h]))
            regions[c].append(region_mask)
            clip_box_score[c].append(region_score)
        if len(regions[c]):
            regions[c] = torch.from_numpy(np.stack(regions[c]))
        if regions[c] == []:
            boxes[c] = regions[c]
        else:
            boxes[c] = masks_to_boxes(regions[c])
    return regions, boxes, clip_box_score, points


def map_refinement_coarse(refined_masks, refined_logits, coarse_boxes, seg_logits, img_shape):
    refined_whole_logits = torch.zeros([len(coarse_boxes), img_shape[0], img_shape[1]], device=refined_masks.device)
    cumsum = 0
    for i in range(len(coarse_boxes)):
        if coarse_boxes[i] == []:
            continue
        tmp_cls_num = coarse_boxes[i].shape[0]
        tmp_cls_mask = refined_masks[cumsum : cumsum + tmp_cls_num, 0].sum(dim=0).bool()
        tmp_cls_logit = (refined_logits[cumsum : cumsum + tmp_cls_num, 0] * seg_logits[i]).max(dim=0)
        refined_whole_logits[i] = tmp_cls_logit.values * tmp_cls_mask
        cumsum += tmp_cls_num
    refined_whole_masks = refined_whole_logits.argmax(0, keepdim=True)
    return refined_whole_masks, refined_whole_logits


def map_failed_regions(refined_masks, refined_logits, failed_regions, seg_logits, segmentation):
    failed_area = failed_regions.sum(dim=0, keepdim=True) != 0
    failed_logit = failed_area * seg_logits
    refined_logits = torch.where(failed_logit > refined_logits, failed_logit, refined_logits)
    refined_masks = torch.where(failed_logit.max(dim=0, keepdim=True)[0] > refined_logits.max(dim=0, keepdim=True)[0], segmentation, refined_masks)
    return refined_masks, refined_logits


def make_predictor(sam, state):
    """segment-anything's ``SamPredictor`` holding the image ``get_sam_feat`` encoded."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.features = state["features"]
    predictor.input_size = state["input_size"]
    predictor.original_size = state["original_size"]
    predictor.is_image_set = True
    return predictor


def sam_refinement(img, segmentations, seg_logits, num_classes, predictor, coarse_thresh=0.0, minimal_area=0, sam_mask_coff=0.005, sam_iou_thresh=0.9):
    """img: the H0 x W0 x 3 photo; segmentations: 1 x H0 x W0 labels; seg_logits: C x H0 x W0."""
    down_ratio = 2
    dh, dw = seg_logits.shape[-2] // down_ratio, seg_logits.shape[-1] // down_ratio
    segmentations_down = F.interpolate(segmentations.unsqueeze(0).half(), [dh, dw], mode="nearest").squeeze(0).long()
    seg_logits_down = F.interpolate(seg_logits.unsqueeze(0), [dh, dw], mode="bilinear", align_corners=False).squeeze(0)
    if coarse_thresh > 0:
        segmentations_down[seg_logits_down.max(0, keepdim=True)[0] < coarse_thresh] = num_classes
        cls_pred = F.one_hot(segmentations_down.squeeze(0).long(), num_classes=num_classes + 1).permute(2, 0, 1).float()
        split_last = False
    else:
        cls_pred = F.one_hot(segmentations_down.squeeze(0).long(), num_classes=num_classes).permute(2, 0, 1).float()
        split_last = True
    coarse_regions, coarse_boxes, coarse_boxes_score, coarse_points = split_connected_regions(
        cls_pred.cpu().numpy(), seg_logits_down, split_last=split_last, minimal_area=minimal_area, coarse_thresh=coarse_thresh)
    combined_boxes, combined_points = [], []
    cls_wise_masks, cls_wise_scores, cls_wise_logits = [], [], []
    failed_regions = []
    predictor.features = predictor.features.float()
    for i in range(num_classes):
        tmp_r = coarse_regions.get(i, [])
        tmp_b = coarse_boxes.get(i, [])
        tmp_p = coarse_points.get(i, [])
        if tmp_r == []:
            continue
        cls_wise_r = seg_logits_down[i].unsqueeze(0)
        new_h, new_w = predictor.transform.get_preprocess_shape(img.shape[0], img.shape[1], 256)
        cls_wise_r = F.interpolate(cls_wise_r.unsqueeze(0), [new_h, new_w], mode="bilinear", align_corners=False).squeeze(0)
        cls_wise_r = F.pad(cls_wise_r, (0, 256 - new_w, 0, 256 - new_h), mode="constant", value=0)
        cls_wise_r = torch.where(cls_wise_r > coarse_thresh, sam_mask_coff * cls_wise_r, torch.tensor(0.0).type_as(segmentations)).float()
        cls_wise_b = predictor.transform.apply_boxes_torch(tmp_b.type_as(segmentations), [dh, dw]).float()
        cls_wise_p = torch.stack(tmp_p).type_as(segmentations)
        cls_wise_p = predictor.transform.apply_coords_torch(cls_wise_p, [dh, dw]).unsqueeze(1)
        cls_wise_mask, cls_wise_score, cls_wise_logit = predictor.predict_torch(
            point_coords=cls_wise_p.float(),
            point_labels=torch.ones([cls_wise_p.shape[0], 1]).type_as(segmentations).float(),
            boxes=cls_wise_b,
            mask_input=cls_wise_r,
            multimask_output=False,
        )
        valid_masks = (cls_wise_score > sam_iou_thresh).squeeze(-1)
        if valid_masks.sum() != tmp_r.shape[0]:
            failed_regions.append(tmp_r[~valid_masks.cpu()])
        if valid_masks.sum() == 0:
            coarse_boxes[i] = []
            continue
        cls_wise_masks.append(cls_wise_mask[valid_masks])
        cls_wise_scores.append(cls_wise_score[valid_masks])
        cls_wise_logits.append(cls_wise_logit[valid_masks])
        tmp_p = torch.stack(tmp_p)
        tmp_b = tmp_b[valid_masks.cpu()]
        tmp_p = tmp_p[valid_masks.cpu()]
        coarse_boxes[i] = coarse_boxes[i][valid_masks.cpu()]
        combined_boxes.append(tmp_b)
        combined_points.append(tmp_p)
    if len(combined_boxes) == 0:
        return segmentations, None, seg_logits, combined_boxes
    combined_boxes = torch.cat(combined_boxes, dim=0)
    masks, scores, logits = torch.cat(cls_wise_masks, dim=0), torch.cat(cls_wise_scores, dim=0), torch.cat(cls_wise_logits, dim=0)
    logits = predictor.model.postprocess_masks(logits, predictor.input_size, predictor.original_size)
    combined_boxes = combined_boxes * down_ratio
    if logits.shape[-1] != img.shape[1] or logits.shape[-2] != img.shape[0]:
        logits = F.interpolate(logits, img.shape[:2], mode="bilinear", align_corners=False)
        masks = logits > predictor.model.mask_threshold
    refined_masks, refined_logits = map_refinement_coarse(masks, logits.sigmoid(), coarse_boxes, seg_logits, img.shape)
    refined_masks = torch.where(refined_logits.sum(dim=0, keepdim=True) == 0, segmentations, refined_masks)
    if len(failed_regions):
        failed_regions = torch.cat(failed_regions, dim=0)
        failed_regions = F.interpolate(failed_regions.unsqueeze(0).float(), img.shape[:2], mode="nearest").squeeze(0).type_as(segmentations)
        refined_masks, refined_logits = map_failed_regions(refined_masks, refined_logits, failed_regions, seg_logits, segmentations)
    return refined_masks, scores, refined_logits, combined_boxes


@torch.no_grad()
def reference_refine(sam, sam_state, rgb, seg_logits, seg_pred, num_classes, coarse_thresh, minimal_area=225, sam_mask_coff=0.005, sam_iou_thresh=0.80):
    """``postprocess_result``'s refinement step for one photo: (C x H0 x W0 refined scores, H0 x W0 labels,
    the number of SAM masks kept (0: nothing refined))."""
    predictor = make_predictor(sam, sam_state)
    refined_masks, scores, refined_logits, _ = sam_refinement(
        rgb, seg_pred[None], seg_logits, num_classes, predictor, coarse_thresh, minimal_area, sam_mask_coff, sam_iou_thresh)
    return refined_logits, refined_masks[0], 0 if scores is None else int(scores.shape[0])
