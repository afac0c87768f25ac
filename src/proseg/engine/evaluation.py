"""Sampling and scoring of whole cases: the evaluation loop shared by ``proseg evaluate`` and validation.

A *case* is a volume of the prepared store (a 2D source is a volume of one slice). Each case is predicted in
one call over its slices with ``share_latent=True`` (one image-global latent per volume, pixel-wise latents
per slice) and scored as a volume. Sampling uses a ``torch.Generator`` seeded from (seed, case_id), so the
numbers do not depend on the number of processes or the order in which cases are visited; cases are sharded
``ids[rank::world]`` across DDP ranks and the per-case records gathered.

Modes:
    * ``personalized``: ``sample_personalized`` gives ``(R, K, *S)``; rater r's prediction is the mean of its K
      samples, so the case is scored with R predictions against R labels (index-aligned per-rater Dice).
    * ``diverse``: ``sample_diverse`` gives ``(K, *S)``, scored as K predictions against the labels.
Raters absent from a case (``rater_present`` False on every slice) are dropped from its labels and, in the
personalized mode, their predictions too, so index alignment is kept. A case with no present rater is skipped
and counted.

Besides the ``case_metrics`` keys, every record has a ``subset`` tag (:data:`SUBSETS`, :func:`case_subset`):
``every_rater_drew`` (every present rater's mask is non-empty somewhere in the case) or ``some_rater_empty``
(at least one present rater's mask is empty); personalized records also have ``ambiguity_share``
(:func:`proseg.metrics.calibration.ambiguity_share` of the present raters' raw samples ``(N, K, *S)``; the same
value under every convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from proseg.engine.allocator import keep_freed_memory
from proseg.engine.distributed import all_gather_objects
from proseg.engine.seeding import case_seed
from proseg.engine.types import CaseData
from proseg.errors import ConfigError, DataError
from proseg.metrics import DEFAULT_THRESHOLDS, case_metrics
from proseg.metrics.calibration import ambiguity_share
from proseg.metrics.case import LIST_KEYS
from proseg.models.base import MultiRaterModel, NotSupportedError
from proseg.progress import Progress

MODES = ("personalized", "diverse")
# Higher-is-better unless listed here.
LOWER_IS_BETTER = {"ged", "ged_cross", "ged_labels", "ged_preds", "brier", "brier_fg", "ece"}
SUBSETS = ("every_rater_drew", "some_rater_empty")
"""The ``subset`` tag of a record: whether every present rater drew something in the case."""


def case_generator(seed: int, case_id: str, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, case_id)`` (:func:`proseg.engine.seeding.case_seed`)."""
    g = torch.Generator(device=device)
    g.manual_seed(case_seed(seed, case_id))
    return g


def supports(model: MultiRaterModel, mode: str) -> bool:
    """Whether the model has ``mode``: its ``supports_<mode>`` flag (every :class:`MultiRaterModel` has both)."""
    return bool(getattr(model, f"supports_{mode}", False))


def resolve_modes(model: MultiRaterModel, modes: Sequence[str], strict: bool) -> list[str]:
    """The requested modes the model supports; ``strict`` raises for an unsupported one instead of dropping it."""
    out = []
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
        if supports(model, m):
            out.append(m)
        elif strict:
            raise NotSupportedError(f"{model.model_name or type(model).__name__} has no {m} output")
    if not out:
        raise NotSupportedError(f"{model.model_name or type(model).__name__} supports none of the modes {list(modes)}")
    return out


@torch.inference_mode()
def sample_volume(model: MultiRaterModel, images: Tensor, mode: str, num_samples: int, generator: torch.Generator,
                  batch_size: int) -> Tensor:
    """Sample a volume's slices with one shared image-global latent.

    Args:
        images: ``(D, C, H, W)`` on the model's device.
        mode: ``personalized`` or ``diverse``.
    Returns:
        ``(R, K, D, H, W)`` (personalized) or ``(K, D, H, W)`` (diverse) probabilities, float32.

    A volume with more than ``batch_size`` slices is predicted in chunks; the generator is rewound to the
    same state before each chunk so every chunk draws the same image-global latent.
    """
    fn = model.sample_personalized if mode == "personalized" else model.sample_diverse
    d = images.shape[0]
    start_state = generator.get_state()
    outs = []
    for s in range(0, d, batch_size):
        generator.set_state(start_state)
        outs.append(fn(images[s : s + batch_size], num_samples=num_samples, generator=generator,
                       share_latent=True).float())
    out = torch.cat(outs, dim=0)  # (D, R, K, H, W) or (D, K, H, W)
    return out.movedim(0, -3)


def score_case(labels: Tensor, preds: Tensor, conventions: Sequence[str], estimator: str,
               thresholds: Sequence[float]) -> dict[str, dict[str, Any]]:
    """``{convention: case_metrics(...)}`` for labels ``(N, *S)`` in {0,1} and predictions ``(M, *S)``."""
    return {c: case_metrics(labels, preds, convention=c, estimator=estimator, thresholds=tuple(thresholds))
            for c in conventions}


def _per_rater_slots(rec: dict[str, Any], present: Any) -> dict[str, Any]:
    """Per-rater lists in rater slots: the metrics see only the N present raters, so their lists have N entries;
    here they get one entry per rater of the model (R), NaN for an absent rater, so that ``aggregate`` (which skips
    NaN) averages rater r over the cases where r drew, instead of mixing raters by list position."""
    slots = [bool(p) for p in present]
    if all(slots):
        return rec
    for key in LIST_KEYS:
        vals = rec.get(key)
        if isinstance(vals, list) and len(vals) == sum(slots):
            it = iter(vals)
            rec[key] = [next(it) if p else math.nan for p in slots]
    return rec


