"""Text -> image: a pixel-space denoising diffusion model conditioned on vlpt's text tower.

    prompt -> tokenizer -> text_tower.forward_features -> tokens (B, L, C) -> context_proj -> (B, L, X)
    x_t (B, 3, H, W), t -> UNet2DConditionModel (cross-attention to the context) -> predicted noise (B, 3, H, W)

Training (DDPM, Ho et al. 2020): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with a random t,
loss = MSE(eps_theta(x_t, t, c), eps). Condition dropout (Ho & Salimans 2022) replaces c with a learned
unconditional embedding with probability ``condition_dropout``, so one network learns both
eps(x_t, c) and eps(x_t, null). Sampling (DDIM, Song et al. 2021) uses classifier-free guidance:

    eps = eps_uncond + g * (eps_cond - eps_uncond)      g = 0: unconditional, g = 1: conditional only

DDIM's ``eta`` sets how much fresh noise each step adds: 0 is deterministic given the initial noise, 1 is
ancestral (DDPM-like) sampling. Either way the seed fixes the images. ``guidance_interval`` (lo, hi) applies
the guidance only at noise levels t / T in [lo, hi] and the conditional prediction alone elsewhere
(Kynkaanniemi et al. 2024): strong guidance at the noisiest steps overshoots colours and places, while at
the middle and low noise levels it sharpens the details that tell shapes apart.

``GeneratorConfig.prediction_type: v_prediction`` (the default) trains the UNet on v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0
instead (Salimans & Ho 2022; the same guidance formula applies to v); on tiny models it learns colors far
faster than epsilon, whose x_0 estimate is ill-conditioned at high noise.

The building blocks (UNet, schedulers) are ``diffusers``'; the text tower is a vlpt dual encoder's,
frozen (``GeneratorConfig.freeze_text``) or trained jointly. Images are uint8 (B, H, W, 3) outside the
model and [-1, 1] floats (B, 3, H, W) inside.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from tqdm.auto import tqdm

from vlpt.config import PREDICTION_TYPES, GeneratorConfig, SamplingConfig, from_dict, to_dict
from vlpt.io import atomic_write_text
from vlpt.models.dual_encoder import BuiltOnEncoder, DualEncoder, find_model_dir

__all__ = ["GeneratorConfig", "SamplingConfig", "TextToImageGenerator", "check_guidance_interval", "check_sampling",
           "classifier_free_guidance", "load_generator"]

MODEL_TYPE = "vlpt-generator"  # config.json's "model_type": tells a generator folder from a dual encoder's
SAMPLING_NAME = "sampling.json"  # a generator folder's default sampling settings (SamplingConfig)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float
                             ) -> torch.Tensor:
    """eps = eps_uncond + g * (eps_cond - eps_uncond): g = 0 unconditional, g = 1 conditional, g > 1 sharper."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def check_guidance_interval(interval: Sequence[float], name: str = "guidance_interval") -> tuple[float, float]:
    """``(lo, hi)`` as floats with 0 <= lo <= hi <= 1, else a ValueError that names the option ``name``."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers lo, hi in [0, 1], got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi <= 1 (fractions of the noise schedule: 0 clean, "
                         f"1 pure noise), got ({lo:g}, {hi:g})")
    return lo, hi


def build_unet(config: GeneratorConfig) -> UNet2DConditionModel:
    levels = len(config.block_channels)
    if len(config.attention_levels) != levels:
        raise ValueError(f"attention_levels has {len(config.attention_levels)} entries but block_channels "
                         f"has {levels}; give one per UNet level")
    if config.image_size < 1 or config.image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size must be a positive multiple of {2 ** (levels - 1)} for a {levels}-level "
                         f"UNet, got {config.image_size}")
    bad = [c for c in config.block_channels if c % config.norm_groups]
    if bad:
        raise ValueError(f"norm_groups ({config.norm_groups}) must divide every UNet channel count; "
                         f"it does not divide {bad}")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    pooled = dict(class_embed_type="projection", projection_class_embeddings_input_dim=config.cross_attention_dim) \
        if config.pooled_condition else {}
    return UNet2DConditionModel(
        sample_size=config.image_size, in_channels=input_channels(config), out_channels=3, **pooled,
        block_out_channels=tuple(config.block_channels), layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.heads,  # diffusers' legacy name: it is the number of heads here
        norm_num_groups=config.norm_groups,
    )


def input_channels(config: GeneratorConfig) -> int:
    """The UNet's input: the noisy image, plus x / y maps (coord_channels), plus the prompt map (spatial_condition)."""
    return 3 + 2 * config.coord_channels + (config.spatial_channels if config.spatial_condition > 0 else 0)


