"""D-Persona (Wu et al., CVPR 2024): a Prob. U-Net trained against the raters' envelope (stage 1), then
per-rater projection heads that pick each rater's region of the prior latent space (stage 2).

Stage 1 (``stage=1``, the default): a Prob. U-Net (:class:`~proseg.models.prob_unet.ProbUNet`) on the backbone
features. The posterior sees the image and the masks of **all** raters (the reference concatenates the four
masks; ``posterior_input="target"`` gives the classic one-mask posterior). Masks enter shifted by
``-mask_shift`` and absent raters as 0, so with the default shift 0.5 an absent rater (0) is distinguishable
from an empty mask (-0.5); the reference has no absent raters and no shift.
    ``loss = GDL(posterior sample, one random present rater) + kl_weight * KL(q || p)
             + bound_weight * bound + reg_weight * sum_W ||W||_2``
where ``bound`` (:func:`bound_loss`, beta 0.5 in the reference) compares the pixel-wise max over
``prior_sample_num`` (10) reparameterized prior samples with the union of the present raters' masks and the
pixel-wise min with their intersection (a per-channel foreground Dice pooled over the batch, the reference
``GeneralizedDiceLoss`` on a 2-channel input).

Stage 2 (``stage=2`` or ``model.set_stage(2)``): every stage-1 parameter is frozen (``requires_grad=False``,
and the stage-1 modules stay in eval mode so their BatchNorm statistics do not drift; the reference keeps
them in train mode). The R projection heads are one grouped-convolution module: on the backbone features,
each head computes ``num_queries`` query vectors ``q_r`` (conv blocks (32, 16, L), average pooling between
them, global average pooling). Given a set of ``z_set_size`` prior samples ``Z`` (100 in training, 500 at
test time in the reference), the rater's latent is the attention read-out ``softmax(q_r Z^T) Z`` and its
logits are the fcomb outputs averaged over the ``num_queries`` latents (``z_mapping``; the reference has one
query, so the average is over a set of one). Loss: the per-rater foreground Dice of the reference
(``stage2_loss="channel_dice"``, each rater's own mask, absent raters weighted 0) or any
:func:`~proseg.losses.segmentation_loss` kind over the present (image, rater) pairs.

Hand-over: ``model = load_model(stage1_dir); model.set_stage(2)`` (or ``create_model(..., stage=2)`` and a
strict ``load_state_dict`` of the stage-1 weights: the two stages have the same parameters and buffers).
The stage is a constructor option and the attribute ``stage``; ``init_config`` always reports its current value
(``config_updates``), so ``save_model`` / ``load_model`` round-trip a ``set_stage``. The buffer ``trained_stage``
records the highest stage whose loss has run in training mode (saved with the weights, so a stage-1 checkpoint
loaded into a stage-2 model keeps ``stage=2`` from the config). Personalized sampling needs stage 2 or
``trained_stage >= 2`` and raises :class:`NotSupportedError` otherwise (a stage-1 model has untrained projection
heads); the instance attribute ``supports_personalized`` says which, kept up to date by ``set_stage`` and by
loading weights (a training-mode loss raises ``trained_stage`` only to the current stage, which cannot change it).

Sampling
    * diverse: stage-1 prior samples (as the Prob. U-Net), available at any stage.
    * personalized: K draws each = K independent prior sets of ``z_set_size_eval`` samples, projected by every
      rater's head: ``(B, R, K, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from proseg.losses import gaussian_kl, get_loss, mask_channel_dice_loss, segmentation_loss, weighted_mean
from proseg.models._gaussian_nets import reparameterize
from proseg.models._utils import noise
from proseg.models.backbones.unet import down_path
from proseg.models.base import Batch, NotSupportedError
from proseg.models.prob_unet import ProbUNet
from proseg.models.registry import register_model


def bound_loss(sample_probs: Tensor, masks: Tensor, present: Tensor | None = None) -> Tensor:
    """D-Persona's bound term: the envelope of the samples against the envelope of the raters.

    Args:
        sample_probs: ``(B, N, H, W)`` probabilities of N samples per image.
        masks: ``(B, R, H, W)`` binary rater masks; present: ``(B, R)`` bool (None = all present).

    Returns:
        :func:`mask_channel_dice_loss` of ``[max_n p, min_n p]`` against ``[union, intersection]`` of the
        **present** raters' masks (an absent rater widens neither), images without any present rater
        weighted 0. It is 0 (its minimum) when the sample envelope equals the rater envelope and both are
        binary and non-empty.
    """
    if present is None:
        present = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
    m = masks.to(sample_probs.dtype)
    pres = present[..., None, None]
    union = torch.where(pres, m, torch.zeros_like(m)).amax(dim=1)
    inter = torch.where(pres, m, torch.ones_like(m)).amin(dim=1)
    pred = torch.stack([sample_probs.amax(dim=1), sample_probs.amin(dim=1)], dim=1)
    return mask_channel_dice_loss(pred, torch.stack([union, inter], dim=1), present.any(dim=1))


class ProjectionHeads(nn.Module):
    """R projection heads as one grouped-convolution module (every head runs every step).

    ``forward(features (B, F, H, W)) -> queries (B, R, Q, L)``: per head, conv blocks of two 3x3 convs + ReLU
    with widths ``(*widths, Q * L)`` and 2x2 average pooling between blocks (the reference ``Conv_block(16,
    [32, 16, 6])``, without its Dropout2d), then global average pooling.
    """

    def __init__(self, feat_channels: int, num_raters: int, latent_dim: int, widths: Sequence[int] = (32, 16),
                 num_queries: int = 1) -> None:
        super().__init__()
        self.num_raters, self.latent_dim, self.num_queries = num_raters, latent_dim, num_queries
        r = num_raters
        chans = (feat_channels, *widths, num_queries * latent_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(r * chans[i], r * chans[i + 1], 3, padding=1, groups=r),
                nn.ReLU(inplace=True),
                nn.Conv2d(r * chans[i + 1], r * chans[i + 1], 3, padding=1, groups=r),
                nn.ReLU(inplace=True),
            )
            for i in range(len(chans) - 1)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.normal_(m.bias, std=1e-3)

    def forward(self, features: Tensor) -> Tensor:
        b = features.shape[0]
        x = down_path(self.blocks, features.repeat(1, self.num_raters, 1, 1))[-1]  # group r sees all the features
        return x.mean(dim=(2, 3)).reshape(b, self.num_raters, self.num_queries, self.latent_dim)


@register_model("dpersona")
class DPersona(ProbUNet):
    """D-Persona, both stages. See the module docstring; the Prob. U-Net arguments are those of
    :class:`~proseg.models.prob_unet.ProbUNet`.

    Args (besides the Prob. U-Net's):
        stage: 1 or 2, which objective ``loss`` optimizes and which parameters are trainable.
        posterior_input: ``all`` (image + every rater's mask, the reference) or ``target`` (image + the mask
            the reconstruction is scored on).
        bound_weight: beta of the bound loss (0.5); prior_sample_num: prior samples in the bound loss (10).
        proj_widths: hidden widths of each projection head ((32, 16)); num_queries: latents per head (1).
        z_set_size: prior samples projected in stage-2 training (100); z_set_size_eval: at sampling (500).
        stage2_loss: ``channel_dice`` (the reference) or a :func:`segmentation_loss` kind.

    ``supports_personalized`` is an instance attribute (the class's False is a fresh stage-1 model's answer): True in
    stage 2 or once stage-2 heads have been trained (``trained_stage >= 2``).
    """

    supports_diverse = True

    PRESETS: dict[str, dict[str, Any]] = {
        # The constructor's defaults: the paper's hyper-parameters (latent 6, beta 0.5, 10 prior samples, GDL + KL,
        # 100/500 z's in stage 2) on the plain U-Net (32, 64, 128, 192) of the Prob. U-Net paper.
        "default": {},
        # The D-Persona repo: smp ResNet-34 U-Net (16 feature channels), prior/posterior filters
        # (16, 32, 64, 128, 256), fcomb width 16.
        "reference": {
            "backbone": "resnet34_unet",
            "backbone_cfg": {},
            "latent_dim": 6,
            "prior_widths": (16, 32, 64, 128, 256),
        },
        "tiny": {
            "backbone": "unet",
            "backbone_cfg": {"widths": (8, 16)},
            "latent_dim": 2,
            "prior_widths": (8, 16),
            "prior_convs_per_block": 1,
            "fcomb_convs": 3,
            "prior_sample_num": 3,
            "proj_widths": (8,),
            "z_set_size": 8,
            "z_set_size_eval": 16,
        },
    }

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        backbone: str = "unet",
        backbone_cfg: dict[str, Any] | None = None,
        latent_dim: int = 6,
        prior_widths: Sequence[int] = (32, 64, 128, 192),
        prior_convs_per_block: int = 3,
        prior_norm: bool = False,
        fcomb_width: int | None = None,
        fcomb_convs: int = 4,
        seg_loss: str = "gdl",
        kl_weight: float = 1.0,
        reg_weight: float = 1e-5,
        mask_shift: float = 0.5,
        posterior_input: str = "all",
        bound_weight: float = 0.5,
        prior_sample_num: int = 10,
        proj_widths: Sequence[int] = (32, 16),
        num_queries: int = 1,
        z_set_size: int = 100,
        z_set_size_eval: int = 500,
        stage2_loss: str = "channel_dice",
        stage: int = 1,
    ) -> None:
        if posterior_input not in ("all", "target"):
            raise ValueError(f"posterior_input must be 'all' or 'target', got {posterior_input!r}")
        if stage2_loss != "channel_dice":
            get_loss(stage2_loss, key="stage2_loss")  # an unknown name fails here, not at the first step
        for name, value in (("prior_sample_num", prior_sample_num), ("num_queries", num_queries),
                            ("z_set_size", z_set_size), ("z_set_size_eval", z_set_size_eval)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.posterior_input = posterior_input
        super().__init__(
            in_channels, num_raters, backbone=backbone, backbone_cfg=backbone_cfg, latent_dim=latent_dim,
            prior_widths=prior_widths, prior_convs_per_block=prior_convs_per_block, prior_norm=prior_norm,
            fcomb_width=fcomb_width, fcomb_convs=fcomb_convs, seg_loss=seg_loss, sum_over_pixels=False,
            kl_weight=kl_weight, reg_weight=reg_weight, rater_sampling="one", mask_shift=mask_shift,
        )
        self.bound_weight = float(bound_weight)
        self.prior_sample_num = prior_sample_num
        self.z_set_size = z_set_size
        self.z_set_size_eval = z_set_size_eval
        self.stage2_loss = stage2_loss
        self.proj_heads = ProjectionHeads(int(self.backbone.out_channels), num_raters, latent_dim, proj_widths,
                                          num_queries)
        self.register_buffer("trained_stage", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(DPersona._after_load)
        self.set_stage(stage)  # sets self.stage and supports_personalized

    def _posterior_mask_channels(self) -> int:
        return self.num_raters if self.posterior_input == "all" else 1

    def config_updates(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def _update_flags(self) -> None:
        """``supports_personalized``: in stage 2 (its heads are what is being trained and validated) or once a
        stage-2 loss has run in training mode (``trained_stage >= 2``)."""
        self.supports_personalized = self.stage == 2 or int(self.trained_stage) >= 2

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
        assert isinstance(module, DPersona)
        module._update_flags()  # the loaded trained_stage may differ

    # --- stages --------------------------------------------------------------------------------------
    def _stage1_modules(self) -> list[nn.Module]:
        return [self.backbone, self.prior, self.posterior, self.fcomb]

    def set_stage(self, stage: int) -> DPersona:
        """Switch the objective and the trainable parameters: stage 1 trains everything but the projection
        heads, stage 2 only the projection heads. Build the optimizer (and DDP) after this call."""
        if stage not in (1, 2):
            raise ValueError(f"D-Persona has stages 1 and 2, got {stage!r}")
        self.stage = int(stage)
        for m in self._stage1_modules():
            m.requires_grad_(stage == 1)
        self.proj_heads.requires_grad_(stage == 2)
        self._update_flags()
        return self.train(self.training)

    def train(self, mode: bool = True) -> DPersona:
        super().train(mode)
        if self.stage == 2:  # frozen means frozen: no BatchNorm statistics updates either
            for m in self._stage1_modules():
                m.train(False)
        return self

    # --- helpers -------------------------------------------------------------------------------------
    def _posterior_stats(self, image: Tensor, masks: Tensor, present: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if self.posterior_input == "all":
            cond = (masks - self.mask_shift) * present[..., None, None].to(masks.dtype)
        else:
            cond = target - self.mask_shift
        return self.posterior(torch.cat([image, cond], dim=1))

    def _project(self, feats: Tensor, z_set: Tensor) -> Tensor:
        """Rater logits ``(B, R, K, H, W)`` from prior sets ``z_set`` ``(B, K, N, L)``."""
        b, k = z_set.shape[:2]
        queries = self.proj_heads(feats).to(z_set.dtype)  # (B, R, Q, L)
        attn = torch.softmax(torch.einsum("brql,bknl->brkqn", queries, z_set), dim=-1)
        z_rater = torch.einsum("brkqn,bknl->brkql", attn, z_set)  # (B, R, K, Q, L)
        r, q = z_rater.shape[1], z_rater.shape[3]
        logits = self.fcomb(feats, z_rater.reshape(b, r * k * q, self.latent_dim))
        return logits.reshape(b, r, k, q, *logits.shape[-2:]).mean(dim=3)  # z_mapping: mean over the set

    # --- the API -------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Stage 1: ``{"loss", "seg", "kl", "bound", "reg"}``; stage 2: ``{"loss", "seg"}``."""
        out = self._loss_stage1(batch, generator) if self.stage == 1 else self._loss_stage2(batch, generator)
        if self.training:
            self.trained_stage.clamp_(min=self.stage)
        return out

    def _loss_stage1(self, batch: Batch, generator: torch.Generator | None) -> dict[str, Tensor]:
        image, masks, present = self._check_batch(batch)
        b = masks.shape[0]
        feats = self.backbone(image)
        mu_p, logvar_p = self.prior(image)
        target, weight = self._targets(masks, present, generator)  # one random present rater: (B,1,H,W), (B,1)
        mu_q, logvar_q = self._posterior_stats(image, masks, present, target)
        z_post = reparameterize(mu_q, logvar_q, noise("normal", mu_q.shape, generator, mu_q))
        eps = noise("normal", (b, self.prior_sample_num, self.latent_dim), generator, mu_p)
        z_prior = reparameterize(mu_p[:, None], logvar_p[:, None], eps)
        logits = self.fcomb(feats, torch.cat([z_post[:, None], z_prior], dim=1))  # (B, 1 + N, H, W)
        wf = weight.reshape(-1).to(logits.dtype)
        seg = self._seg_term(logits[:, 0], target[:, 0], wf)
        bound = bound_loss(torch.sigmoid(logits[:, 1:].float()), masks, present)
        kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p).sum(-1)
        kl = weighted_mean(kl, wf)
        reg = self._reg_term(kl)
        total = seg + self.kl_weight * kl + self.bound_weight * bound + reg
        return {"loss": total, "seg": seg.detach(), "kl": kl.detach(), "bound": bound.detach(), "reg": reg.detach()}

    def _loss_stage2(self, batch: Batch, generator: torch.Generator | None) -> dict[str, Tensor]:
        image, masks, present = self._check_batch(batch)
        b, r, h, w = masks.shape
        with torch.no_grad():  # stage-1 parts are frozen: no graph through them
            feats, z_set = self._prior_samples(image, (1, self.z_set_size), generator, share_latent=False)
        logits = self._project(feats, z_set)[:, :, 0]  # (B, R, H, W)
        if self.stage2_loss == "channel_dice":
            seg = mask_channel_dice_loss(torch.sigmoid(logits.float()), masks, present)
        else:
            seg = segmentation_loss(self.stage2_loss, logits.reshape(b * r, h, w), masks.reshape(b * r, h, w),
                                    present.reshape(-1).to(logits.dtype))
        return {"loss": seg, "seg": seg.detach()}

    def sample_personalized(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """``(B, R, K, H, W)``: for each of K independent prior sets, every rater's projected prediction."""
        self._check_sampling(images, num_samples)
        if not self.supports_personalized:
            raise NotSupportedError(
                "D-Persona's personalized output comes from its stage-2 projection heads, which have not been "
                f"trained (stage={self.stage}, trained_stage={int(self.trained_stage)}): train stage 1, then "
                "model.set_stage(2) (or model args stage: 2 with init_from the stage-1 run) and train stage 2; "
                "sample_diverse works at any stage."
            )
        feats, z_set = self._prior_samples(images, (num_samples, self.z_set_size_eval), generator, share_latent)
        return torch.sigmoid(self._project(feats, z_set)).to(images.dtype)
