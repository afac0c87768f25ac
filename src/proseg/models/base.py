"""The small API every proseg model exposes, and weight save/load (safetensors + JSON)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

import proseg
from proseg.errors import CheckpointError, ProsegError, ProsegWarning
from proseg.fsutil import atomic_write_bytes
from proseg.jsonio import dumps
from proseg.models.registry import create_model, get_model_class

Batch = dict[str, Tensor]


class NotSupportedError(NotImplementedError):
    """The model has no notion of the requested output (e.g. a personalized sample from Prob. U-Net)."""


#: the sampling calls of the API; every subclass's own definitions are wrapped by :func:`_inference_call`
SAMPLING_METHODS: tuple[str, ...] = ("sample_personalized", "sample_diverse")
_WRAPPED = "__proseg_inference_call__"
_ACTIVE = "_proseg_sampling_active"
_CONTRACT_NOTE = ("Runs with every submodule in eval mode and under ``torch.no_grad()`` (``grad=True``: the caller's "
                  "grad mode), and leaves every training flag, parameter and buffer as it found them.")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule of ``model`` in eval mode inside the ``with`` block; afterwards (also after an exception) each
    submodule gets back its own ``training`` flag exactly.

    The flags are set and restored directly, not through ``model.train(mode)``: a model may override ``train``
    (D-Persona keeps its frozen stage-1 parts in eval mode while the rest trains), and one ``train(mode)`` call cannot
    restore such a mixed state.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _inference_call(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap a sampling method so that it runs in eval mode (:func:`eval_mode`) and under ``torch.no_grad()`` unless
    the caller passes ``grad=True`` (then the caller's grad mode applies: inside ``torch.no_grad()`` still no graph).
    A nested sampling call on the same model (an override calling ``super()`` or the other sampler) runs under the
    outer call's settings."""
    if getattr(fn, _WRAPPED, False):
        return fn
    sig = inspect.signature(fn)
    passes_grad = "grad" in sig.parameters  # an implementation that wants to know (the base's do); others don't

    @functools.wraps(fn)
    def call(self: MultiRaterModel, *args: Any, grad: bool = False, **kwargs: Any) -> Tensor:
        if passes_grad:
            kwargs["grad"] = grad
        if self.__dict__.get(_ACTIVE, False):
            return fn(self, *args, **kwargs)
        self.__dict__[_ACTIVE] = True  # plain attribute: not a buffer, not in the state dict
        try:
            with eval_mode(self), torch.set_grad_enabled(bool(grad) and torch.is_grad_enabled()):
                return fn(self, *args, **kwargs)
        finally:
            self.__dict__[_ACTIVE] = False

    if not passes_grad:  # show the keyword-only ``grad`` in help() / inspect.signature
        ps = list(sig.parameters.values())
        at = next((i for i, p in enumerate(ps) if p.kind is inspect.Parameter.VAR_KEYWORD), len(ps))
        ps.insert(at, inspect.Parameter("grad", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"))
        sig = sig.replace(parameters=ps)
    call.__signature__ = sig  # type: ignore[attr-defined]
    if "grad=True" not in (fn.__doc__ or ""):  # help(model.sample_...) states the contract for every model
        call.__doc__ = (inspect.cleandoc(fn.__doc__ or "") + "\n\n" + _CONTRACT_NOTE).strip()
    setattr(call, _WRAPPED, True)
    return call


class MultiRaterModel(nn.Module):
    """Base class of every registered model.

    Conventions shared by all models:
        * ``batch["image"]``: ``(B, C, H, W)`` float; ``batch["masks"]``: ``(B, R, H, W)`` float in {0, 1};
          ``batch["rater_present"]``: ``(B, R)`` bool. A rater that is absent for a case contributes nothing
          to the loss (not even as an empty mask).
        * Outputs of the sampling calls are foreground **probabilities** in [0, 1] (sigmoid or softmax of
          the logits), on the input's device and dtype.
        * Randomness only from the ``generator`` argument (or the global RNG when it is None), so two calls
          with equally seeded generators return identical tensors.
        * ``share_latent=True`` draws each image-global latent (ProSeg's tau, Prob. U-Net's z ...) once per
          (rater, sample) and shares it across the batch dimension: the batch is then the slices of one
          volume, predicted slice by slice with one latent per volume. Pixel-wise latents stay per slice.
        * No Python loop over the batch or over raters; per-rater modules are batched modules that run for
          all raters, so every parameter receives a gradient each step (DDP without unused parameters).
        * Inference contract: :meth:`sample_personalized` / :meth:`sample_diverse` run with every submodule in
          eval mode (BatchNorm uses its running statistics, dropout is off) whatever mode the caller left the model
          in, restore each submodule's ``training`` flag afterwards, never change a parameter or buffer, and run
          under ``torch.no_grad()`` unless called with ``grad=True``. So ``model.train()`` and ``model.eval()``
          give identical samples, and sampling in the middle of training changes nothing. Every subclass gets this
          from ``__init_subclass__``, which wraps its own definitions of the two methods; implementations need no
          ``grad`` parameter of their own.
        * The constructor's defaults are the recommended model: ``Cls(C, R)`` builds what
          ``create_model(name, in_channels=C, num_raters=R)`` builds (its ``default`` preset is ``{}``); the other
          presets (``tiny``, ``reference`` ...) are keyword arguments on top of the defaults.

    Capability flags ``supports_personalized`` / ``supports_diverse``: whether :meth:`sample_personalized` /
    :meth:`sample_diverse` exist (else they raise :class:`NotSupportedError`). They are plain ``bool`` attributes: a
    class attribute where the answer is the same for every instance, and an instance attribute of the same name,
    assigned in ``__init__`` (and wherever the deciding state changes), where it depends on the configuration or
    state (CM: ``diverse_from_raters``; D-Persona: its stage and ``trained_stage``, see ``DPersona.set_stage``).
    Read them from the instance (``model.supports_personalized``).

    A new rater (few-shot adaptation, ``docs/adaptation.md``): models with per-rater parameters list them in
    :meth:`rater_tensors` (rater axis first); then :meth:`add_rater` appends a rater (R -> R + 1, ``init_config``
    too), :meth:`rater_parameters` names the tensors holding one rater's parameters and
    :meth:`freeze_except_rater` makes only that rater's rows trainable (gradient masks on the stacked tensors).
    """

    model_name: str = ""
    supports_personalized: bool = False
    supports_diverse: bool = False
    PRESETS: dict[str, dict[str, Any]] = {"default": {}}
    #: constructor defaults the class had before they changed, one dict per change, newest first: a checkpoint whose
    #: weights do not fit the current defaults is rebuilt with the former values of the arguments its model.json
    #: does not name, trying the newest change first and then each older one on top (``load_model``, with a
    #: warning). Files written since every argument is recorded (``create_model``) never need it.
    LEGACY_DEFAULTS: tuple[dict[str, Any], ...] = ()
    #: constructor arguments that only change how samples are drawn, never the weights: ``load_model(...,
    #: inference_args=...)`` (``proseg evaluate/predict --model-arg``) may replace them in a trained checkpoint
    INFERENCE_ARGS: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in SAMPLING_METHODS:  # the inference contract holds for every model, not by each one's care
            fn = cls.__dict__.get(name)
            if fn is not None and inspect.isfunction(fn):
                setattr(cls, name, _inference_call(fn))

    def __init__(self, in_channels: int, num_raters: int) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_raters < 1:
            raise ValueError(f"num_raters must be >= 1, got {num_raters}")
        self.in_channels = in_channels
        self.num_raters = num_raters

    # --- the API -------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training objective. Returns ``{"loss": scalar, <term>: scalar, ...}`` (terms detached or not).

        All randomness of the step (latent draws, the rater chosen per image) comes from ``generator``, or from
        the global RNG when it is None, so a seeded generator makes the loss reproducible.
        """
        raise NotImplementedError

    def sample_personalized(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
        *,
        grad: bool = False,
    ) -> Tensor:
        """What each rater would draw: ``(B, R, K, H, W)`` probabilities for ``images`` ``(B, C, H, W)``.

        Args:
            images: ``(B, C, H, W)`` float.
            num_samples: K draws per (image, rater).
            generator: the only source of randomness (the global RNG when None).
            share_latent: one image-global latent per (rater, sample) for the whole batch (slices of one volume).
            grad: build an autograd graph (default: no, the call runs under ``torch.no_grad()``; with True the
                caller's grad mode applies). Either way the call runs in eval mode and leaves every module flag,
                parameter and buffer as it found them.
        """
        raise NotSupportedError(
            f"{type(self).__name__} ({self.model_name}) has no per-rater (personalized) output: it models the "
            "population of segmentations only. Use sample_diverse, or a model with rater conditioning (proseg, "
            "pionono, dpersona after stage 2, cm_global, cm_pixel)."
        )

    def sample_diverse(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
        *,
        grad: bool = False,
    ) -> Tensor:
        """The population of plausible segmentations: ``(B, K, H, W)`` probabilities for ``images`` ``(B, C, H, W)``.

        Arguments as :meth:`sample_personalized` (``grad=True`` builds a graph; eval mode and no state change always).
        """
        raise NotSupportedError(f"{type(self).__name__} has no diverse (population) output")

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups. Models whose latent tables use another learning rate override this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}]

    # --- configuration ---------------------------------------------------------------------------------
    @property
    def init_config(self) -> dict[str, Any]:
        """The ``create_model`` arguments that rebuild this model (``create_model(**model.init_config)``; saved in
        ``model.json``): what :func:`~proseg.models.create_model` recorded when it built the model, updated by
        :meth:`config_updates`. A fresh dict on every read. AttributeError for a model built without
        ``create_model`` (there is no record of its arguments)."""
        built = self.__dict__.get("_built_config")
        if built is None:
            raise AttributeError(f"{type(self).__name__} has no init_config: build it with create_model")
        return {**built, **self.config_updates()}

    @init_config.setter
    def init_config(self, config: dict[str, Any]) -> None:
        self.__dict__["_built_config"] = dict(config)

    def config_updates(self) -> dict[str, Any]:
        """Constructor options whose value the model itself changes after it is built (D-Persona's ``stage``, see
        ``set_stage``); :attr:`init_config` records their current values. ``{}`` for most models (every constructor
        argument is recorded anyway, :func:`~proseg.models.registry.resolved_arguments`)."""
        return {}

    # --- a new rater (few-shot adaptation; docs/adaptation.md) ------------------------------------------
    def rater_tensors(self) -> list[tuple[str, nn.Module, str]]:
        """The per-rater parameters: ``(qualified name, owning module, attribute)`` of every parameter whose
        dimension 0 is the rater axis (rater r is row r). ``[]`` (the default) = the model has no per-rater
        parameters, and :meth:`add_rater` raises :class:`NotSupportedError`."""
        return []

    def prior_rater_rows(self) -> dict[str, Tensor]:
        """For ``add_rater(init="prior")``: the new row of the per-rater tensors that have a prior (by qualified
        name); the others get the mean of the existing rows."""
        return {}

    def _after_add_rater(self) -> None:
        """Update the modules' own rater counts after :meth:`add_rater` grew their tensors (subclass hook)."""

    def add_rater(self, init: str | int = "mean") -> int:
        """Append a rater: every per-rater tensor (:meth:`rater_tensors`) grows by one row, ``num_raters`` and
        :attr:`init_config` become R + 1 (so :func:`save_model` / :func:`load_model` rebuild R + 1 raters).

        ``init``: ``"mean"`` (the mean of the existing raters' rows), ``"prior"`` (:meth:`prior_rater_rows` where a
        tensor has a prior, the mean elsewhere) or a rater index (a copy of that rater's rows). The existing rows are
        copied bitwise; the new parameters are new :class:`~torch.nn.Parameter` objects (build the optimizer after
        this call). Returns the new rater's index (the old R).

        Raises:
            NotSupportedError: the model has no per-rater parameters.
            ValueError: an unknown ``init`` or a rater index out of range.
        """
        tensors = self.rater_tensors()
        if not tensors:
            raise NotSupportedError(f"{type(self).__name__} has no per-rater parameters to add a rater to")
        R = self.num_raters
        if isinstance(init, bool) or not (isinstance(init, int) or init in ("mean", "prior")):
            raise ValueError(f"add_rater: init must be 'mean', 'prior' or a rater index, got {init!r}")
        if isinstance(init, int) and not 0 <= init < R:
            raise ValueError(f"add_rater: init rater {init} is not one of the model's raters 0..{R - 1}")
        prior = self.prior_rater_rows() if init == "prior" else {}
        with torch.no_grad():
            for name, module, attr in tensors:
                old = getattr(module, attr)
                if old.shape[0] != R:
                    raise RuntimeError(f"{name}: dimension 0 is {old.shape[0]}, not the rater axis (R = {R})")
                if isinstance(init, int):
                    row = old[init]
                elif name in prior:
                    row = prior[name].to(old)
                else:
                    row = old.mean(0)
                new = torch.cat([old.detach(), row.detach().reshape(1, *old.shape[1:])], 0)
                setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        self.num_raters = R + 1
        self._after_add_rater()
        built = self.__dict__.get("_built_config")
        if built is not None:
            built["num_raters"] = R + 1
        return R

    def rater_parameters(self, rater: int) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the tensors holding rater ``rater``'s parameters: the whole stacked tensors
        (rater ``rater`` is row ``rater`` of each); :meth:`freeze_except_rater` masks the other rows' gradients."""
        if not 0 <= rater < self.num_raters:
            raise ValueError(f"rater {rater} is not one of the model's raters 0..{self.num_raters - 1}")
        return [(name, getattr(module, attr)) for name, module, attr in self.rater_tensors()]

    def freeze_except_rater(self, rater: int) -> RaterFreeze:
        """Make rater ``rater``'s parameters the only trainable ones: every other parameter gets
        ``requires_grad=False``, and a gradient hook on each stacked per-rater tensor zeroes every row but
        ``rater``. With a gradient-only optimizer (Adam without weight decay) over ``handle.params`` the other
        raters' rows then stay bitwise unchanged. ``handle.remove()`` takes the hooks off and restores the flags.
        Keep the model in eval mode while fitting (BatchNorm statistics must not move either)."""
        named = self.rater_parameters(rater)
        ids = {id(p) for _, p in named}
        flags = [(p, p.requires_grad) for p in self.parameters()]
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)
        hooks = []
        for _, p in named:
            mask = torch.zeros(p.shape[0], *([1] * (p.ndim - 1)), dtype=p.dtype, device=p.device)
            mask[rater] = 1
            hooks.append(p.register_hook(lambda g, m=mask: g * m.to(g)))
        return RaterFreeze([p for _, p in named], hooks, flags)

    # --- helpers for subclasses ----------------------------------------------------------------------
    def _check_sampling(self, images: Tensor, num_samples: int) -> None:
        """The argument checks of the sampling calls: :meth:`_check_images` and ``num_samples >= 1``."""
        self._check_images(images)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(images.shape)}"
            )

    def _check_batch(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        for key in ("image", "masks"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batch)})")
        image, masks = batch["image"], batch["masks"]
        self._check_images(image)
        if masks.ndim != 4 or masks.shape[0] != image.shape[0] or masks.shape[1] != self.num_raters \
                or masks.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"masks must be (B, R={self.num_raters}, H, W) matching image {tuple(image.shape)}, "
                f"got {tuple(masks.shape)}"
            )
        present = batch.get("rater_present")
        if present is None:
            present = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        return image, masks.to(image.dtype), present.to(torch.bool)


