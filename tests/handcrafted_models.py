"""Handcrafted stand-ins for CLIP and saliency whose right answers are known (see test_known_answer)."""

from __future__ import annotations

import torch

GREY = (128, 128, 128)
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220), "yellow": (235, 225, 30)}
CLASS_NAMES = ["background", *COLOURS]


def _embed_colour(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 colours in [0, 1] -> N x 4 unit vectors: the colour's offset from grey, plus a constant
    axis that only the background text shares (so background scores stay positive)."""
    offset = rgb - 0.5
    vector = torch.cat([offset, torch.full_like(offset[:, :1], 0.1)], dim=1)
    return torch.nn.functional.normalize(vector, dim=1)


class MeanColourClip(torch.nn.Module):
    """A CLIP stand-in: crops are embedded by their mean colour, words by the colour they name."""

    model_name = "mean-colour"
    weights_id = "handcrafted"
    image_size = 224
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self):
        super().__init__()
        self.forwards = 0

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x 224 x 224 normalised -> B x 4."""
        self.forwards += 1
        assert pixels.shape[1:] == (3, 224, 224)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        rgb = (pixels * std + mean).mean(dim=(2, 3))
        return _embed_colour(rgb)

    def encode_text(self, texts) -> torch.Tensor:
        """N prompts "a photo of a <colour>" -> N x 4."""
        out = []
        for text in texts:
            word = text.split()[-1]
            if word == "background":
                out.append(torch.tensor([0.0, 0.0, 0.0, 1.0]))
            else:
                rgb = torch.tensor(COLOURS[word], dtype=torch.float32) / 255.0
                out.append(_embed_colour(rgb[None])[0])
        return torch.stack(out)


class NotGreySaliency(torch.nn.Module):
    """Foreground = pixels that differ from the grey background. B x 3 x H x W -> B x 1 x H x W."""

    name = "not-grey"
    weights_id = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = torch.tensor(GREY, device=images.device).view(1, 3, 1, 1) / 255.0
        distance = (images - grey).abs().amax(dim=1, keepdim=True)
        return (distance > 0.1).float()
