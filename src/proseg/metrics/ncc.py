"""S_NCC of PHiSeg (Baumgartner et al., MICCAI 2019), matching ``variance_ncc_dist`` in
baumgach/PHiSeg-code ``utils.py`` (snapshot ``c43f3b3``) for two classes.

There, ``sample_arr`` holds the ``M`` sampled *softmax* maps and ``gt_arr`` the ``N`` one-hot labels, and

- ``CE(s, t) = −Σ_c t_c · log(s_c + 1e-8)`` per pixel (``pixel_wise_xent``, eps inside the log);
- ``E_ss = mean_j CE(s_j, s̄)`` with ``s̄ = mean_j s_j`` (the expected cross-entropy between the samples
  and their mean: the model's own uncertainty map);
- ``E_sy[i] = mean_j CE(s_j, y_i)`` (the expected cross-entropy between the samples and label ``i``);
- ``S_NCC = mean_i NCC(E_ss, E_sy[i])`` with ``NCC(a, v) = Σ (a − ā)(v − v̄) / (P · std(a) · std(v))``,
  population standard deviations over all ``P`` pixels (``np.correlate`` of the normalised maps).

For binary segmentation the two-class softmax of a foreground probability ``p`` is ``(1 − p, p)``, so with
``L1 = mean_j log(p_j + eps)`` and ``L0 = mean_j log(1 − p_j + eps)``:
``E_ss = −[(1 − p̄)·L0 + p̄·L1]`` and ``E_sy[i] = −[(1 − y_i)·L0 + y_i·L1]``, which is what is computed
here without materialising the ``N × M × P`` array of the original. 3D volumes are flattened
(the correlation does not depend on the pixel order, so for 2D this is the original computation).

Higher is better. When either map is constant over the image (e.g. all samples binary and identical, so
``E_ss`` is ``−log(1 + 1e-8)`` everywhere), the correlation is undefined and the result is NaN, as in the
original (which divides by a zero standard deviation). With binary samples that disagree somewhere the value
is defined but dominated by the ``log(1e-8)`` terms; S_NCC is meant for soft samples.
"""

from __future__ import annotations

import torch

from proseg.metrics.inputs import flatten_cases

PHISEG_EPS = 1e-8


# Elements per temporary in the chunked log pass: small enough to stay in the allocator's cache (a fresh
# multi-MB buffer per call costs page faults that dominate the arithmetic).
_CHUNK_ELEMS = 1 << 20


def _mean_logs(preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_j log(p_j + eps)`` and ``mean_j log((1 − p_j) + eps)`` over the sample dim -> ``(..., P)`` each.

    Chunked over pixels (never over samples or raters); in PHiSeg's order of operations: ``log((1 − p) + eps)``.
    """
    m, p = preds.shape[-2], preds.shape[-1]
    rows = max(1, preds[..., :1].numel() // m) * m  # elements per pixel column across leading dims and samples
    step = max(1, _CHUNK_ELEMS // rows)
    log1, log0 = [], []
    for c in range(0, p, step):
        x = preds[..., c : c + step]
        log1.append((x + PHISEG_EPS).log_().mean(-2))
        log0.append((1.0 - x).add_(PHISEG_EPS).log_().mean(-2))
    return torch.cat(log1, -1), torch.cat(log0, -1)


def s_ncc_from_flat(labels: torch.Tensor, preds_soft: torch.Tensor) -> torch.Tensor:
    """S_NCC from flattened labels ``(..., N, P)`` (0/1) and soft predictions ``(..., M, P)`` -> ``(...)`` float64.

    The ``M × P`` logarithms are taken in the predictions' precision (float32 for float32 samples, as PHiSeg
    does with its float32 softmax outputs); everything of size ``P`` after the mean over samples is float64.
    """
    log1, log0 = (t.to(torch.float64) for t in _mean_logs(preds_soft))  # (..., P)
    p_bar = preds_soft.mean(-2).to(torch.float64)
    y = labels.to(torch.float64)
    e_ss = -((1.0 - p_bar) * log0 + p_bar * log1)  # (..., P)
    e_sy = -((1.0 - y) * log0.unsqueeze(-2) + y * log1.unsqueeze(-2))  # (..., N, P)
    a = e_ss - e_ss.mean(-1, keepdim=True)
    v = e_sy - e_sy.mean(-1, keepdim=True)
    std_a = a.pow(2).mean(-1).sqrt()  # (...)
    std_v = v.pow(2).mean(-1).sqrt()  # (..., N)
    num = (a.unsqueeze(-2) * v).mean(-1)  # (..., N)
    ncc = num / (std_a.unsqueeze(-1) * std_v)  # 0/0 -> NaN on purpose (undefined correlation)
    return ncc.mean(-1)


def s_ncc(labels: object, preds: object, *, batched: bool = False) -> torch.Tensor:
    """PHiSeg's S_NCC of one case (or a batch of cases).

    Args:
        labels: ``(N, *S)`` binary masks (``(B, N, *S)`` with ``batched``).
        preds: ``(M, *S)`` foreground probabilities (the soft samples, not binarised).
        batched: leading case dimension present.

    Returns:
        float64 tensor of shape ``()`` or ``(B,)``; NaN where a map has zero variance.
    """
    flat = flatten_cases(labels, preds, batched=batched)
    return s_ncc_from_flat(flat.labels, flat.preds_soft)
