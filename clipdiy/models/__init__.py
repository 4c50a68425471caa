"""Model wrappers: CLIP (:mod:`clipdiy.models.clip`) and saliency backends (:mod:`clipdiy.models.saliency`)."""

from clipdiy.models.clip import ClipModel, create_clip_model

__all__ = ["ClipModel", "create_clip_model"]
