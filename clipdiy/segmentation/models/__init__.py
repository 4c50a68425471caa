"""Model wrappers: CLIP (:mod:`clipdiy.segmentation.models.clip`) and saliency backends (:mod:`clipdiy.segmentation.models.saliency`)."""

from clipdiy.segmentation.models.clip import ClipModel, create_clip_model

__all__ = ["ClipModel", "create_clip_model"]
