"""Text -> image training objective for the model-agnostic Trainer (run / CLI wiring: not yet).

``GenerateTask(model).training_step(batch)`` takes a pairs batch (``images`` uint8 (B, H, W, 3),
``input_ids`` / ``attention_mask`` of one caption per image, as ``vlpt.data.pairs.PairBatches`` serves)
and returns the diffusion noise-prediction loss.
"""

from __future__ import annotations

import torch

from vlpt.models.generator import TextToImageGenerator


class GenerateTask:
    """Denoising diffusion with condition dropout (classifier-free guidance) on a text -> image generator."""

    def __init__(self, model: TextToImageGenerator, seed: int = 0):
        self.model = model
        # Noise, timesteps and condition dropout come from this stream; the Trainer saves its state in
        # checkpoints, so a resumed run draws the same noise as an uninterrupted one.
        self.generator = torch.Generator().manual_seed(seed)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = self.model.training_loss(batch["images"], batch["input_ids"], batch["attention_mask"],
                                        self.generator)
        return {"loss": loss, "diffusion_loss": loss.detach()}