class RaterFreeze:
    """What :meth:`MultiRaterModel.freeze_except_rater` returns: ``params`` (the tensors to optimise) and
    ``remove()`` (hooks off, ``requires_grad`` flags back)."""

    def __init__(self, params: list[nn.Parameter], hooks: list[Any], flags: list[tuple[nn.Parameter, bool]]) -> None:
        self.params, self._hooks, self._flags = params, hooks, flags

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._hooks = []


for _name in SAMPLING_METHODS:  # the base's own (NotSupportedError) versions follow the same contract
    setattr(MultiRaterModel, _name, _inference_call(MultiRaterModel.__dict__[_name]))
del _name


# --- weights: safetensors + JSON, loadable without the training code -----------------------------------
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"


def save_model(model: nn.Module, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (the ``create_model`` config) into ``directory``.

    Both files are written atomically (temp file, fsync, rename). ``extra`` is stored in the JSON too
    (e.g. the proseg version, the training step). Returns the directory.
    """
    from safetensors.torch import save as st_save

    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    cfg = getattr(model, "init_config", None)
    if cfg is None:
        raise ValueError("model has no init_config: build it with proseg.models.create_model")
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, st_save(state))
    meta = {"model": cfg, "proseg_version": proseg.__version__, **(extra or {})}
    # strict JSON like every proseg file: a NaN validation score in ``extra`` is written as null
    atomic_write_bytes(directory / CONFIG_NAME, dumps(meta, indent=2, sort_keys=True).encode())
    return directory


def nonfinite_tensors(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating (or complex) tensors of ``state`` holding a NaN or an Inf, in ``state``'s order.

    One device synchronisation in all (the per-tensor flags are stacked before they are read).
    """
    names = [k for k, v in state.items() if v.is_floating_point() or v.is_complex()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(state[k]).all().cpu() for k in names]).tolist()
    return [k for k, ok in zip(names, flags, strict=True) if not ok]


