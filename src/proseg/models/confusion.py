"""CM-Global and CM-Pixel (Zhang et al., NeurIPS 2020, "Disentangling human error from the ground truth in
segmentation of medical images"): a two-class segmentation network for the true label and one confusion matrix
per rater.

Convention (the paper's and its official code's): ``A_r[i, j] = p(rater r observes class i | true class j)``
with classes ``0 = background``, ``1 = foreground``. Each **column** is a distribution over the observed label,
so columns sum to 1 (softmax over the row index ``i``). The rater's predicted label distribution is
``p_r = A_r @ p_hat`` on **probabilities** (the Pionono/D-Persona/ProSeg re-implementations multiply logits and,
with one output channel, use a 1x1 matrix that normalises to 1: a plain U-Net with a constant regulariser).

* ``cm_global``: one 2x2 matrix per rater, a learnable ``(R, 2, 2)`` logit table.
* ``cm_pixel``: a matrix per rater and pixel, ``(B, R, 2, 2, H, W)``, from a per-rater convolutional head on the
  segmentation network's features (the paper's "annotator network"), run for all raters as one grouped module.

Loss: ``NLL + trace_weight * trace``. NLL = mean over pixels of ``-log p_r(y_r)``, averaged over the present
(image, rater) pairs; computed in log space (``logsumexp_j log A[i, j] + log p_hat[j]``). trace = mean over the
present pairs (and pixels for ``cm_pixel``) of ``tr(A_r)``; minimising it pushes every rater to be "maximally
unreliable" while the NLL keeps ``A_r p_hat`` faithful to the data, which lets ``p_hat`` separate from the raters'
errors. The official code sums both terms over raters; averaging both leaves their ratio unchanged.

Outputs: the model is deterministic. ``sample_personalized`` returns ``p_r`` (foreground) for each rater repeated
K times (K identical draws). ``sample_diverse`` (with ``diverse_from_raters=True``, the default) returns the R
rater outputs cycled to K (draw k is rater ``k mod R``; use a K that is a multiple of R for equal weights);
``diverse_from_raters=False`` makes it raise :class:`NotSupportedError`. ``predict_true`` returns ``p_hat``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from proseg.losses import weighted_mean
from proseg.models._utils import check_rater_sampling, training_pairs
from proseg.models.backbones import create_backbone
from proseg.models.base import Batch, MultiRaterModel, NotSupportedError
from proseg.models.registry import register_model

NUM_CLASSES = 2
# The reference's global CM starts at softplus(eye(2)) normalised per column: diagonal softplus(1)/(softplus(1)+ln 2).
REFERENCE_INIT_DIAG = math.log1p(math.e) / (math.log1p(math.e) + math.log(2.0))


def _diag_logit(diag: float) -> float:
    if not 0.0 < diag < 1.0:
        raise ValueError(f"cm_init_diag must be in (0, 1), got {diag}")
    return math.log(diag / (1.0 - diag))


def rater_log_probs(log_p_true: Tensor, log_cm: Tensor) -> Tensor:
    """``log (A_r p_hat)`` per observed class.

    Args:
        log_p_true: ``(B, 2, H, W)`` log-probabilities of the true class (log-softmax of the segmentation logits).
        log_cm: log confusion matrices, ``(R, 2, 2)`` (global) or ``(B, R, 2, 2, H, W)`` (pixel-wise), indexed
            ``[..., observed i, true j, ...]``; every column ``j`` must be a log-distribution over ``i``.

    Returns:
        ``(B, R, 2, H, W)``: ``log p_r[i] = logsumexp_j (log A_r[i, j] + log p_hat[j])``.
    """
    if log_cm.ndim == 3:
        log_cm = log_cm[None, :, :, :, None, None]
    return torch.logsumexp(log_cm + log_p_true[:, None, None], dim=3)


def confusion_nll(log_p_rater: Tensor, masks: Tensor, weight: Tensor) -> Tensor:
    """Negative log-likelihood of the rater masks under their predicted distributions.

    Args:
        log_p_rater: ``(B, R, 2, H, W)`` from :func:`rater_log_probs`; masks: ``(B, R, H, W)`` in {0, 1};
        weight: ``(B, R)`` (0 = absent rater).

    Returns:
        Scalar: per pair the mean over pixels of ``-(y log p[1] + (1 - y) log p[0])``, then the ``weight``-ed
        mean over pairs (0 when every weight is 0).
    """
    y = masks.to(log_p_rater.dtype)
    per_pixel = -(y * log_p_rater[:, :, 1] + (1.0 - y) * log_p_rater[:, :, 0])
    per_pair = per_pixel.flatten(2).mean(-1)
    return weighted_mean(per_pair, weight.to(per_pair.dtype))


def confusion_trace(cm: Tensor, weight: Tensor) -> Tensor:
    """Mean trace of the confusion matrices of the present pairs.

    Args:
        cm: ``(R, 2, 2)`` or ``(B, R, 2, 2, H, W)`` matrices (probabilities); weight: ``(B, R)``.

    Returns:
        Scalar ``sum_{b,r} w_br tr_br / sum w`` where ``tr_br`` is ``tr(A_r)`` (global) or its mean over pixels.
    """
    tr = torch.diagonal(cm, dim1=-2, dim2=-1).sum(-1) if cm.ndim == 3 else (cm[:, :, 0, 0] + cm[:, :, 1, 1])
    tr = tr[None].expand(weight.shape) if tr.ndim == 1 else tr.flatten(2).mean(-1)
    return weighted_mean(tr, weight.to(tr.dtype))


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half/bfloat16 (autocast) logits -> float32 for the log-space maths; float32/float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class GroupPReLU(nn.Module):
    """PReLU with one slope per group of channels (one per rater, as R separate ``nn.PReLU()`` modules)."""

    def __init__(self, groups: int, channels_per_group: int) -> None:
        super().__init__()
        self.channels_per_group = channels_per_group
        self.weight = nn.Parameter(torch.full((groups,), 0.25))

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x, self.weight.repeat_interleave(self.channels_per_group))


class PixelCMHead(nn.Module):
    """The per-rater annotator heads of CM-Pixel as one grouped module.

    Per rater (as the reference's ``cm_layers``): ``num_convs`` 3x3 convolutions (no bias) each followed by a
    norm and a PReLU, then a 1x1 convolution to the 4 logits of the 2x2 matrix. The first convolution reads the
    shared features for all raters at once (``F -> R * Ch``), the later ones are grouped by rater.

    ``forward(features (B, F, H, W)) -> (B, R, 2, 2, H, W)`` **logits** (indexed ``[observed, true]``).
    """

    def __init__(
        self, feature_channels: int, num_raters: int, channels: int, num_convs: int, norm: str, init_diag: float
    ) -> None:
        super().__init__()
        if num_convs < 0:
            raise ValueError(f"cm_head_convs must be >= 0, got {num_convs}")
        if norm not in ("instance", "batch", "none"):
            raise ValueError(f"cm_head_norm must be 'instance', 'batch' or 'none', got {norm!r}")
        self.num_raters = num_raters
        r = num_raters
        layers: list[nn.Module] = []
        cin, groups = feature_channels, 1
        for _ in range(num_convs):
            layers.append(nn.Conv2d(cin, r * channels, 3, padding=1, groups=groups, bias=norm == "none"))
            if norm == "instance":
                layers.append(nn.InstanceNorm2d(r * channels, affine=True))
            elif norm == "batch":
                layers.append(nn.BatchNorm2d(r * channels))
            layers.append(GroupPReLU(r, channels))
            cin, groups = r * channels, r
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Conv2d(cin, r * NUM_CLASSES**2, 1, groups=groups)
        with torch.no_grad():  # start near the identity: diagonal logit, zero off-diagonal
            bias = torch.zeros(r, NUM_CLASSES, NUM_CLASSES)
            bias.diagonal(dim1=-2, dim2=-1).fill_(_diag_logit(init_diag))
            self.out.bias.copy_(bias.flatten())

    def forward(self, features: Tensor) -> Tensor:
        logits = self.out(self.trunk(features))
        b, _, h, w = logits.shape
        return logits.view(b, self.num_raters, NUM_CLASSES, NUM_CLASSES, h, w)


class _ConfusionMatrixModel(MultiRaterModel):
    """Shared code of CM-Global and CM-Pixel (see the module docstring for the maths and conventions). The options
    and their defaults are the registered classes' (:class:`CMGlobal`, :class:`CMPixel`).

    ``supports_diverse`` is an instance attribute: ``diverse_from_raters``.
    """

    supports_personalized = True
    supports_diverse = True
    level: str = ""

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        *,
        backbone: str,
        backbone_cfg: dict[str, Any] | None,
        trace_weight: float,
        cm_init_diag: float,
        cm_lr: float | None,
        seg_head_kernel: int,
        diverse_from_raters: bool,
        rater_sampling: str,
    ) -> None:
        super().__init__(in_channels, num_raters)
        self.rater_sampling = check_rater_sampling(rater_sampling)
        if seg_head_kernel < 1 or seg_head_kernel % 2 == 0:
            raise ValueError(f"seg_head_kernel must be a positive odd number, got {seg_head_kernel}")
        _diag_logit(cm_init_diag)
        self.backbone = create_backbone(backbone, in_channels, **(backbone_cfg or {}))
        self.feature_channels = int(self.backbone.out_channels)
        self.seg_head = nn.Conv2d(self.feature_channels, NUM_CLASSES, seg_head_kernel, padding=seg_head_kernel // 2)
        self.trace_weight = float(trace_weight)
        self.cm_init_diag = float(cm_init_diag)
        self.cm_lr = cm_lr
        self.diverse_from_raters = bool(diverse_from_raters)
        self.supports_diverse = self.diverse_from_raters

    # --- subclass hooks -------------------------------------------------------------------------------
    def cm_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def cm_logits(self, features: Tensor) -> Tensor:
        """``(R, 2, 2)`` or ``(B, R, 2, 2, H, W)`` confusion-matrix logits, indexed ``[observed, true]``."""
        raise NotImplementedError

    # --- pieces ---------------------------------------------------------------------------------------
    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p_hat (B, 2, H, W), log A (R, 2, 2) or (B, R, 2, 2, H, W))``."""
        features = self.backbone(images)
        log_p_true = F.log_softmax(_at_least_fp32(self.seg_head(features)), dim=1)
        log_cm = F.log_softmax(_at_least_fp32(self.cm_logits(features)), dim=-4 if self.level == "pixel" else -2)
        return log_p_true, log_cm

    def confusion_matrices(self, images: Tensor | None = None) -> Tensor:
        """The rater confusion matrices ``A[..., observed, true]`` (columns sum to 1): ``(R, 2, 2)`` for
        CM-Global (``images`` not needed), ``(B, R, 2, 2, H, W)`` for CM-Pixel."""
        if images is None:
            if self.level == "pixel":
                raise ValueError("cm_pixel's confusion matrices depend on the image: pass images (B, C, H, W)")
            return F.log_softmax(self.cm_logits(torch.empty(0)), dim=-2).exp()
        self._check_images(images)
        return self._forward(images)[1].exp()

    def predict_true(self, images: Tensor) -> Tensor:
        """``(B, H, W)`` estimated probability that the **true** label is foreground (``p_hat``)."""
        self._check_images(images)
        return F.softmax(_at_least_fp32(self.seg_head(self.backbone(images))), dim=1)[:, 1]

    def rater_probabilities(self, images: Tensor) -> Tensor:
        """``(B, R, H, W)`` foreground probability of each rater's predicted distribution ``A_r p_hat``."""
        self._check_images(images)
        log_p_true, log_cm = self._forward(images)
        return rater_log_probs(log_p_true, log_cm)[:, :, 1].exp()

    # --- API ------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"loss", "nll", "trace"}``: ``loss = nll + trace_weight * trace`` over the used (image, rater) pairs:
        every present one (``rater_sampling="all"``) or one present rater per image drawn from ``generator``
        (``"one"``, the reference training scripts)."""
        image, masks, present = self._check_batch(batch)
        log_p_true, log_cm = self._forward(image)
        raters, pair_weight, _ = training_pairs(masks, present, self.rater_sampling, generator, pick="multinomial")
        weight = torch.zeros(present.shape, dtype=log_p_true.dtype, device=present.device)
        weight = weight.scatter(1, raters, pair_weight.to(weight.dtype))  # (B, R): 0 = not used this step
        nll = confusion_nll(rater_log_probs(log_p_true, log_cm), masks, weight)
        trace = confusion_trace(log_cm.exp(), weight)
        total = nll + self.trace_weight * trace
        return {"loss": total, "nll": nll.detach(), "trace": trace.detach()}

    def sample_personalized(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """``(B, R, K, H, W)``: the foreground probability of ``A_r p_hat`` for every rater, repeated K times.
        The model is deterministic, so the K draws are identical (``generator``/``share_latent`` have no effect)."""
        self._check_sampling(images, num_samples)
        probs = self.rater_probabilities(images)
        return probs.unsqueeze(2).expand(-1, -1, num_samples, -1, -1).contiguous()

    def sample_diverse(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """``(B, K, H, W)``: the R rater outputs cycled to K (draw k = rater ``k mod R``). Only with
        ``diverse_from_raters=True``; a confusion-matrix model has no population distribution of its own."""
        if not self.diverse_from_raters:
            raise NotSupportedError(
                f"{type(self).__name__} is deterministic and has no diverse (population) output; build it with "
                "diverse_from_raters=True to use the R rater predictions, cycled to K, as the diverse set"
            )
        self._check_sampling(images, num_samples)
        probs = self.rater_probabilities(images)
        index = torch.arange(num_samples, device=probs.device) % self.num_raters
        return probs.index_select(1, index)

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """The segmentation network at ``lr``; the confusion-matrix parameters at ``cm_lr`` (None = ``lr``)."""
        cm = self.cm_parameters()
        ids = {id(p) for p in cm}
        rest = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        cm_wd = 0.0 if self.level == "global" else weight_decay  # a probability table is not decayed
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "network"},
            {"params": cm, "lr": lr if self.cm_lr is None else self.cm_lr, "weight_decay": cm_wd, "name": "cm"},
        ]


@register_model("cm_global")
class CMGlobal(_ConfusionMatrixModel):
    """CM-Global: one learnable 2x2 confusion matrix per rater (an ``(R, 2, 2)`` logit table, softmax over the
    observed-label index). Arguments as :class:`CMPixel` minus the head options; see the module docstring.

    Args:
        trace_weight: lambda of the trace term (paper: minimised; default 0.01).
        cm_init_diag: initial ``A_r[j, j]`` (near-identity start as in Tanno et al. 2019; the reference's
            ``softplus(eye)`` start is 0.6546).
        cm_lr: learning rate of the table (reference 0.01); None = the model lr.
        seg_head_kernel: kernel of the 2-class output convolution (smp's ``SegmentationHead`` uses 3).
        diverse_from_raters: whether ``sample_diverse`` returns the rater outputs cycled to K (True) or raises.
        rater_sampling: ``"all"`` (every present rater each step, as the paper's loss) or ``"one"`` (one present
            rater per image, as the ProSeg/D-Persona/Pionono training scripts).
    """

    level = "global"
    PRESETS: dict[str, dict[str, Any]] = {
        "default": {},  # the constructor's defaults
        "reference": {"backbone": "resnet34_unet", "trace_weight": 0.01, "cm_init_diag": REFERENCE_INIT_DIAG,
                      "cm_lr": 0.01, "seg_head_kernel": 3, "rater_sampling": "one"},
        "tiny": {"backbone": "unet", "backbone_cfg": {"widths": (8, 16)}, "trace_weight": 0.01,
                 "cm_init_diag": 0.9, "cm_lr": 0.01},
    }

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        backbone: str = "unet",
        backbone_cfg: dict[str, Any] | None = None,
        trace_weight: float = 0.01,
        cm_init_diag: float = 0.9,
        cm_lr: float | None = 0.01,
        seg_head_kernel: int = 1,
        diverse_from_raters: bool = True,
        rater_sampling: str = "all",
    ) -> None:
        super().__init__(
            in_channels, num_raters, backbone=backbone, backbone_cfg=backbone_cfg, trace_weight=trace_weight,
            cm_init_diag=cm_init_diag, cm_lr=cm_lr, seg_head_kernel=seg_head_kernel,
            diverse_from_raters=diverse_from_raters, rater_sampling=rater_sampling,
        )
        table = torch.zeros(num_raters, NUM_CLASSES, NUM_CLASSES)
        table.diagonal(dim1=-2, dim2=-1).fill_(_diag_logit(self.cm_init_diag))
        self.cm_table = nn.Parameter(table)

    def cm_parameters(self) -> list[nn.Parameter]:
        return [self.cm_table]

    def rater_tensors(self) -> list[tuple[str, nn.Module, str]]:
        """Per-rater tensors (a new rater, docs/adaptation.md): the ``(R, 2, 2)`` confusion-matrix table."""
        return [("cm_table", self, "cm_table")]

    def prior_rater_rows(self) -> dict[str, Tensor]:
        """``init="prior"``: the initial confusion matrix (diagonal ``cm_init_diag``)."""
        table = torch.zeros(NUM_CLASSES, NUM_CLASSES)
        table.diagonal().fill_(_diag_logit(self.cm_init_diag))
        return {"cm_table": table}

    def cm_logits(self, features: Tensor) -> Tensor:
        return self.cm_table


@register_model("cm_pixel")
class CMPixel(_ConfusionMatrixModel):
    """CM-Pixel: a 2x2 confusion matrix per rater and pixel from a per-rater head on the segmentation features.

    Args (besides :class:`CMGlobal`'s):
        cm_head_convs: 3x3 conv + norm + PReLU blocks per rater before the 1x1 output (reference: two double
            convs = 4).
        cm_head_channels: their width (default: the backbone's output channels, as the reference).
        cm_head_norm: ``"instance"`` (the reference), ``"batch"`` or ``"none"``.
    """

    level = "pixel"
    PRESETS: dict[str, dict[str, Any]] = {
        "default": {},  # the constructor's defaults
        "reference": {"backbone": "resnet34_unet", "trace_weight": 0.01, "cm_init_diag": 0.9, "cm_lr": 0.01,
                      "cm_head_convs": 4, "cm_head_norm": "instance", "seg_head_kernel": 3,
                      "rater_sampling": "one"},
        "tiny": {"backbone": "unet", "backbone_cfg": {"widths": (8, 16)}, "trace_weight": 0.01,
                 "cm_init_diag": 0.9, "cm_lr": None, "cm_head_convs": 1, "cm_head_channels": 4},
    }

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        backbone: str = "unet",
        backbone_cfg: dict[str, Any] | None = None,
        trace_weight: float = 0.01,
        cm_init_diag: float = 0.9,
        cm_lr: float | None = None,
        seg_head_kernel: int = 1,
        diverse_from_raters: bool = True,
        rater_sampling: str = "all",
        cm_head_convs: int = 4,
        cm_head_channels: int | None = None,
        cm_head_norm: str = "instance",
    ) -> None:
        super().__init__(
            in_channels, num_raters, backbone=backbone, backbone_cfg=backbone_cfg, trace_weight=trace_weight,
            cm_init_diag=cm_init_diag, cm_lr=cm_lr, seg_head_kernel=seg_head_kernel,
            diverse_from_raters=diverse_from_raters, rater_sampling=rater_sampling,
        )
        self.cm_head = PixelCMHead(
            self.feature_channels, num_raters, cm_head_channels or self.feature_channels, cm_head_convs,
            cm_head_norm, self.cm_init_diag,
        )

    def cm_parameters(self) -> list[nn.Parameter]:
        return list(self.cm_head.parameters())

    def cm_logits(self, features: Tensor) -> Tensor:
        return self.cm_head(features)