def images_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)


def pixels_to_images(pixels: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) on the CPU."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()  # (B, H, W, 3)


def check_sampling(sampling: SamplingConfig, train_timesteps: int, where: str = "") -> SamplingConfig:
    """``sampling`` with every value checked (a ValueError naming the setting, and ``where`` it came from)
    and the interval as a float pair."""
    prefix = f"{where}: " if where else ""
    steps = sampling.num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or int(steps) != steps or steps < 1:
        raise ValueError(f"{prefix}num_inference_steps must be an integer >= 1, got {steps!r}")
    if steps > train_timesteps:
        raise ValueError(f"{prefix}num_inference_steps must be at most the {train_timesteps} training timesteps, "
                         f"got {steps}")
    guidance = sampling.guidance_scale
    if not isinstance(guidance, (int, float)) or not guidance >= 0:  # also rejects NaN
        raise ValueError(f"{prefix}guidance_scale must be >= 0 (0: unconditional, 1: no guidance), got {guidance!r}")
    eta = sampling.eta
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:  # also rejects NaN
        raise ValueError(f"{prefix}eta must be in [0, 1] (0: deterministic DDIM, 1: ancestral), got {eta!r}")
    interval = check_guidance_interval(sampling.guidance_interval, f"{prefix}guidance_interval")
    return SamplingConfig(int(steps), float(guidance), float(eta), interval)


def write_sampling(directory: str | Path, sampling: SamplingConfig) -> Path:
    """Write a generator folder's sampling.json (atomically: an old file stays whole until replaced)."""
    path = Path(directory) / SAMPLING_NAME
    atomic_write_text(path, json.dumps(to_dict(sampling), indent=2))
    return path


def read_sampling(directory: str | Path, train_timesteps: int) -> SamplingConfig:
    """A generator folder's sampling.json, checked; the library defaults where the folder has none."""
    path = Path(directory) / SAMPLING_NAME
    if not path.exists():
        return SamplingConfig()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it") from None
    sampling = from_dict(SamplingConfig, data, where=str(path))  # unknown keys: a ConfigError (a ValueError)
    return check_sampling(sampling, train_timesteps, where=str(path))