def read_weights(file: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a ``.safetensors`` state dict, refusing a damaged file.

    Raises:
        FileNotFoundError: ``file`` does not exist.
        CheckpointError: the file is truncated, garbled or unreadable, or a floating tensor holds NaN/Inf (a NaN
            Dirichlet concentration would otherwise make sampling fail much later); the message names the file and
            the tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    try:
        state = load_file(str(file), device=str(device))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: truncated or unreadable weights file ({exc}); the file is damaged (an "
                              "interrupted copy?): copy it again or use another checkpoint") from exc
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(f"{file}: non-finite weights (NaN/Inf) in {len(bad)} tensor(s): {shown}; training "
                              "diverged or the file is damaged: use an earlier checkpoint")
    return state


def read_model_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``model.json`` of a checkpoint directory: ``{"model": create_model config, "proseg_version", ...,
    plus what the trainer recorded (step, val_score, dataset)}``.

    Raises FileNotFoundError when it is missing, CheckpointError naming the file when it is not a proseg model
    config (bad JSON, not UTF-8, no ``model`` entry with a ``name``).
    """
    cfg_file = Path(directory) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: missing; a proseg checkpoint directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}")
    try:
        meta = json.loads(cfg_file.read_text())
        meta["model"] = dict(meta["model"])
        meta["model"]["name"]  # noqa: B018 (must be there)
    except (KeyError, TypeError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{cfg_file}: not a proseg model config ({type(exc).__name__}: {exc})") from exc
    return meta


def _legacy_build(cfg: dict[str, Any], inference_args: dict[str, Any],
                  state: dict[str, Tensor]) -> tuple[Any, dict[str, Any]] | None:
    """A model.json written before a model class changed its constructor defaults does not name the changed
    arguments; rebuild it with their former values (``LEGACY_DEFAULTS``: the newest change first, then each older one
    on top; only for the arguments the file does not name; then the caller's ``inference_args``) until ``state``
    loads exactly. ``(model, former values applied)``, or None when no generation fits."""
    former: dict[str, Any] = {}
    for change in getattr(get_model_class(cfg["name"]), "LEGACY_DEFAULTS", ()):
        applied = {k: v for k, v in change.items() if k not in cfg}
        if not applied:
            continue
        former.update(applied)
        try:
            model = create_model(**{**cfg, **former, **inference_args})
            missing, unexpected = model.load_state_dict(state, strict=False)
        except (ProsegError, KeyError, TypeError, ValueError, RuntimeError):
            continue
        if not missing and not unexpected:
            return model, dict(former)
    return None


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
               inference_args: dict[str, Any] | None = None) -> MultiRaterModel:
    """Rebuild a model from a directory holding ``model.json`` + ``model.safetensors`` (strict load).

    ``inference_args`` replaces constructor arguments the model class lists in ``INFERENCE_ARGS`` (sampling
    choices such as ProSeg's ``diverse_mode``); any other name is a :class:`~proseg.errors.CheckpointError`.

    The model comes back in **eval mode** (as Hugging Face's ``from_pretrained``); call ``model.train()`` to train it
    further. The weights are read onto ``map_location`` and copied into the freshly built (CPU) model; move the model
    with ``model.to(device)``.

    Raises:
        FileNotFoundError: the directory, ``model.json`` or ``model.safetensors`` is missing.
        CheckpointError: ``model.json`` is not a proseg model config or its config cannot be built; the weights file
            is truncated, garbled or holds NaN/Inf; or the weights do not fit the architecture. The message names the
            file (and the tensors).
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    cfg_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a proseg checkpoint directory holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}")
    cfg = read_model_meta(directory)["model"]
    name = cfg["name"]
    if inference_args:
        allowed = tuple(getattr(get_model_class(name), "INFERENCE_ARGS", ()))
        bad = sorted(set(inference_args) - set(allowed))
        if bad:
            raise CheckpointError(f"{', '.join(bad)}: not an inference-time argument of {name!r}, which can only "
                                  f"change {', '.join(allowed) if allowed else 'none'} after training")
    saved, cfg = cfg, {**cfg, **(inference_args or {})}
    try:
        model = create_model(**cfg)
    except (ProsegError, KeyError, TypeError, ValueError) as exc:  # unknown name/preset, bad or unknown arguments
        raise CheckpointError(f"{cfg_file}: its model config cannot be built ({exc}); config: {cfg}") from exc
    state = read_weights(weights_file, map_location)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        mismatch: RuntimeError | None = None
    except RuntimeError as exc:  # a shape mismatch
        mismatch, missing, unexpected = exc, [], []
    if mismatch is not None or missing or unexpected:
        legacy = _legacy_build(saved, inference_args or {}, state)
        if legacy is not None:
            model, former = legacy
            missing, unexpected = [], []
            warnings.warn(f"{cfg_file}: saved before the {name!r} defaults changed; rebuilt with the former "
                          f"defaults {former} (add them to its model entry to silence this)",
                          ProsegWarning, stacklevel=2)
        elif mismatch is not None:
            raise CheckpointError(f"{weights_file}: weights do not fit the {name!r} architecture in {cfg_file} "
                                  f"({mismatch})") from mismatch
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: weights do not match the {name!r} architecture in {cfg_file} "
                              f"(missing keys: {missing[:5]}, unexpected keys: {unexpected[:5]})")
    return model.eval()  # type: ignore[return-value]