def case_subset(labels: Tensor) -> str:
    """``"every_rater_drew"`` if each of the present raters' masks ``(N, *S)`` has a foreground pixel, else
    ``"some_rater_empty"``."""
    drew = labels.reshape(labels.shape[0], -1).amax(dim=1) > 0
    return SUBSETS[0] if bool(drew.all()) else SUBSETS[1]


def _squeeze_2d(x: Tensor) -> Tensor:
    # A one-slice volume is a 2D case: (N, 1, H, W) -> (N, H, W).
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x


def evaluate_cases(
    model: MultiRaterModel,
    cases: Sequence[str],
    load_case: Callable[[str], CaseData],
    *,
    modes: Sequence[str],
    num_samples: int,
    conventions: Sequence[str] = ("standard",),
    estimator: str = "v",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
    batch_size: int = 32,
    keep: set[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], int]:
    """Sample and score ``cases`` (sharded over ranks), gather the records on every rank.

    Args:
        cases: case ids in a fixed order; ``load_case(case_id) -> CaseData``.
        keep: case ids whose images, labels and samples are returned for figures (on every rank).
    Returns:
        ``(records, kept, skipped)``: one record per (case, mode, convention) in case order, with the
        ``case_metrics`` keys plus ``case_id``, ``mode``, ``subset``, ``convention``, ``num_labels``,
        ``num_predictions`` (and ``ambiguity_share`` in the personalized mode);
        the kept cases' arrays; the number of cases skipped because no rater annotated them.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    keep_freed_memory()  # sampling allocates the same large buffers for every case (engine/allocator.py)
    mine = list(cases)[rank::world_size]
    records: list[dict[str, Any]] = []
    kept: dict[str, dict[str, Any]] = {}
    skipped = 0
    # progress (rank 0): a bar on a terminal, a plain `case N/M` line now and then in a log file
    bar = Progress(len(mine), "evaluate", "case", enabled=progress)
    try:
        for key in mine:
            case: CaseData = load_case(key)
            present = torch.as_tensor(case.present, dtype=torch.bool)
            if not bool(present.any()):
                skipped += 1
                bar.update(1)
                continue
            images = torch.as_tensor(case.images, dtype=torch.float32, device=device)
            labels_all = torch.as_tensor(case.masks, device=device).movedim(1, 0).float()  # (R, D, H, W)
            labels = labels_all[present.to(device)]
            subset = case_subset(labels)
            keep_this = keep is not None and case.case_id in keep
            if keep_this:
                kept[case.case_id] = {"image": case.images, "masks": case.masks, "present": case.present}
            for mode in modes:
                gen = case_generator(seed, f"{case.case_id}\x00{mode}", device)
                samples = sample_volume(model, images, mode, num_samples, gen, batch_size)
                if mode == "personalized":
                    if samples.shape[0] != labels_all.shape[0]:
                        raise DataError(f"model predicts {samples.shape[0]} raters but case {case.case_id} has "
                                         f"{labels_all.shape[0]}")
                    preds = samples.mean(dim=1)[present.to(device)]  # (N, D, H, W)
                    extra = {"ambiguity_share": ambiguity_share(samples[present.to(device)])}
                else:
                    preds = samples  # (K, D, H, W)
                    extra = {}
                if keep_this:
                    kept[case.case_id][mode] = samples.cpu().numpy()
                scores = score_case(_squeeze_2d(labels), _squeeze_2d(preds), conventions, estimator, thresholds)
                for conv, m in scores.items():
                    rec = {"case_id": case.case_id, "mode": mode, "subset": subset, "convention": conv,
                           "num_labels": int(labels.shape[0]), "num_predictions": int(preds.shape[0])}
                    rec.update({k: _plain(v) for k, v in m.items() if k not in rec})
                    rec.update(extra)
                    records.append(_per_rater_slots(rec, case.present))
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    gathered = all_gather_objects((records, kept, skipped))
    all_records = [r for recs, _, _ in gathered for r in recs]
    id_order = {c: i for i, c in enumerate(cases)}
    all_records.sort(key=lambda r: (id_order.get(r["case_id"], len(id_order)), MODES.index(r["mode"]),
                                    r["convention"]))
    all_kept: dict[str, dict[str, Any]] = {}
    for _, kp, _ in gathered:
        all_kept.update(kp)
    return all_records, all_kept, sum(s for _, _, s in gathered)


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else [float(x) for x in v.flatten().tolist()]
    if isinstance(v, np.ndarray):
        return v.item() if v.size == 1 else [float(x) for x in v.flatten().tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def selection_score(summary: dict[str, dict[str, float]], metric: str) -> tuple[float, bool]:
    """The model-selection score and whether higher is better.

    ``dice`` is the reference's validation criterion: the mean of Dice_max (averaged over both directions, as
    the reference's ``validate`` does) and Dice_soft. Any other name is a key of the summary.
    """
    if metric == "dice":
        dm = 0.5 * (summary["dice_max"]["mean"] + summary["dice_max_reverse"]["mean"])
        return 0.5 * (dm + summary["dice_soft"]["mean"]), True
    if metric not in summary:
        raise ConfigError(f"train.val_metric={metric!r} is not a metric key; keys: dice, {', '.join(sorted(summary))}")
    return summary[metric]["mean"], metric not in LOWER_IS_BETTER
