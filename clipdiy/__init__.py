"""clipdiy: open-vocabulary pseudo-labelling with CLIP-DIY (WACV 2024), on Ray."""

__version__ = "0.1.0"
