"""ProSeg (Liu et al., arXiv 2512.00748): two latents, rater preference tau and boundary ambiguity Z.

Generative pieces (names as in the paper; shapes for B images, R raters, S (image, rater) pairs per image):

* ``q(tau | r) = Dir(softplus(a_r))`` with a learnable ``(R, D)`` table ``a`` (:class:`TauPosterior`), prior
  ``Dir(alpha0 * 1)``; closed-form KL; reparameterized, generator-driven sampling (:func:`sample_dirichlet`).
* ``p(r | tau)``: an MLP classifier ``D -> hidden -> R`` trained with cross-entropy on its **logits**.
* ``q(Z | x, r) = N(mu_r(x), diag(exp(logvar_r(x))))``, pixel-wise with ``z_channels`` channels, from per-rater
  "statistic heads" on the backbone features; all R heads are one :class:`RaterConvStack` (stacked weights run
  as grouped convolutions), KL to ``N(0, prior_variance)``.
* ``p(x | Z)``: per-rater "remap" heads (another :class:`RaterConvStack`) then either a second backbone + 1x1 conv
  (``recon_decoder="backbone"``, the reference) or a small conv decoder (``"light"``), output with the image's C.
* ``p(y | tau, Z)``: ``[Z, tile(tau)]`` through 1x1 convolutions to one logit; tau's part of the first layer is
  folded into a per-(image, rater, sample) bias, so the tiled tensor is never built (:class:`SegHead`).

See ``docs/models.md`` for every place where the paper and the reference code disagree and what is chosen here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from proseg.errors import NonFiniteError
from proseg.losses import (
    dirichlet_kl,
    energy_score,
    gaussian_kl,
    get_loss,
    log_variance,
    segmentation_loss,
    weighted_mean,
)
from proseg.models._utils import (
    check_rater_sampling,
    l2_norm_sum,
    noise,
    normal_from_seeds,
    sample_seeds,
    training_pairs,
)
from proseg.models.backbones import create_backbone
from proseg.models.base import Batch, MultiRaterModel, eval_mode
from proseg.models.registry import register_model

# --- randomness that only comes from the caller's generator --------------------------------------------------

#: rounds of the Marsaglia-Tsang rejection loop before giving up. Each round accepts > 95 % of the remaining draws
#: (boosted d >= 2/3), so even 1e9 draws all pass within 10 rounds with overwhelming probability; 100 is a bound that a
#: finite, positive alpha never reaches, and it turns a would-be infinite loop into an error.
MAX_GAMMA_ROUNDS = 100


@torch.compiler.disable
def check_concentration(alpha: Tensor, what: str = "Gamma/Dirichlet concentration") -> None:
    """Raise :class:`~proseg.errors.NonFiniteError` unless every element of ``alpha`` is finite and > 0.

    Two reductions and one device synchronisation; a NaN would otherwise never be accepted by the rejection loop.
    """
    finite = torch.isfinite(alpha).all()
    positive = (alpha > 0).all()
    ok = torch.stack([finite, positive]).tolist()
    if all(ok):
        return
    a = alpha.detach().reshape(-1)
    n_bad = int((~torch.isfinite(a)).sum()) if not ok[0] else int((a <= 0).sum())
    kind = "NaN/Inf" if not ok[0] else "non-positive"
    example = a[~torch.isfinite(a)] if not ok[0] else a[a <= 0]
    raise NonFiniteError(
        f"{what}: {n_bad} of {a.numel()} values are {kind} (e.g. {float(example[0])}); a Gamma/Dirichlet sample "
        "needs finite values > 0. The weights are damaged or training diverged: use an earlier checkpoint"
    )


# Kept out of torch.compile graphs: the rejection loop's sizes depend on the data (a graph break here, compiled code
# around it), and the concentration check reads values on the host.
@torch.compiler.disable
def _gamma_marsaglia_tsang(alpha: Tensor, generator: torch.Generator | None) -> Tensor:
    """Exact ``Gamma(alpha, 1)`` draws (Marsaglia & Tsang 2000) from ``generator``-driven normals and uniforms.

    ``alpha`` (any shape, finite, > 0, no grad) -> same shape. For alpha < 1 the usual boost is used:
    ``G(alpha) = G(alpha + 1) * U^(1/alpha)``. Rejection runs vectorised in rounds over the still-rejected
    elements only (acceptance > 95 % per round), so the number of draws, and hence the result, is a deterministic
    function of the generator state. At most :data:`MAX_GAMMA_ROUNDS` rounds.

    Raises:
        NonFiniteError: ``alpha`` holds NaN/Inf or a value <= 0 (checked up front), or the round bound is hit.
    """
    check_concentration(alpha)
    a = alpha.detach().to(torch.float64 if alpha.dtype == torch.float64 else torch.float32)
    flat = a.reshape(-1)
    boost = flat < 1.0
    d = torch.where(boost, flat + 1.0, flat) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(flat)
    todo = torch.arange(flat.numel(), device=flat.device)
    for _ in range(MAX_GAMMA_ROUNDS):
        if todo.numel() == 0:
            break
        x = noise("normal", (todo.numel(),), generator, flat)
        u = noise("uniform", (todo.numel(),), generator, flat)
        dd, cc = d[todo], c[todo]
        v = (1.0 + cc * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + dd - dd * v + dd * torch.log(v.clamp_min(1e-30)))
        out[todo[ok]] = (dd * v)[ok]
        todo = todo[~ok]
    if todo.numel() > 0:  # unreachable for a checked alpha unless the random source is broken
        raise NonFiniteError(
            f"Gamma sampler: {todo.numel()} of {flat.numel()} draws still rejected after {MAX_GAMMA_ROUNDS} "
            f"rounds (alpha e.g. {float(flat[todo[0]])}); the concentrations or the random generator are broken"
        )
    u = noise("uniform", (flat.numel(),), generator, flat)
    out = torch.where(boost, out * u.pow(1.0 / flat), out)
    return out.clamp_min(torch.finfo(out.dtype).tiny).reshape(alpha.shape)


def sample_gamma(alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Reparameterized ``Gamma(alpha, 1)`` sample whose randomness comes only from ``generator``.

    The value is an exact Marsaglia-Tsang draw; the gradient w.r.t. ``alpha`` is the implicit reparameterization
    gradient ``dg/dalpha = -(dF/dalpha) / p(g)`` (Figurnov et al. 2018), which is what torch's own
    ``Gamma.rsample`` uses (``torch._standard_gamma_grad``). It is valid for any exact sampler because it only needs
    the drawn value, so ``g + (alpha - stop_grad(alpha)) * stop_grad(dg/dalpha)`` has the right value and gradient.
    (``torch.distributions`` ignores generators, hence this route.)

    Raises:
        NonFiniteError: ``alpha`` holds NaN/Inf or a value <= 0 (a NaN would never be accepted by the rejection loop).
    """
    g_work = _gamma_marsaglia_tsang(alpha, generator)  # float32 (float64 for float64 alpha)
    g = g_work.to(alpha.dtype)
    if not alpha.requires_grad:
        return g
    a = alpha.detach()
    grad = torch._standard_gamma_grad(a.to(g_work.dtype), g_work).to(alpha.dtype)
    return g + (alpha - a) * grad