class TextToImageGenerator(BuiltOnEncoder, nn.Module):
    """A dual encoder's text tower + a cross-attention UNet denoiser; see the module docstring."""

    MODEL_TYPE = MODEL_TYPE  # save / load (BuiltOnEncoder): config.json's model_type and section
    CONFIG_SECTION = "generator"
    CONFIG_CLASS = GeneratorConfig
    DESCRIPTION = "a text -> image generator"

    def __init__(self, config: GeneratorConfig, dual_encoder: DualEncoder):
        super().__init__()
        if dual_encoder.tokenizer is None:
            raise ValueError("the generator needs the dual encoder's tokenizer (it has none)")
        if not 0.0 <= config.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {config.condition_dropout}")
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {config.prediction_type!r}; choose from "
                             f"{', '.join(PREDICTION_TYPES)}")
        if not config.detail_weight >= 0:
            raise ValueError(f"detail_weight must be >= 0 (0: plain MSE), got {config.detail_weight}")
        if config.train_timesteps < 1:
            raise ValueError(f"train_timesteps must be at least 1, got {config.train_timesteps}")
        self.config = copy.deepcopy(config)
        self.sampling = SamplingConfig()  # generate_images' defaults; saved as sampling.json with the model
        self.dual_encoder = dual_encoder
        self.tokenizer = dual_encoder.tokenizer
        # The image tower plays no part in generation (it stays for CLIP-score / Frechet evaluation).
        dual_encoder.lock_towers(image=True, text=config.freeze_text)
        text_dim = dual_encoder.text_tower.output_dim
        X = config.cross_attention_dim
        self.context_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, X))  # (B, L, C) -> (B, L, X)
        self.null_context = nn.Parameter(torch.randn(1, 1, X) * 0.02)  # the unconditional "prompt"
        if config.spatial_condition < 0 or (config.spatial_condition and config.spatial_channels < 1):
            raise ValueError(f"spatial_condition must be >= 0 and spatial_channels >= 1, got "
                             f"{config.spatial_condition} and {config.spatial_channels}")
        S, K = config.spatial_condition, config.spatial_channels
        # The prompt as a coarse (K, S, S) map next to the pixels: where things go, from the first layer on.
        self.spatial_proj = nn.Sequential(nn.Linear(X, 4 * X), nn.SiLU(), nn.Linear(4 * X, K * S * S)) if S else None
        self.unet = build_unet(config)
        self.train_scheduler = DDPMScheduler(num_train_timesteps=config.train_timesteps,
                                             beta_schedule=config.beta_schedule,
                                             prediction_type=config.prediction_type,
                                             clip_sample=True)

    @property
    def device(self) -> torch.device:
        return self.null_context.device

    def write_files(self, directory: Path) -> None:
        super().write_files(directory)
        write_sampling(directory, self.sampling)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> TextToImageGenerator:
        model = super().from_pretrained(directory, device)
        model.sampling = read_sampling(directory, model.config.train_timesteps)
        return model

    @property
    def text_frozen(self) -> bool:
        return self.dual_encoder.config.text.locked

    # ------------------------------------------------------------------ conditioning
    def encode_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> cross-attention context (B, L, X); no text-tower gradients when it is frozen."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_frozen):
            tokens, _ = self.dual_encoder.text_tower.forward_features(input_ids, attention_mask)  # (B, L, C)
        return self.context_proj(tokens)  # (B, L, X)

    def unconditional_context(self, batch_size: int, length: int = 1) -> torch.Tensor:
        return self.null_context.expand(batch_size, length, -1)  # (B, L, X)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction (eps, or v) for (x_t, t, context): (B, 3, H, W).

        With ``coord_channels`` the UNet also sees two coordinate maps (x and y in [-1, 1]): convolutions
        alone only learn where they are from the zero padding at the borders. With ``pooled_condition``
        the context's mean token joins the timestep embedding, reaching every ResNet block, including the
        full-resolution ones that have no cross-attention. With ``spatial_condition`` S the pooled
        prompt also goes through an MLP to a (K, S, S) map, enlarged to the image and stacked with it: a
        direct path from "top left" to the pixels there, which cross-attention from noisy-image queries
        is slow to learn."""
        B, _, H, W = x.shape
        inputs = [x]
        if self.config.coord_channels:
            ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x then y
            inputs.append(grid.expand(B, -1, -1, -1))  # (B, 2, H, W)
        if mask is None:
            pooled = context.mean(dim=1)  # (B, X)
        else:
            weights = mask.to(context.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (context * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, X)
        if self.spatial_proj is not None:
            S = self.config.spatial_condition
            prompt_map = self.spatial_proj(pooled).view(B, -1, S, S)  # (B, K, S, S)
            inputs.append(F.interpolate(prompt_map, size=(H, W), mode="bilinear", align_corners=False))
        x = torch.cat(inputs, dim=1) if len(inputs) > 1 else x  # (B, input_channels, H, W)
        return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask,
                         class_labels=pooled if self.config.pooled_condition else None).sample

    def guided_noise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                     guidance_scale: float) -> torch.Tensor:
        """Classifier-free guided noise prediction; both branches in one UNet batch of 2B."""
        B, L = mask.shape
        if guidance_scale == 1.0:
            return self.denoise(x, t, context, mask)
        null = self.unconditional_context(B, L)  # (B, L, X): identical tokens, so no mask is needed
        both = self.denoise(torch.cat([x, x]), t, torch.cat([null, context]),
                            torch.cat([torch.ones_like(mask), mask]))  # (2B, 3, H, W)
        eps_uncond, eps_cond = both.chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)

    # ------------------------------------------------------------------ training
    def training_loss(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      generator: torch.Generator | None = None, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Noise-prediction MSE (or v-prediction MSE) on uint8 images (B, H, W, 3) and their captions' tokens.

        ``generator`` (a CPU torch.Generator) draws the noise, the timesteps and the condition dropout,
        so a run is reproducible and resumable. ``share`` = (rank, world_size): the batch is that rank's
        slice of a global batch of B * world_size; the draws are made for the global batch and sliced, so
        the ranks together use exactly the noise of one process on the global batch."""
        size = self.config.image_size
        if images.shape[1:3] != (size, size):
            raise ValueError(f"images are {tuple(images.shape[1:3])} pixels but the generator makes "
                             f"{size}x{size}; render the data at image_size={size}")
        x0 = images_to_pixels(images.to(self.device))  # (B, 3, H, W)
        B = x0.shape[0]
        rank, world_size = share
        rows = slice(rank * B, (rank + 1) * B)  # this rank's rows of the global draws
        noise = torch.randn((B * world_size, *x0.shape[1:]), generator=generator)[rows].to(self.device)
        t = torch.randint(0, self.config.train_timesteps, (B * world_size,), generator=generator)[rows].to(self.device)
        drop = (torch.rand(B * world_size, generator=generator)[rows] < self.config.condition_dropout).to(self.device)
        x_t = self.train_scheduler.add_noise(x0, noise, t)  # sqrt(a_bar) x0 + sqrt(1 - a_bar) eps
        mask = attention_mask.to(self.device)
        context = self.encode_context(input_ids, mask)  # (B, L, X)
        context = torch.where(drop[:, None, None], self.unconditional_context(B, context.shape[1]), context)
        mask = torch.where(drop[:, None], torch.ones_like(mask), mask)  # (B, L)
        prediction = self.denoise(x_t, t, context, mask)  # (B, 3, H, W)
        target = noise if self.config.prediction_type == "epsilon" else \
            self.train_scheduler.get_velocity(x0, noise, t)  # v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0
        error = (prediction.float() - target.float()).pow(2)  # (B, 3, H, W)
        if self.config.detail_weight > 0:
            error = error * self.detail_weights(x0)
        per_image = error.mean(dim=(1, 2, 3))  # (B,)
        if self.config.snr_gamma <= 0:
            return per_image.mean()
        return (per_image * self.min_snr_weights(t)).mean()

    def detail_weights(self, x0: torch.Tensor) -> torch.Tensor:
        """Per-pixel loss weights (B, 1, H, W) for clean images x0 (B, 3, H, W): 1 + detail_weight * c / mean(c),
        c = |x0 - its 5x5 box mean| summed over channels (the local contrast), rescaled to mean 1 per image.
        Plain MSE spreads the loss over every pixel, so the few that draw a small object's outline (what tells
        a square from a circle) carry almost none of it; these weights give them a share that size alone
        would not. Flat images get weight 1 everywhere."""
        contrast = (x0 - F.avg_pool2d(x0, 5, stride=1, padding=2, count_include_pad=False)).abs().sum(1, keepdim=True)
        weights = 1 + self.config.detail_weight * contrast / contrast.mean(dim=(2, 3), keepdim=True).clamp(min=1e-6)
        return weights / weights.mean(dim=(2, 3), keepdim=True)

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): weight min(SNR, gamma) / SNR for epsilon targets and
        min(SNR, gamma) / (SNR + 1) for v targets, SNR = a_bar / (1 - a_bar): the many easy low-noise
        steps stop dominating the gradient. (B,) for timesteps t (B,)."""
        alpha_bar = self.train_scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=self.config.snr_gamma)
        return clipped / (snr + 1) if self.config.prediction_type == "v_prediction" else clipped / snr

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.training_loss(images, input_ids, attention_mask, generator)

    # ------------------------------------------------------------------ sampling
    def sampling_scheduler(self) -> DDIMScheduler:
        """A fresh DDIM scheduler over the training noise schedule (eta is given per step)."""
        return DDIMScheduler(num_train_timesteps=self.config.train_timesteps, beta_schedule=self.config.beta_schedule,
                             prediction_type=self.config.prediction_type, clip_sample=True, set_alpha_to_one=True,
                             timestep_spacing="trailing")

    def resolve_sampling(self, **given) -> SamplingConfig:
        """``self.sampling`` with each setting given (not None) in its place, checked."""
        chosen = dataclasses.replace(self.sampling, **{k: v for k, v in given.items() if v is not None})
        return check_sampling(chosen, self.config.train_timesteps)

    @torch.inference_mode()
    def generate_images(self, prompts: str | Sequence[str], num_inference_steps: int | None = None,
                        guidance_scale: float | None = None, seed: int = 0, progress: bool = True,
                        num_images_per_prompt: int = 1, eta: float | None = None,
                        guidance_interval: Sequence[float] | None = None) -> torch.Tensor:
        """uint8 images (N, H, W, 3), N = len(prompts) * num_images_per_prompt (each prompt's images together).

        DDIM with classifier-free guidance; ``eta`` in [0, 1] is the fresh noise per step (0: deterministic
        DDIM, 1: ancestral). ``guidance_interval`` (lo, hi): guide only the steps whose noise level t / T lies
        in [lo, hi] (0 clean, 1 pure noise); the others use the conditional prediction alone (and cost one
        UNet pass instead of two). A setting left None comes from ``self.sampling`` (the folder's
        sampling.json: a trained run's best guidance). The seed draws the initial and the per-step noise:
        the same seed, the same images."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given; pass at least one non-empty prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is {type(prompt).__name__}, expected str")
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty; describe the image in at least one word")
        sampling = self.resolve_sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                         eta=eta, guidance_interval=guidance_interval)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        lo, hi = sampling.guidance_interval
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        tokens = self.tokenizer(prompts)
        was_training = self.training
        self.eval()
        try:
            mask = tokens["attention_mask"].to(self.device)
            context = self.encode_context(tokens["input_ids"], mask)  # (N, L, X), once for all steps
            size = self.config.image_size
            noise_gen = torch.Generator().manual_seed(int(seed))
            x = torch.randn((len(prompts), 3, size, size), generator=noise_gen).to(self.device)  # (N, 3, H, W)
            scheduler = self.sampling_scheduler()
            scheduler.set_timesteps(sampling.num_inference_steps, device=self.device)
            T = self.config.train_timesteps
            for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
                scale = sampling.guidance_scale if lo <= int(t) / T <= hi else 1.0
                eps = self.guided_noise(x, t, context, mask, scale)
                x = scheduler.step(eps, t, x, eta=sampling.eta, generator=noise_gen).prev_sample  # (N, 3, H, W)
            return pixels_to_images(x)
        finally:
            self.train(was_training)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> TextToImageGenerator:
    """A generator saved with ``save_pretrained``, or the final model of a run folder."""
    return TextToImageGenerator.from_pretrained(find_model_dir(path), device=device)
