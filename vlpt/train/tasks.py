"""Training objectives. Each task's ``training_step(batch)`` returns ``{"loss": ..., **parts}``, so the
trainer never knows which objective it runs."""

from __future__ import annotations

import torch
from torch import nn

from vlpt.losses import check_pairwise_options, get_loss, get_siglip_loss


class ContrastiveTask:
    """Image-text contrastive pre-training with InfoNCE, SigLIP or the pairwise matching loss."""

    def __init__(self, model: nn.Module, loss: str = "infonce", rank: int = 0, world_size: int = 1,
                 seed: int = 0, local_loss: bool = False, siglip_exchange: str = "gather",
                 pairwise_negatives: str = "random", num_negatives: int = 1):
        self.loss_fn = get_loss(loss)  # fails early, listing the choices
        # gather (all-gather texts) | neighbour (ring exchange); checked for every loss, so a typo
        # fails early even when the loss is not SigLIP.
        siglip_fn = get_siglip_loss(siglip_exchange)
        if loss == "siglip":
            self.loss_fn = siglip_fn
        self.siglip_exchange = siglip_exchange
        check_pairwise_options(pairwise_negatives, num_negatives)  # random | hard, >= 1; any loss, like the above
        self.pairwise_negatives, self.num_negatives = pairwise_negatives, num_negatives
        self.loss = loss
        self.model = model
        self.rank, self.world_size = rank, world_size
        self.local_loss = local_loss
        self.generator = torch.Generator().manual_seed(seed)  # negatives for the pairwise loss
        core = getattr(model, "module", model)
        if loss in ("siglip", "pairwise") and core.logit_bias is None:
            raise ValueError(f"the {loss} loss needs a logit bias: set model.init_logit_bias (SigLIP uses -10)")

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss = self.loss_from_features(out["image_features"], out["text_features"], out["logit_scale"],
                                       out["logit_bias"])
        return {"loss": loss, "logit_scale": out["logit_scale"].detach()}

    def loss_from_features(self, image_features: torch.Tensor, text_features: torch.Tensor,
                           logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
        """The loss over already-computed features (what GradCache calls on the cached batch)."""
        args = dict(image_features=image_features, text_features=text_features, logit_scale=logit_scale)
        if self.loss == "infonce":
            return self.loss_fn(**args, rank=self.rank, world_size=self.world_size, local_loss=self.local_loss)
        if self.loss == "siglip":
            return self.loss_fn(**args, logit_bias=logit_bias, rank=self.rank, world_size=self.world_size)
        return self.loss_fn(**args, logit_bias=logit_bias, num_negatives=self.num_negatives,
                            negatives=self.pairwise_negatives, generator=self.generator, rank=self.rank,
                            world_size=self.world_size)