def sample_dirichlet(alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Reparameterized ``Dir(alpha)`` sample over the last dimension: normalised :func:`sample_gamma` draws."""
    g = sample_gamma(alpha, generator)
    return g / g.sum(-1, keepdim=True)


# --- building blocks -------------------------------------------------------------------------------------------


class RaterConvStack(nn.Module):
    """R independent stacks of ``k x k`` convolutions (ReLU between layers, none after the last), stored as stacked
    ``(R, out, in, k, k)`` weights and run for many raters at once as grouped convolutions.

    ``forward(x, raters)``:
        * ``x``: ``(B, Cin, H, W)`` shared by every rater (``shared_input=True``) or ``(B, S, Cin, H, W)`` one input
          per (image, rater) pair.
        * ``raters``: None = all R raters in order (S = R; the stacked weights run as one conv with ``groups=R``
          over the batch), or a ``(B, S)`` long tensor of rater indices (the weights are gathered per pair and run
          with ``groups=B*S`` on a batch of one; unchosen raters still get a (zero) gradient).
        * ``subset``: with ``raters=None``, run the dense path for these raters only (S = len(subset)); for
          ``subset = range(R0)`` the computation is the one a model with R0 raters makes, bitwise.
        * returns ``(B, S, Cout, H, W)``.
    """

    def __init__(self, num_raters: int, channels: Sequence[int], kernel_size: int = 3, shared_input: bool = True):
        super().__init__()
        self.num_raters = num_raters
        self.channels = tuple(int(c) for c in channels)
        self.k = kernel_size
        self.shared_input = shared_input
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for cin, cout in zip(self.channels[:-1], self.channels[1:], strict=True):
            w = torch.empty(num_raters, cout, cin, kernel_size, kernel_size)
            b = torch.empty(num_raters, cout)
            bound = 1.0 / math.sqrt(cin * kernel_size * kernel_size)
            for r in range(num_raters):  # nn.Conv2d's default initialisation, per rater (init only)
                nn.init.kaiming_uniform_(w[r], a=math.sqrt(5))
            nn.init.uniform_(b, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def forward(self, x: Tensor, raters: Tensor | None = None, subset: Sequence[int] | None = None) -> Tensor:
        pad = self.k // 2
        n = len(self.weights)
        if raters is None:
            R = self.num_raters if subset is None else len(subset)
            B = x.shape[0]
            if not self.shared_input:  # (B, R, Cin, H, W) -> (B, R*Cin, H, W)
                x = x.reshape(B, -1, *x.shape[-2:])
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                if subset is not None:  # the dense path over some raters only (rows sliced, same kernels)
                    w, b = _rows(w, subset), _rows(b, subset)
                groups = 1 if (i == 0 and self.shared_input) else R
                x = F.conv2d(x, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=pad, groups=groups)
                if i < n - 1:
                    x = F.relu(x)
            return x.reshape(B, R, self.out_channels, *x.shape[-2:])
        B, S = raters.shape
        H, W = x.shape[-2:]
        x = x.reshape(1, -1, H, W)  # images (or pairs) become conv groups
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            groups = B if (i == 0 and self.shared_input) else B * S
            wg = w[raters].reshape(-1, *w.shape[2:])
            x = F.conv2d(x, wg, b[raters].reshape(-1), padding=pad, groups=groups)
            if i < n - 1:
                x = F.relu(x)
        return x.reshape(B, S, self.out_channels, H, W)


def _sigmoid_into(dst: Tensor, logits: Tensor) -> None:
    """``dst[...] = sigmoid(logits)``: written in place without a temporary, unless a graph is recorded (``out=`` has
    no gradient; ``sample_*(grad=True)``)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        dst[...] = torch.sigmoid(logits)
    else:
        torch.sigmoid(logits, out=dst)


def _sigmoid_into_rows(dst: Tensor, idx: slice | Tensor, logits: Tensor) -> None:
    """``dst[:, idx] = sigmoid(logits)`` for a slice (in place, :func:`_sigmoid_into`) or a long tensor of
    indices along dim 1 (``index_copy_``)."""
    if isinstance(idx, slice):
        _sigmoid_into(dst[:, idx], logits)
    elif torch.is_grad_enabled() and logits.requires_grad:
        dst.index_copy_(1, idx, torch.sigmoid(logits))
    else:
        dst.index_copy_(1, idx, logits.sigmoid_())


def _affine(eps: Tensor, std: Tensor, mu: Tensor) -> Tensor:
    """``Z = eps * std + mu``: in place on the noise buffer when no graph is recorded (sampling); out of place with
    one (``sample_*(grad=True)``), where the runs of samples are views of one noise block and an in-place write into
    one would invalidate what the graph saved of another."""
    if torch.is_grad_enabled() and (std.requires_grad or mu.requires_grad):
        return torch.addcmul(mu, eps, std)
    return eps.mul_(std).add_(mu)


def _gate(out: Tensor, gate: Tensor) -> Tensor:
    """``out * gate`` in place where the gate (broadcast against ``out``) still has a 0 over the batch dim 0 that
    the skip of fully absent samples did not already leave at 0; ``out`` as is otherwise (B = 1)."""
    if out.shape[0] > 1 and not torch.equal(gate.amax(0), gate.amin(0)):
        out.mul_(gate)
    return out


def _rows(t: Tensor, rows: Sequence[int]) -> Tensor:
    """``t[rows]``: a plain slice (a view, contiguous) for a run ``0..n-1``, else an index_select."""
    rows = [int(r) for r in rows]
    if rows == list(range(len(rows))):
        return t[: len(rows)]
    return t[torch.as_tensor(rows, device=t.device)]


def _inverse_softplus(y: Tensor) -> Tensor:
    """``x`` with ``softplus(x) = y`` (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


_TAU_WHAT = "ProSeg's rater concentrations softplus(tau.raw_concentration)"


class TauPosterior(nn.Module):
    """Rater-preference module: ``q(tau | r) = Dir(softplus(raw[r]))`` and the classifier ``p(r | tau)``.

    The raw table is initialised as the reference does for R = 4, D = 8 (1.0 at dims r and r + 4, 0.1 elsewhere),
    generalised as ``1.0 where d % R == r % D``.
    """

    def __init__(self, num_raters: int, tau_dim: int, classifier_hidden: int) -> None:
        super().__init__()
        d = torch.arange(tau_dim)[None, :]
        r = torch.arange(num_raters)[:, None]
        raw = torch.where(d % num_raters == r % tau_dim, 1.0, 0.1)
        self.raw_concentration = nn.Parameter(raw.float())
        self.classifier = nn.Sequential(
            nn.Linear(tau_dim, classifier_hidden), nn.ReLU(inplace=True), nn.Linear(classifier_hidden, num_raters)
        )

    def concentration(self) -> Tensor:
        """``(R, D)`` positive Dirichlet concentrations."""
        return F.softplus(self.raw_concentration)


class PresenceHead(nn.Module):
    """p(y_r is not empty | x) for every rater, as a multiple-instance read-out of a per-pixel map.

    ``forward(feats)``: ``(B, F, h, w)`` -> ``(pixel_logits (B, R, h, w), presence_logits (B, R))``. A 3x3
    convolution (ReLU) and a 1x1 convolution give each rater's map ``m_r`` ("would rater r mark this latent
    pixel?", trained against the rater's mask); a rater drew something if some pixel is marked, so the presence
    logit is ``scale_r * max_pixels m_r + shift_r`` (a per-rater calibration of the map's peak, started at 1 and 0).
    The rater axis is the 1x1 convolution's output and the calibration's rows: every rater is in every step.
    """

    def __init__(self, in_channels: int, hidden: int, num_raters: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.pixel = nn.Conv2d(hidden, num_raters, 1)
        self.scale = nn.Parameter(torch.ones(num_raters))
        self.shift = nn.Parameter(torch.zeros(num_raters))

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        m = self.pixel(F.relu(self.conv(feats)))  # (B, R, h, w)
        return m, m.flatten(2).amax(-1) * self.scale + self.shift


class MaskPosterior(nn.Module):
    """``q(Z | x, r, y)`` of ``z_posterior="mask"``: a residual on the rater's ``p(Z | x, r)`` (the statistic heads).

    ``forward(feats, mask, mu_p)``: ``feats`` ``(N, F, h, w)`` backbone features of each pair's image, ``mask``
    ``(N, s^2, h, w)`` the pair's full-resolution mask folded to the latent resolution (space-to-depth, lossless),
    ``mu_p`` ``(N, Zc, h, w)`` the rater's prior mean -> ``(dmu, dlogvar)``, each ``(N, Zc, h, w)``: q = N(mu_p + dmu,
    exp(logvar_p + dlogvar)). Two 3x3 convolutions with ReLU and a 1x1 output that starts at zero, so training
    starts with q = p (the KL term 0 and every draw what ``z_posterior="rater"`` draws)."""

    def __init__(self, in_channels: int, mask_channels: int, z_channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + mask_channels + z_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * z_channels, 1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.z_channels = int(z_channels)

    def forward(self, feats: Tensor, mask: Tensor, mu_p: Tensor) -> tuple[Tensor, Tensor]:
        d = self.net(torch.cat([feats, mask.to(feats.dtype), mu_p], 1))
        return d[:, : self.z_channels], d[:, self.z_channels:]


class SegHead(nn.Module):
    """``p(y | tau, Z)``: 1x1 convolutions on ``cat([Z, tile(tau)])`` (as batched matmuls, channel-first).

    ``forward(z, tau)``: ``z`` ``(..., H, W, Zc)`` channels-last, ``tau`` ``(..., D)`` with the same leading dims
    (broadcastable) -> logits ``(..., H, W)`` (``(..., outputs, H, W)``, channel-first, with ``outputs > 1``: the
    logits of an ``s x s`` block of full-resolution pixels per latent pixel, see ``ProSeg(scale=s)``).
    ``W1 @ [z; tau] + b1 = W1z @ z + (W1tau @ tau + b1)``: tau's part
    is a per-leading-index bias, so the ``(.., D, H, W)`` tile is never materialised.
    """

    def __init__(self, z_channels: int, tau_dim: int, hidden: int, num_layers: int, outputs: int = 1) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"head_layers must be >= 2, got {num_layers}")
        self.z_channels = z_channels
        self.outputs = int(outputs)
        dims = [z_channels + tau_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.last = nn.Linear(hidden, self.outputs)
        for m in [*self.layers, self.last]:  # Xavier as the reference head
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z: Tensor, tau: Tensor) -> Tensor:
        # Channel-first batched matmuls, W @ h per sample with h (hidden, H*W): every bias is added along the
        # contiguous pixel dim (vectorised; along a last dim of 16 or 5 it was a broadcast copy that cost as much as
        # the matmul), z's channels-last layout is read as a transposed operand without a copy, and the output
        # planes come out contiguous for the full-resolution unfold.
        *lead, H, W, C = z.shape
        first = self.layers[0]
        wz, wt = first.weight[:, : self.z_channels], first.weight[:, self.z_channels:]
        # tau's part as a product and a sum over D, not a matmul: a GEMM's rounding depends on how many rows it gets,
        # and a sample must not change with the number of samples it is drawn beside (the chunk size)
        bias = (tau[..., None, :] * wt).sum(-1) + first.bias  # (..., hidden)
        zt = z.reshape(-1, H * W, C).transpose(1, 2)  # (N, Zc, H*W)
        N = zt.shape[0]
        h = torch.bmm(wz.expand(N, -1, -1), zt)
        h += bias.expand(*lead, bias.shape[-1]).reshape(N, -1, 1)
        h = h.relu_()  # in place: bmm's backward needs its inputs, not its output
        for layer in self.layers[1:]:
            h = torch.bmm(layer.weight.expand(N, -1, -1), h)
            h += layer.bias[:, None]
            h = h.relu_()
        out = torch.bmm(self.last.weight.expand(N, -1, -1), h)
        out += self.last.bias[:, None]
        return out.view(*lead, H, W) if self.outputs == 1 else out.view(*lead, self.outputs, H, W)

    def l2(self) -> Tensor:
        """Sum of the (non-squared) L2 norms of every weight and bias of all layers but the last (the reference's
        ``l2_regularisation(head.layers)``)."""
        total = l2_norm_sum([p for m in self.layers for p in m.parameters()])
        assert total is not None  # num_layers >= 2: at least one layer
        return total


class LightReconDecoder(nn.Module):
    """Small image decoder for p(x|Z): conv3x3-ReLU-conv3x3-ReLU-conv1x1 to the image's C channels."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BackboneReconDecoder(nn.Module):
    """The reference's p(x|Z) decoder: a second backbone on the remapped latent, then a 1x1 conv to C channels."""

    def __init__(self, backbone: str, backbone_cfg: dict[str, Any], in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, in_channels, **backbone_cfg)
        self.out = nn.Conv2d(self.backbone.out_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.backbone(x))


# --- the model ------------------------------------------------------------------------------------------------

_REFERENCE: dict[str, Any] = {
    "backbone": "resnet34_unet",
    "backbone_cfg": {},
    "tau_dim": 8,
    "z_channels": 16,
    "stat_hidden": (16, 32),
    "remap_hidden": (16, 8),
    "remap_channels": 8,
    "recon_decoder": "backbone",
    "head_channels": 16,
    "head_layers": 3,
    "classifier_hidden": 32,
    "alpha0": 1.0,
    "prior_variance": math.e,
    "kl_weight": 0.1,
    "l2_weight": 1e-5,
    "ce_weight": 1.0,
    "recon_weight": 1.0,
    "recon_divide_by_batch": True,
    "rater_sampling": "one",
    "seg_loss": "gdl",
    "diverse_mode": "per_rater",
    "latent_lr": 2e-3,
    "z_logvar_init": None,
    "scale": 1,
    "presence": False,  # the reference has no presence head
    "z_noise_scale": 1,  # its Z is drawn pixel by pixel
}
#: the ``default`` backbone configuration (read-only: a constructor default)
_DEFAULT_BACKBONE_CFG: Mapping[str, Any] = MappingProxyType({"widths": (16, 32, 64, 128)})


@register_model("proseg")
class ProSeg(MultiRaterModel):
    """ProSeg with switchable pieces; see the module docstring for the model and ``PRESETS`` for the presets.

    The defaults are the ``default`` preset (``ProSeg(C, R)`` is ``create_model("proseg", in_channels=C,
    num_raters=R)``); ``reference`` is the reference code's configuration.

    Args:
        in_channels, num_raters: C and R.
        backbone, backbone_cfg: feature extractor (:func:`proseg.models.backbones.create_backbone`); the default is
            the ``unet`` with widths (16, 32, 64, 128): another backbone needs its own ``backbone_cfg`` (``{}``: its
            defaults).
        tau_dim: D, dimension of the rater-preference simplex.
        z_channels: channels of the pixel-wise ambiguity latent Z.
        stat_hidden: hidden widths of each rater's statistic head (3x3 convs; output ``2 * z_channels``).
        remap_hidden, remap_channels: hidden widths and output width of each rater's remap head (Z -> decoder).
        recon_decoder: ``"backbone"`` (second backbone, ``recon_backbone``/``recon_backbone_cfg``, default the main
            backbone's) or ``"light"`` (:class:`LightReconDecoder` with ``recon_hidden`` channels).
        head_channels, head_layers: width and number of 1x1 layers of p(y|tau,Z).
        classifier_hidden: hidden width of p(r|tau).
        alpha0: symmetric Dirichlet prior concentration. prior_variance: variance of Z's Gaussian prior (the
            reference's is e: it stores 1.0 as a log-variance).
        kl_weight, l2_weight, ce_weight, recon_weight: loss weights (``loss = seg + kl_weight * (kl_tau + kl_z) +
            ce_weight * ce + recon_weight * recon + l2_weight * l2``).
        recon_divide_by_batch: divide the reconstruction MSE by the batch size (the reference does).
        rater_sampling: ``"one"`` (per image one present rater, uniformly, as the reference) or ``"all"`` (every
            present rater; absent ones get weight 0).
        seg_loss: ``gdl`` (pooled generalized Dice as the reference), ``gdl_per_sample``, ``bce``, ``gdl+bce``.
        diverse_mode: ``"prior_classifier"`` (paper: tau ~ prior, rater from p(r|tau), Z from that rater's q) or
            ``"per_rater"`` (reference: K split evenly over the raters, tau ~ prior, Z from each rater's q).
        diverse_rater: with ``prior_classifier``, ``"argmax"`` or ``"sample"`` the rater from p(r|tau).
        latent_lr: learning rate of the tau module (concentrations + classifier) in :meth:`param_groups`; None = lr.
        channels_last: run convolutions in channels-last memory format (faster on CPU).
        z_logvar_init: initial bias of the statistic heads' log-variance outputs (None: the convolution default,
            logvar ~ 0, so Z starts as unit noise around mu and the head first sees mostly noise). A negative value
            (e.g. -4) starts Z close to mu, so the segmentation head learns from the features at once and the KL
            term widens q(Z|x,r) as training goes.
        scale: s, the resolution factor of everything after the input: the image is folded into ``C * s^2``
            channels at ``H/s x W/s`` (space-to-depth, lossless; sizes not divisible by s are padded by edge
            replication and cropped back), the backbone, the heads and Z run at that resolution, and the
            segmentation head predicts the ``s x s`` block of full-resolution logits of each latent pixel, so masks
            and losses stay at full resolution. s = 2 costs about a quarter of s = 1. p(x|Z) reconstructs the
            folded image (the same MSE as at full resolution).
        scale_head: how the head's logits reach full resolution for s > 1: ``"smooth"`` (a coarse logit upsampled
            bilinearly plus learned per-pixel corrections that start at zero, so training starts without 2x2
            block artefacts) or ``"shuffle"`` (depth-to-space of ``s^2`` logits only).
        train_samples: K, Z draws per (image, rater) pair in a training step (the segmentation loss averages
            over them; tau is drawn once per pair).
        es_weight: weight of the energy score of the K draws against the rater's mask
            (:func:`proseg.losses.energy_score`; needs ``train_samples >= 2``): a proper scoring rule whose
            pairwise term makes Z's samples disagree where the rater's boundary is uncertain, instead of
            collapsing q(Z|x,r) onto its mean.
        seg_on: what the segmentation loss scores: ``"sample"`` (the K draws of Z, the ELBO's expectation) or
            ``"mean"`` (one pass at Z = the posterior mean; the draws are then scored by the energy score alone,
            so ``es_weight > 0`` is required). ``"mean"`` trains the personalized mean as the default does while
            the energy score sets Z's spread around it.
        z_noise_scale: f, the resolution of Z's noise: each standard-normal draw is shared by an ``f x f`` block
            of latent pixels (drawn at ``ceil(h/f) x ceil(w/f)``, nearest-upsampled, cropped), in training and
            sampling alike. Every pixel's marginal stays ``N(mu, std^2)`` (the KL term is unchanged), but
            neighbouring pixels move together, so one draw can shift a stretch of boundary instead of flickering
            pixel by pixel, and a sample costs f^2 fewer normals. 1 = pixel-wise noise. The default 2 was chosen on
            the validation parts (docs/results.md): level with 1 on LIDC, better on QUBIQ, and 52 samples cost
            0.84-0.88x (same-process A/B; the normals were a third of them).
        presence: model whether each rater drew anything, the discrete part of the ambiguity: a presence head
            (:class:`PresenceHead`, ``presence_hidden`` channels) predicts ``pi_r(x) = p(y_r not empty | x)`` and is
            trained with binary cross-entropy (weight ``presence_weight``; plus the pixel-wise BCE of its per-rater map
            against the mask at the latent resolution) on every present rater of every image; the
            segmentation path (p(y|tau,Z), q(Z|x,r), the reconstruction and tau's terms) then learns p(y | x, r, y not
            empty) from the pairs whose mask is not empty (``rater_sampling="one"`` draws among those raters). Every
            sample draws its presence ~ Bernoulli(pi_r(x)) (one uniform per sample, shared over a batch with
            ``share_latent``); an absent sample is the empty mask (probability 0 everywhere). Without it, a rater's
            samples are empty all together or not at all, as the head's mean decides.
        presence_temperature: inference only: each sample's presence is drawn from ``sigmoid(logit / T)`` (T < 1
            sharpens pi towards 0 or 1; 0 = present exactly when pi > 1/2, the same for every sample). An
            inference-time argument, like ``z_temperature``; the default 0.35 was chosen on the LIDC validation part
            (docs/results.md): against 0.5 (the third session's) it kept GED and Dice_soft and brought d_pp within
            10 % of d_aa (9 % over, from 12 %); 0.5 had beaten T = 1 on Dice_soft and per-rater Dice at the same GED.
        presence_bias: inference only: b added to the presence logit before the temperature, ``sigmoid((logit + b)
            / T)`` (b < 0 draws fewer non-empty samples). pi is calibrated on the training part; where the raters'
            drawing rate differs between the data a model is trained and used on, b corrects it without retraining.
        z_temperature: inference only (training is unchanged): Z is drawn with ``z_temperature`` times the
            posterior's standard deviation in every sampling call (0 = the posterior mean). An inference-time
            argument (``INFERENCE_ARGS``): ``proseg evaluate --model-arg z_temperature=2`` changes it on a trained
            checkpoint, so it can be chosen on the validation part.
        z_posterior: what Z is drawn from in training. ``"rater"``: ``q(Z|x,r)``, the statistic heads, with the KL term
            to ``N(0, prior_variance)`` (the paper and the reference). ``"mask"``: a conditional VAE as in the
            Probabilistic U-Net: a posterior ``q(Z|x,r,y)`` (:class:`MaskPosterior`, ``posterior_hidden`` channels)
            also sees the rater's mask, the statistic heads become the learned conditional prior ``p(Z|x,r)``, and the
            KL term is ``KL(q(Z|x,r,y) || p(Z|x,r))``. Sampling draws Z from ``p(Z|x,r)`` in both cases. With
            ``"mask"`` Z can encode how this rater's boundary on this image departs from what p predicts, and p's
            variance is fitted to that departure (with ``"rater"`` nothing in the loss rewards spread, and q narrows
            where Z's noise would hurt). On LIDC the prior did not follow the posterior (docs/results.md): an option.
        personalized_z_temperature: inference only: the Z temperature of :meth:`sample_personalized` (None = the
            same ``z_temperature`` as every other sampling call): the diverse samples keep Z's spread while each
            rater's personalized output is drawn narrower (0: at Z's mean).
    """

    supports_personalized = True
    supports_diverse = True
    INFERENCE_ARGS = ("diverse_mode", "diverse_rater", "z_temperature", "personalized_z_temperature",
                      "presence_temperature", "presence_bias")
    #: the constructor's former defaults, newest change first: a model.json written before a change names none of
    #: its arguments, and load_model rebuilds it with them (cumulatively: a file older than both changes gets both)
    LEGACY_DEFAULTS = (
        {"z_noise_scale": 1},  # before the fifth session of 2026-12-02: pixel-wise Z noise
        {"presence": False},  # before the third session of 2026-12-02: no presence head
        {"scale": 1, "diverse_mode": "prior_classifier"},  # before 2026-12-02: full resolution, the paper's mode
    )

    PRESETS: dict[str, dict[str, Any]] = {
        "reference": _REFERENCE,
        # The constructor's defaults, chosen on the validation part (docs/results.md): the reference's
        # hyper-parameters with a small U-Net backbone, the light reconstruction decoder instead of a second
        # ResNet-34 U-Net, prior variance 1, one rater per image and step, q(Z|x,r) started narrow (logvar -4),
        # everything after the input at half resolution (scale 2: space-to-depth in, a smooth full-resolution
        # logit head out), Z's noise shared over 2x2 latent pixels, a presence head and the reference's per-rater
        # diverse split; about a sixteenth of the reference's step.
        "default": {},
        "tiny": {
            **_REFERENCE,
            "backbone": "unet",
            "backbone_cfg": {"widths": (8, 16)},
            "tau_dim": 4,
            "z_channels": 4,
            "stat_hidden": (8, 8),
            "remap_hidden": (8,),
            "remap_channels": 4,
            "recon_decoder": "light",
            "recon_hidden": 8,
            "head_channels": 8,
            "classifier_hidden": 8,
            "prior_variance": 1.0,
            "recon_divide_by_batch": False,
            "rater_sampling": "all",
            "diverse_mode": "prior_classifier",
            "presence": True,  # so that the shared model tests reach the presence head
            "presence_hidden": 4,
        },
    }

    def __init__(
        self,
        in_channels: int,
        num_raters: int,
        backbone: str = "unet",
        backbone_cfg: Mapping[str, Any] | None = _DEFAULT_BACKBONE_CFG,
        tau_dim: int = 8,
        z_channels: int = 16,
        stat_hidden: Sequence[int] = (16, 32),
        remap_hidden: Sequence[int] = (16, 8),
        remap_channels: int = 8,
        recon_decoder: str = "light",
        recon_backbone: str | None = None,
        recon_backbone_cfg: dict[str, Any] | None = None,
        recon_hidden: int = 16,
        head_channels: int = 16,
        head_layers: int = 3,
        classifier_hidden: int = 32,
        alpha0: float = 1.0,
        prior_variance: float = 1.0,
        kl_weight: float = 0.1,
        l2_weight: float = 1e-5,
        ce_weight: float = 1.0,
        recon_weight: float = 1.0,
        recon_divide_by_batch: bool = False,
        rater_sampling: str = "one",
        seg_loss: str = "gdl",
        diverse_mode: str = "per_rater",
        diverse_rater: str = "argmax",
        latent_lr: float | None = 2e-3,
        channels_last: bool = False,
        z_logvar_init: float | None = -4.0,
        scale: int = 2,
        scale_head: str = "smooth",
        train_samples: int = 1,
        es_weight: float = 0.0,
        seg_on: str = "sample",
        z_temperature: float = 1.0,
        personalized_z_temperature: float | None = None,
        z_noise_scale: int = 2,
        z_posterior: str = "rater",
        posterior_hidden: int = 16,
        presence: bool = True,
        presence_hidden: int = 16,
        presence_weight: float = 1.0,
        presence_temperature: float = 0.35,
        presence_bias: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_raters)
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
        if int(train_samples) != train_samples or train_samples < 1:
            raise ValueError(f"train_samples must be an integer >= 1, got {train_samples!r}")
        if es_weight < 0 or (es_weight > 0 and train_samples < 2):
            raise ValueError(f"es_weight={es_weight} needs es_weight >= 0 and, when > 0, train_samples >= 2 "
                             f"(the energy score compares samples), got train_samples={train_samples}")
        if seg_on not in ("sample", "mean") or (seg_on == "mean" and es_weight <= 0):
            raise ValueError(f"seg_on must be 'sample' or 'mean' ('mean' needs es_weight > 0: without the energy "
                             f"score nothing would score Z's draws), got seg_on={seg_on!r}, es_weight={es_weight}")
        self.seg_on = seg_on
        if scale_head not in ("smooth", "shuffle"):
            raise ValueError(f"scale_head must be 'smooth' or 'shuffle', got {scale_head!r}")
        self.scale, self.train_samples, self.es_weight = int(scale), int(train_samples), float(es_weight)
        self.scale_head = scale_head
        if not (math.isfinite(z_temperature) and z_temperature >= 0):
            raise ValueError(f"z_temperature must be a finite number >= 0, got {z_temperature!r}")
        self.z_temperature = float(z_temperature)
        if personalized_z_temperature is not None and not (
                math.isfinite(personalized_z_temperature) and personalized_z_temperature >= 0):
            raise ValueError(f"personalized_z_temperature must be None or a finite number >= 0, "
                             f"got {personalized_z_temperature!r}")
        self.personalized_z_temperature = (None if personalized_z_temperature is None
                                           else float(personalized_z_temperature))
        if int(z_noise_scale) != z_noise_scale or z_noise_scale < 1:
            raise ValueError(f"z_noise_scale must be an integer >= 1, got {z_noise_scale!r}")
        self.z_noise_scale = int(z_noise_scale)
        if z_posterior not in ("rater", "mask"):
            raise ValueError(f"z_posterior must be 'rater' or 'mask', got {z_posterior!r}")
        self.z_posterior = z_posterior
        if presence_weight < 0:
            raise ValueError(f"presence_weight must be >= 0, got {presence_weight}")
        self.presence, self.presence_weight = bool(presence), float(presence_weight)
        if not (math.isfinite(presence_temperature) and presence_temperature >= 0):
            raise ValueError(f"presence_temperature must be a finite number >= 0, got {presence_temperature!r}")
        self.presence_temperature = float(presence_temperature)
        if not math.isfinite(presence_bias):
            raise ValueError(f"presence_bias must be a finite number, got {presence_bias!r}")
        self.presence_bias = float(presence_bias)
        check_rater_sampling(rater_sampling)
        if diverse_mode not in ("prior_classifier", "per_rater"):
            raise ValueError(f"diverse_mode must be 'prior_classifier' or 'per_rater', got {diverse_mode!r}")
        if diverse_rater not in ("argmax", "sample"):
            raise ValueError(f"diverse_rater must be 'argmax' or 'sample', got {diverse_rater!r}")
        if recon_decoder not in ("backbone", "light"):
            raise ValueError(f"recon_decoder must be 'backbone' or 'light', got {recon_decoder!r}")
        if alpha0 <= 0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        get_loss(seg_loss)  # an unknown name fails here, not at the first step
        self.prior_logvar = log_variance(prior_variance)
        self.alpha0 = float(alpha0)
        self.z_channels = int(z_channels)
        self.tau_dim = int(tau_dim)
        self.kl_weight, self.l2_weight = float(kl_weight), float(l2_weight)
        self.ce_weight, self.recon_weight = float(ce_weight), float(recon_weight)
        self.recon_divide_by_batch = bool(recon_divide_by_batch)
        self.rater_sampling, self.seg_loss_kind = rater_sampling, seg_loss
        self.diverse_mode, self.diverse_rater = diverse_mode, diverse_rater
        self.latent_lr = latent_lr
        self.channels_last = bool(channels_last)

        folded = in_channels * self.scale ** 2  # the image's channels after space-to-depth
        self.backbone = create_backbone(backbone, folded, **dict(backbone_cfg or {}))
        feat = int(self.backbone.out_channels)
        self.tau = TauPosterior(num_raters, tau_dim, classifier_hidden)
        self.presence_head = PresenceHead(feat, presence_hidden, num_raters) if self.presence else None
        self.stat_heads = RaterConvStack(num_raters, (feat, *stat_hidden, 2 * z_channels), shared_input=True)
        if z_logvar_init is not None:
            with torch.no_grad():
                self.stat_heads.biases[-1][:, z_channels:] = float(z_logvar_init)
        self.posterior = (MaskPosterior(feat, self.scale ** 2, z_channels, posterior_hidden)
                          if z_posterior == "mask" else None)
        self.remap_heads = RaterConvStack(num_raters, (z_channels, *remap_hidden, remap_channels), shared_input=False)
        if recon_decoder == "backbone":
            self.recon: nn.Module = BackboneReconDecoder(
                recon_backbone or backbone,
                dict(recon_backbone_cfg if recon_backbone_cfg is not None else (backbone_cfg or {})),
                remap_channels,
                folded,
            )
        else:
            self.recon = LightReconDecoder(remap_channels, folded, recon_hidden)
        smooth = self.scale > 1 and self.scale_head == "smooth"
        self.head = SegHead(z_channels, tau_dim, head_channels, head_layers,
                            outputs=self.scale ** 2 + (1 if smooth else 0))
        if smooth:  # start from the upsampled coarse logit; the per-pixel corrections are learned from zero
            with torch.no_grad():
                self.head.last.weight[1:].zero_()
                self.head.last.bias[1:].zero_()
        if self.channels_last:
            for prm in self.parameters():  # the 4D conv weights (the stacked per-rater ones are 5D)
                if prm.ndim == 4:
                    prm.data = prm.data.contiguous(memory_format=torch.channels_last)

    # --- shared pieces ------------------------------------------------------------------------------------------
    def _fold(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C s^2, ceil(H/s), ceil(W/s))``: edge-padded to a multiple of s, space-to-depth
        (the identity for s = 1)."""
        s = self.scale
        if s == 1:
            return images
        H, W = images.shape[-2:]
        ph, pw = -H % s, -W % s
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph), mode="replicate")
        return F.pixel_unshuffle(images, s)

    def _unfold(self, t: Tensor, size: tuple[int, int]) -> Tensor:
        """The head's latent-resolution logits to full resolution, cropped to ``size``: ``(..., s^2, h, w)``
        (``scale_head="shuffle"``: depth-to-space) or ``(..., 1 + s^2, h, w)`` (``"smooth"``: bilinear upsampling
        of the first plane plus depth-to-space of the others) -> ``(..., H, W)``; ``(..., h, w)`` as is for s = 1."""
        s = self.scale
        if s == 1:
            return t
        *lead, _, h, w = t.shape
        if self.scale_head == "smooth":
            up = F.interpolate(t[..., 0, :, :].reshape(-1, 1, h, w), scale_factor=s, mode="bilinear",
                               align_corners=False)
            # the corrections' depth-to-space, (.., a, b, h, w) -> (.., h, a, w, b), is read straight into the
            # upsampled map (one pass, no copy)
            corr = t[..., 1:, :, :].unflatten(-3, (s, s)).permute(*range(len(lead)), -2, -4, -1, -3)
            t = up.view(*lead, h, s, w, s).add_(corr)
            return t.view(*lead, h * s, w * s)[..., : size[0], : size[1]]
        t = t.unflatten(-3, (s, s)).permute(*range(len(lead)), -2, -4, -1, -3).reshape(*lead, h * s, w * s)
        return t[..., : size[0], : size[1]]

    def _logits(self, z: Tensor, tau: Tensor, size: tuple[int, int]) -> Tensor:
        """p(y|tau, Z) at full resolution: ``z`` ``(..., h, w, Zc)``, ``tau`` ``(..., D)`` -> ``(..., H, W)``."""
        return self._unfold(self.head(z, tau), size)

    def _features(self, images: Tensor) -> Tensor:
        with record_function("proseg.backbone"):
            images = self._fold(images)
            # channels-last also whenever no graph is recorded (sampling): oneDNN's inference convolutions are
            # 1.2-1.3x faster on it at these widths, and without a backward nothing pays for the layout change
            if self.channels_last or not torch.is_grad_enabled():
                images = images.contiguous(memory_format=torch.channels_last)
            return self.backbone(images)

    def _stats(self, feats: Tensor, raters: Tensor | None,
               subset: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Per-pair ``(mu, logvar)``, each ``(B, S, H, W, Zc)`` channels-last-contiguous."""
        with record_function("proseg.stat_heads"):
            s = self.stat_heads(feats, raters, subset)  # (B, S, 2Zc, H, W)
            s = s.permute(0, 1, 3, 4, 2).contiguous()
            return s[..., : self.z_channels], s[..., self.z_channels:]

    def _latent_marks(self, masks: Tensor) -> Tensor:
        """Masks ``(B, R, H, W)`` at the latent resolution ``(B, R, ceil(H/s), ceil(W/s))``: a latent pixel is marked
        if one of its ``s x s`` pixels is (the edge padding of :meth:`_fold` repeats the edge pixels)."""
        B, R = masks.shape[:2]
        folded = self._fold(masks)  # (B, R s^2, h, w), rater-major
        return folded.view(B, R, self.scale ** 2, *folded.shape[-2:]).amax(2)

    def _prior_tau(self, shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
        alpha = torch.full((*shape, self.tau_dim), self.alpha0, dtype=like.dtype, device=like.device)
        return sample_dirichlet(alpha, generator)

    def _presence_gate(self, feats: Tensor, raters: Tensor | None, shape: Sequence[int],
                       generator: torch.Generator | None) -> Tensor | None:
        """Each sample's presence ~ Bernoulli(pi_r(x)) (``presence``; None without it): ``shape`` = ``(lead, S, K)``
        uniforms from ``generator`` (lead = B, or 1 to share them over the batch) against pi of the rater of every
        sample, ``raters`` ``(B, S, K)`` (or None: rater s for column s) -> ``(B, S, K)`` floats in {0, 1}."""
        if self.presence_head is None:
            return None
        with record_function("proseg.sample.presence"):
            logit = self.presence_head(feats)[1].float()  # (B, R)
            t = self.presence_temperature
            if self.presence_bias:
                logit = logit + self.presence_bias
            pi = (logit > 0).float() if t == 0 else torch.sigmoid(logit if t == 1 else logit / t)
            pi = pi[:, :, None] if raters is None else pi.gather(1, raters.flatten(1)).view(raters.shape)
            u = noise("uniform", tuple(shape), generator, pi)
            return (u < pi).to(feats.dtype)

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Negative ELBO + L2 (+ the energy score of K Z draws), averaged over the (image, rater) pairs that are
        used and present.

        Returns ``loss`` and the terms ``seg``, ``kl_tau``, ``kl_z``, ``ce``, ``recon``, ``l2``, with
        ``es_weight > 0`` ``es`` and with ``presence`` ``presence`` (undetached).
        Randomness (the rater choice with ``rater_sampling="one"``, tau and Z) comes from ``generator`` (the
        global RNG when None).
        """
        image, masks, present = self._check_batch(batch)
        B = masks.shape[0]
        H, W = image.shape[-2:]
        feats = self._features(image)
        # "one": one present rater per image, uniformly (an image without any gets weight 0); "all": every rater.
        # With presence, the segmentation path learns p(y | x, r, not empty): only the raters that drew something
        drew = masks.flatten(2).amax(-1) > 0 if self.presence else None  # (B, R)
        pair_raters = present & drew if drew is not None else present
        rater_idx, used, target = training_pairs(masks, pair_raters, self.rater_sampling, generator,
                                                 pick="multinomial")
        weight = used.to(image.dtype)  # (B, S)
        stat_raters = rater_idx if self.rater_sampling == "one" else None  # None: the dense all-rater path
        S = rater_idx.shape[1]

        with record_function("proseg.tau"):  # q(tau|r), its KL and the classifier's cross-entropy
            conc = self.tau.concentration().to(image.dtype)  # (R, D)
            check_concentration(conc, _TAU_WHAT)  # names the parameter; the sampler's own check could not
            alpha = conc[rater_idx]  # (B, S, D)
            tau = sample_dirichlet(alpha, generator)
            kl_tau = weighted_mean(dirichlet_kl(alpha, self.alpha0), weight)
            ce_pairs = F.cross_entropy(self.tau.classifier(tau).reshape(B * S, -1), rater_idx.reshape(-1),
                                       reduction="none")
            ce = weighted_mean(ce_pairs, weight.reshape(-1))

        mu, logvar = self._stats(feats, stat_raters)  # (B, S, h, w, Zc), h = H / scale
        if self.posterior is not None:  # "mask": (mu, logvar) is the prior p(Z|x,r); Z comes from q(Z|x,r,y)
            mu_q, logvar_q = self._mask_posterior(feats, target, mu, logvar)
        else:
            mu_q, logvar_q = mu, logvar
        K = self.train_samples
        with record_function("proseg.z_sample"):
            if K == 1:
                z = self._sample_z(mu_q, logvar_q, generator)
            else:  # K draws per pair: (B, S, K, h, w, Zc)
                shape = (B, S, K, *mu.shape[2:])
                z = self._sample_z(mu_q[:, :, None].expand(shape), logvar_q[:, :, None].expand(shape), generator)
        with record_function("proseg.loss.kl_z"):
            kl_el = (gaussian_kl(mu_q, logvar_q, mu, logvar) if self.posterior is not None
                     else gaussian_kl(mu, logvar, 0.0, self.prior_logvar))
            kl_z = weighted_mean(kl_el.mean(dim=(2, 3, 4)), weight)

        with record_function("proseg.seg_head"):
            logits = self._logits(z, tau if K == 1 else tau[:, :, None], (H, W))  # (B, S[, K], H, W)
        with record_function("proseg.loss.seg"):
            if self.seg_on == "mean":  # one more head pass, at Z's posterior mean
                with record_function("proseg.seg_head"):
                    mean_logits = self._logits(mu_q, tau, (H, W))  # (B, S, H, W)
                seg = segmentation_loss(self.seg_loss_kind, mean_logits.reshape(-1, H, W), target.reshape(-1, H, W),
                                        weight.reshape(-1))
            else:
                flat_w = weight.reshape(-1) if K == 1 else weight[:, :, None].expand(B, S, K).reshape(-1)
                flat_t = target if K == 1 else target[:, :, None].expand(B, S, K, H, W)
                seg = segmentation_loss(self.seg_loss_kind, logits.reshape(-1, H, W), flat_t.reshape(-1, H, W),
                                        flat_w)
        terms: dict[str, Tensor] = {}
        if self.presence_head is not None and drew is not None:
            with record_function("proseg.presence"):  # every present rater, not just the pair's
                pix, pres_logits = self.presence_head(feats)  # (B, R, h, w), (B, R)
                marked = self._latent_marks(masks)
                pix_bce = F.binary_cross_entropy_with_logits(pix.float(), marked.float(), reduction="none")
                bce = F.binary_cross_entropy_with_logits(pres_logits.float(), drew.float(), reduction="none")
                terms["presence"] = weighted_mean(bce + pix_bce.mean(dim=(2, 3)), present.float())
        if self.es_weight > 0:
            with record_function("proseg.loss.energy"):
                terms["es"] = energy_score(torch.sigmoid(logits).reshape(B * S, K, H, W),
                                           target.reshape(B * S, H, W), weight.reshape(-1))

        x_hat = self._decode_image(z if K == 1 else z[:, :, 0], stat_raters)  # (B, S, C s^2, h, w)
        with record_function("proseg.loss.recon"):
            mse_pairs = (x_hat.float() - self._fold(image).float()[:, None]).pow(2).mean(dim=(2, 3, 4))
            recon = weighted_mean(mse_pairs, weight)
            if self.recon_divide_by_batch:
                recon = recon / B

        with record_function("proseg.loss.l2"):
            l2 = self.head.l2()
            total = (seg + self.kl_weight * (kl_tau + kl_z) + self.ce_weight * ce + self.recon_weight * recon
                     + self.l2_weight * l2)
            if "es" in terms:
                total = total + self.es_weight * terms["es"]
            if "presence" in terms:
                total = total + self.presence_weight * terms["presence"]
        return {"loss": total, "seg": seg, "kl_tau": kl_tau, "kl_z": kl_z, "ce": ce, "recon": recon, "l2": l2,
                **terms}

    def _mask_posterior(self, feats: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
        """``q(Z|x,r,y)`` of ``z_posterior="mask"``: ``feats`` ``(B, F, h, w)``, ``target`` ``(B, S, H, W)`` the pairs'
        masks, ``mu``/``logvar`` ``(B, S, h, w, Zc)`` the raters' prior -> the posterior's ``(mu, logvar)``, same
        shape and layout."""
        assert self.posterior is not None
        B, S, h, w, zc = mu.shape
        with record_function("proseg.posterior"):
            f = feats[:, None].expand(B, S, *feats.shape[1:]).reshape(B * S, *feats.shape[1:])
            y = self._fold(target.reshape(B * S, 1, *target.shape[-2:]))  # (B S, s^2, h, w)
            dmu, dlv = self.posterior(f, y, mu.reshape(B * S, h, w, zc).permute(0, 3, 1, 2))
            dmu = dmu.permute(0, 2, 3, 1).reshape(B, S, h, w, zc)
            dlv = dlv.permute(0, 2, 3, 1).reshape(B, S, h, w, zc)
            return mu + dmu, logvar + dlv

    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """p(x|Z) for every rater with one Z draw each: ``(B, R, C, H, W)`` (a diagnostic; the loss uses it)."""
        self._check_images(images)
        B, H, W = images.shape[0], *images.shape[-2:]
        mu, logvar = self._stats(self._features(images), None)
        x = self._decode_image(self._sample_z(mu, logvar, generator), None)  # (B, R, C s^2, h, w)
        if self.scale > 1:
            x = F.pixel_shuffle(x.reshape(-1, *x.shape[2:]), self.scale)[..., :H, :W]
            x = x.reshape(B, self.num_raters, self.in_channels, H, W)
        return x

    def _sample_std(self, logvar: Tensor, temperature: float | None = None) -> Tensor:
        """The standard deviation of Z at inference: ``temperature * exp(logvar / 2)`` (None: ``z_temperature``)."""
        t = self.z_temperature if temperature is None else temperature
        std = torch.exp(0.5 * logvar)
        return std if t == 1.0 else std.mul_(t)

    def _noise_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the noise behind a Z of ``shape`` ``(..., h, w, Zc)``: ``(..., ceil(h/f), ceil(w/f), Zc)``."""
        f = self.z_noise_scale
        *lead, h, w, zc = shape
        return (*lead, -(-h // f), -(-w // f), zc)

    def _spread(self, eps: Tensor, h: int, w: int) -> Tensor:
        """Noise ``(..., ceil(h/f), ceil(w/f), Zc)`` -> ``(..., h, w, Zc)``, each draw repeated over its ``f x f``
        block (``z_noise_scale``); the identity for f = 1."""
        f = self.z_noise_scale
        if f == 1:
            return eps
        *lead, hf, wf, zc = eps.shape
        up = eps[..., :, None, :, None, :].expand(*lead, hf, f, wf, f, zc).reshape(*lead, hf * f, wf * f, zc)
        return up[..., :h, :w, :]

    def _draw_z(self, mu: Tensor, std: Tensor, generator: torch.Generator | None) -> Tensor:
        """One draw ``Z = mu + std * eps`` (``mu``, ``std`` ``(..., h, w, Zc)``), eps at ``z_noise_scale``."""
        h, w = mu.shape[-3:-1]
        return torch.addcmul(mu, std, self._spread(noise("normal", self._noise_shape(mu.shape), generator, mu), h, w))

    def _sample_z(self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None) -> Tensor:
        """One draw ``Z = mu + exp(logvar / 2) * eps`` per element: the posterior itself (training)."""
        return self._draw_z(mu, torch.exp(0.5 * logvar), generator)

    def _decode_image(self, z: Tensor, raters: Tensor | None) -> Tensor:
        """p(x|Z): ``z`` ``(B, S, H, W, Zc)`` channels-last through each pair's remap head (``raters`` ``(B, S)``, or
        None = all R in order) and the reconstruction decoder -> ``(B, S, C s^2, H, W)`` (the folded image at the
        latent's resolution H x W)."""
        B, S, H, W = z.shape[:4]
        with record_function("proseg.remap_recon"):
            remap = self.remap_heads(z.permute(0, 1, 4, 2, 3), raters)  # (B, S, Cr, H, W)
            remap = remap.reshape(B * S, *remap.shape[2:])
            if self.channels_last:
                remap = remap.contiguous(memory_format=torch.channels_last)
            return self.recon(remap).reshape(B, S, self.in_channels * self.scale ** 2, H, W)

    # --- sampling -----------------------------------------------------------------------------------------------
    def sample_personalized(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
        raters: Sequence[int] | None = None,
    ) -> Tensor:
        """tau ~ q(tau|r), Z ~ q(Z|x,r) for every rater r: ``(B, R, K, H, W)`` probabilities (Z's spread at
        ``personalized_z_temperature`` when it is set).

        The backbone and the R statistic heads run once per image; each extra sample costs one Z draw and the 1x1
        head. ``share_latent=True`` draws tau once per (rater, sample) for the whole batch. ``raters``: only these
        raters, in this order (``(B, len(raters), K, H, W)``); ``raters=range(R0)`` on a model that got raters
        with :meth:`add_rater` draws exactly what the R0-rater model drew with the same generator.
        """
        self._check_sampling(images, num_samples)
        subset = None if raters is None else [int(r) for r in raters]
        if subset is not None and (not subset or any(not 0 <= r < self.num_raters for r in subset)):
            raise ValueError(f"raters must be a non-empty list of rater indices 0..{self.num_raters - 1}, "
                             f"got {list(raters or [])}")
        B, K = images.shape[0], int(num_samples)
        R = self.num_raters if subset is None else len(subset)
        feats = self._features(images)
        mu, logvar = self._stats(feats, None, subset)  # (B, R, H, W, Zc)
        conc = self.tau.concentration().to(mu.dtype)
        if subset is not None:
            conc = _rows(conc, subset)
        check_concentration(conc, _TAU_WHAT)
        lead = 1 if share_latent else B
        with record_function("proseg.sample.tau"):
            tau = sample_dirichlet(conc[None, :, None].expand(lead, R, K, self.tau_dim).contiguous(), generator)
        cols = None if subset is None else torch.as_tensor(subset, device=mu.device)[None, :, None].expand(B, R, K)
        gate = self._presence_gate(feats, cols, (lead, R, K), generator)
        return self._per_rater_samples(mu, logvar, tau, generator, images.shape[-2:], gate,
                                       self.personalized_z_temperature)

    def _per_rater_samples(self, mu: Tensor, logvar: Tensor, tau: Tensor, generator: torch.Generator | None,
                           size: Sequence[int], gate: Tensor | None = None,
                           temperature: float | None = None) -> Tensor:
        """``mu``/``logvar`` ``(B, R, h, w, Zc)``, ``tau`` ``(B or 1, R, K, D)`` -> ``(B, R, K, H, W)`` probabilities
        (``size`` = (H, W)), Z ~ N(mu_r, exp(logvar_r)) drawn per sample. ``gate`` ``(B, R, K)`` in {0, 1}
        (:meth:`_presence_gate`) empties samples. ``temperature``: Z's (:meth:`_sample_std`).

        Without a gate, sample k's noise for all (image, rater) pairs comes from one seed and Z is broadcast from the
        per-rater statistics, never gathered. With a gate, each (rater, sample) has its own seed, and a (rater,
        sample) that no image of the batch keeps draws no noise and runs no head: on LIDC about half of the samples
        are empty, and they cost nothing. The kept samples are exactly what they would be without the skip."""
        B, R = mu.shape[:2]
        H, W = int(size[0]), int(size[1])
        K = tau.shape[2]
        std = self._sample_std(logvar, temperature)
        tau = tau.expand(B, R, K, self.tau_dim)
        h, w = mu.shape[2:4]
        if gate is None:
            std, mu = std[:, :, None], mu[:, :, None]
            out = mu.new_empty(B, R, K, H, W)
            for k, eps in self._noise_blocks(K, mu[:, :, 0].shape, mu, generator):
                with record_function("proseg.sample.z"):
                    # without a graph the noise (or its fresh f x f spread) becomes Z in place
                    z = _affine(self._spread(eps.permute(1, 2, 0, 3, 4, 5), h, w), std, mu)
                with record_function("proseg.sample.seg_head"):
                    _sigmoid_into(out[:, :, k], self._logits(z, tau[:, :, k], (H, W)))
            return out
        tau = tau.reshape(B, R * K, self.tau_dim)
        out = mu.new_zeros(B, R, K, H, W)
        flat = out.view(B, R * K, H, W)
        keep = gate.amax(0).flatten() > 0  # (R K,), rater-major
        # runs never cross a rater (group = K samples), so each run's Z is broadcast from one rater's statistics
        for idx, eps in self._noise_blocks(R * K, mu[:, 0].shape, mu, generator, keep, group=K):
            r = int(idx[0]) // K
            with record_function("proseg.sample.z"):
                z = _affine(self._spread(eps.transpose(0, 1), h, w), std[:, r, None], mu[:, r, None])
            with record_function("proseg.sample.seg_head"):
                _sigmoid_into_rows(flat, idx, self._logits(z, tau.index_select(1, idx), (H, W)))
        return _gate(out, gate[..., None, None])

    def _noise_blocks(self, K: int, zshape: Sequence[int], like: Tensor, generator: torch.Generator | None,
                      keep: Tensor | None = None, group: int = 0) -> Iterator[tuple[slice | Tensor, Tensor]]:
        """Yield ``(idx, eps)`` over K samples in runs whose Z (one sample: ``zshape`` ``(..., h, w, Zc)``) is
        L2-sized (:meth:`_chunks`); ``eps`` ``(n, *noise_shape)`` standard normals in ``like``'s dtype and device
        (:meth:`_noise_shape`: at ``z_noise_scale``) for the samples ``idx``: a ``slice`` of ``0..K-1``, or with
        ``keep`` (``(K,)`` bool) a long tensor of the kept samples only (the others draw nothing). Sample k is drawn
        from its own seed (:func:`normal_from_seeds`; the seeds of all K are drawn), so the samples never depend on
        the chunking, the thread count or which other samples are kept; with more than one CPU thread the draws of
        up to 8 MiB of samples at a time run in parallel. ``group`` > 0 (with ``keep``): no yielded run crosses a
        multiple of ``group`` (the samples ``g * group .. (g + 1) * group - 1`` share their statistics)."""
        shape, numel = self._noise_shape(zshape), math.prod(zshape)
        with record_function("proseg.sample.z"):
            seeds = sample_seeds(K, generator, like)
        order = None
        if keep is not None:
            order = keep.nonzero()[:, 0]
            seeds = [seeds[i] for i in order.tolist()]
        device = generator.device if generator is not None else like.device
        parallel = device.type == "cpu" and torch.get_num_threads() > 1  # else draw each run where it is used
        for b0, b1 in self._chunks(len(seeds), numel, budget=1 << 21 if parallel else 1 << 18):
            with record_function("proseg.sample.z"):
                eps = normal_from_seeds(seeds[b0:b1], shape, like, device)
            for k0, k1 in self._chunks(b1 - b0, numel):
                a, b = b0 + k0, b0 + k1
                if order is None:
                    yield slice(a, b), eps[k0:k1]
                    continue
                idx = order[a:b]
                if group:  # split the run where its samples change group
                    cuts = ((idx[1:] // group != idx[:-1] // group).nonzero()[:, 0] + 1).tolist()
                    for c0, c1 in zip([0, *cuts], [*cuts, b - a], strict=True):
                        yield idx[c0:c1], eps[k0 + c0:k0 + c1]
                else:
                    yield idx, eps[k0:k1]

    @staticmethod
    def _chunks(K: int, per_sample: int, budget: int = 1 << 18) -> list[tuple[int, int]]:
        """Split K samples into runs whose Z holds at most ``budget`` elements (1 MiB of fp32: keeps the head's
        intermediates in the L2 cache, 1.1-1.25x faster than 8 MiB runs for 52 samples of a 128² image, and the
        peak memory flat in K); ``per_sample`` is the element count of one sample's Z."""
        step = max(1, budget // max(1, per_sample))
        return [(k, min(K, k + step)) for k in range(0, K, step)]

    def sample_diverse(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """The population: ``(B, K, H, W)`` probabilities, tau from the symmetric Dirichlet prior.

        ``diverse_mode="prior_classifier"`` (paper): rater = argmax (or a draw, ``diverse_rater="sample"``) of
        p(r|tau), Z ~ q(Z|x, rater). ``"per_rater"`` (reference): the K samples are split evenly over the raters in
        order (the first K mod R raters get one more), Z ~ q(Z|x, r). With ``share_latent=True`` tau and the chosen
        rater are shared across the batch.
        """
        self._check_sampling(images, num_samples)
        B, R, K = images.shape[0], self.num_raters, int(num_samples)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        feats = self._features(images)
        mu, logvar = self._stats(feats, None)  # (B, R, h, w, Zc)
        lead = 1 if share_latent else B
        if self.diverse_mode == "per_rater":
            # ceil(K/R) prior samples for every rater through the broadcast path, then keep the first
            # K//R (+1 for the first K mod R raters) of each rater, in rater order
            per = -(-K // R)
            with record_function("proseg.sample.tau"):
                tau = self._prior_tau((lead, R, per), generator, mu)
            gate = self._presence_gate(feats, None, (lead, R, per), generator)
            out = self._per_rater_samples(mu, logvar, tau, generator, size, gate).reshape(B, R * per, *size)
            if K == R * per:  # every rater got ceil(K/R): nothing to drop
                return out
            counts = K // R + (torch.arange(R, device=mu.device) < K % R).long()  # (R,)
            keep = (torch.arange(per, device=mu.device)[None, :] < counts[:, None]).reshape(-1).nonzero()[:, 0]
            return out.index_select(1, keep)
        with record_function("proseg.sample.tau"):
            tau = self._prior_tau((lead, K), generator, mu)  # (lead, K, D)
            if self.diverse_rater == "argmax":
                rater = self.tau.classifier(tau).argmax(-1)
            else:
                p = torch.softmax(self.tau.classifier(tau).float(), -1).reshape(lead * K, R)
                u = noise("uniform", (lead * K, 1), generator, p)  # inverse-CDF draw from the generator
                rater = (p.cumsum(-1) < u).sum(-1).clamp_max(R - 1).reshape(lead, K)
        rater = rater.expand(B, K)
        tau = tau.expand(B, K, self.tau_dim)
        gate = self._presence_gate(feats, rater[:, None], (lead, 1, K), generator)
        zc = self.z_channels
        std_mu = torch.cat([self._sample_std(logvar), mu], -1)  # (B, R, H, W, 2Zc): one gather per chunk
        bidx = torch.arange(B, device=mu.device)[:, None]
        # a sample that no image keeps draws no noise and runs no head (:meth:`_per_rater_samples`)
        keep = None if gate is None else gate[:, 0].amax(0) > 0
        out = mu.new_empty(B, K, *size) if gate is None else mu.new_zeros(B, K, *size)
        h, w = mu.shape[2:4]
        for idx, eps in self._noise_blocks(K, mu[:, 0].shape, mu, generator, keep):
            with record_function("proseg.sample.z"):
                sm = std_mu[bidx, rater[:, idx]]  # (B, k, H, W, 2Zc)
                z = _affine(self._spread(eps.transpose(0, 1), h, w), sm[..., :zc], sm[..., zc:])  # (B, k, H, W, Zc)
            with record_function("proseg.sample.seg_head"):
                _sigmoid_into_rows(out, idx, self._logits(z, tau[:, idx], size))
        return out if gate is None else _gate(out, gate[:, 0, :, None, None])

    # --- optimisation ---------------------------------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Two groups: everything but the tau module at ``lr`` with ``weight_decay``; the tau module (Dirichlet
        concentrations + classifier) at ``latent_lr`` (the reference: 2e-3 vs 5e-5) without weight decay."""
        tau_ids = {id(p) for p in self.tau.parameters()}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in tau_ids]
        latent = [p for p in self.tau.parameters() if p.requires_grad]
        return [
            {"params": main, "lr": lr, "weight_decay": weight_decay},
            {"params": latent, "lr": self.latent_lr if self.latent_lr is not None else lr, "weight_decay": 0.0},
        ]

    # --- the rater style space and new raters (docs/adaptation.md) ----------------------------------------------
    def rater_tensors(self) -> list[tuple[str, nn.Module, str]]:
        """Per-rater tensors (rater axis first): tau's concentration row, the classifier's output row, the presence
        head's output row (``presence``), and every stacked weight / bias of the statistic and remap heads."""
        out: list[tuple[str, nn.Module, str]] = [("tau.raw_concentration", self.tau, "raw_concentration")]
        last = self.tau.classifier[-1]
        out += [(f"tau.classifier.{len(self.tau.classifier) - 1}.{a}", last, a) for a in ("weight", "bias")]
        if self.presence_head is not None:
            head = self.presence_head
            out += [(f"presence_head.pixel.{a}", head.pixel, a) for a in ("weight", "bias")]
            out += [(f"presence_head.{a}", head, a) for a in ("scale", "shift")]
        for stack_name in ("stat_heads", "remap_heads"):
            stack = getattr(self, stack_name)
            for kind in ("weights", "biases"):
                plist = getattr(stack, kind)
                out += [(f"{stack_name}.{kind}.{i}", plist, str(i)) for i in range(len(plist))]
        return out

    def prior_rater_rows(self) -> dict[str, Tensor]:
        """``init="prior"``: q(tau|new) = the prior Dir(alpha0), and q(Z|x,new) = the prior N(0, prior_variance)
        (the statistic head's last layer outputs mu = 0, logvar = log prior_variance; its earlier layers and the
        remap head start from the mean of the raters)."""
        raw = _inverse_softplus(torch.full((self.tau_dim,), self.alpha0))
        last = len(self.stat_heads.weights) - 1
        w = self.stat_heads.weights[last]
        b = torch.zeros(w.shape[1])
        b[self.z_channels:] = float(self.prior_logvar)
        return {"tau.raw_concentration": raw, f"stat_heads.weights.{last}": torch.zeros(w.shape[1:]),
                f"stat_heads.biases.{last}": b}

    def _after_add_rater(self) -> None:
        self.tau.classifier[-1].out_features = self.num_raters
        self.stat_heads.num_raters = self.num_raters
        self.remap_heads.num_raters = self.num_raters
        if self.presence_head is not None:
            self.presence_head.pixel.out_channels = self.num_raters

    def tau_positions(self) -> dict[str, Tensor]:
        """The learned raters in tau-space: ``concentration`` ``(R, D)`` (softplus of the raw table), ``mean``
        ``(R, D)`` (the posterior means ``a_r / sum a_r``) and ``total`` ``(R,)`` (``sum a_r``: the larger, the more
        consistent the rater's style)."""
        with torch.no_grad():
            conc = self.tau.concentration().detach().float().cpu()
        total = conc.sum(-1)
        return {"concentration": conc, "mean": conc / total[:, None], "total": total}

    def interpolate(self, rater_a: int, rater_b: int, t: float) -> Tensor:
        """A posterior between two raters: the ``(D,)`` concentration ``(1 - t) a_A + t a_B`` (t in [0, 1]; its
        mean moves on the straight line between the two posterior means when both have the same total). Use it
        with :meth:`sample_tau`."""
        for r in (rater_a, rater_b):
            if not 0 <= int(r) < self.num_raters:
                raise ValueError(f"rater {r} is not one of the model's raters 0..{self.num_raters - 1}")
        with torch.no_grad():
            conc = self.tau.concentration().detach()
        return (1.0 - float(t)) * conc[int(rater_a)] + float(t) * conc[int(rater_b)]

    def sample_tau(
        self,
        images: Tensor,
        tau: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        rater: int | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """Segmentations for an explicit rater style: ``(B, T, H, W)`` probabilities (eval mode, no grad).

        Args:
            tau: ``(T, D)`` points on the simplex (one sample each; rows are renormalised), or a ``(D,)`` Dirichlet
                concentration (e.g. :meth:`interpolate`): ``T = num_samples`` draws tau ~ Dir(tau) (per image, or
                once for the batch with ``share_latent``).
            rater: whose q(Z|x, r) gives the boundary latent; None = per tau the argmax of the classifier p(r|tau)
                (as ``sample_diverse``).
        """
        self._check_sampling(images, num_samples)
        with eval_mode(self), torch.no_grad():
            B = images.shape[0]
            feats = self._features(images)
            mu, logvar = self._stats(feats, None)  # (B, R, H, W, Zc)
            tau = tau.to(mu)
            if tau.ndim == 1:
                if tau.shape[0] != self.tau_dim:
                    raise ValueError(f"a concentration must have tau_dim={self.tau_dim} entries, "
                                     f"got {tuple(tau.shape)}")
                check_concentration(tau, "sample_tau's concentration")
                lead = 1 if share_latent else B
                taus = sample_dirichlet(tau.expand(lead, int(num_samples), self.tau_dim).contiguous(), generator)
            elif tau.ndim == 2 and tau.shape[1] == self.tau_dim:
                if bool((tau < 0).any()) or not bool(torch.isfinite(tau).all()):
                    raise ValueError("tau points must be finite and >= 0 (points on the simplex)")
                taus = (tau / tau.sum(-1, keepdim=True).clamp_min(1e-12))[None]
            else:
                raise ValueError(f"tau must be (T, {self.tau_dim}) points or a ({self.tau_dim},) concentration, "
                                 f"got {tuple(tau.shape)}")
            T = taus.shape[1]
            if rater is None:
                rat = self.tau.classifier(taus).argmax(-1)  # (lead, T)
            else:
                if not 0 <= int(rater) < self.num_raters:
                    raise ValueError(f"rater {rater} is not one of the model's raters 0..{self.num_raters - 1}")
                rat = torch.full(taus.shape[:2], int(rater), dtype=torch.long, device=mu.device)
            rat = rat.expand(B, T)
            taus = taus.expand(B, T, self.tau_dim)
            bidx = torch.arange(B, device=mu.device)[:, None]
            m, lv = mu[bidx, rat], logvar[bidx, rat]  # (B, T, H, W, Zc)
            gate = self._presence_gate(feats, rat[:, None], (1 if share_latent else B, 1, T), generator)
            z = self._draw_z(m, self._sample_std(lv), generator)
            out = torch.sigmoid(self._logits(z, taus, images.shape[-2:]))
            return out if gate is None else out.mul_(gate[:, 0, :, None, None])

