"""Renormalization (DESIGN.md §1 "Rescaling"): measure λ with forward pre-hooks, set R = γ/λ once per epoch.

The network uses p = R·ω for every manifold component ω (the k×k filter of one (output, input)
channel pair, or one output channel's weight vector in the "row" view). :class:`Renormalizer`
measures λ, the standard deviation of every input feature channel of every layer whose weight is
on manifolds, and sets

    R_i = γ_i / λ_{in(i)}

for every component i, where in(i) is the input channel component i reads and γ_i is a factor of
its manifold. The new scales are applied to all parameters at once through
:meth:`fgsgd_cuda.FGSGD.set_rescale` (p ← (R_new/R_old)·p with the multi-tensor ``rescale_`` kernel
of the optimizer's backend: cpu, cuda, triton or torch) and live in the optimizer's state
(``state["rescale"]``), so ``optimizer.state_dict()`` saves them and every step uses them
(ω = p/R, gradient R·∂L/∂p, p ← R·ω').

Conventions (ours: the paper leaves them open):

- λ is the *population* standard deviation (ddof = 0, as batch norm uses) of the channel over the
  batch and all spatial positions of every measured forward call, merged across calls with Chan's
  parallel formula in float64 (each call's mean and variance are taken in the input's dtype, at
  least float32).
- in(i) of a conv weight (O, I, k, k) with ``groups`` = 1 is ``i % I``; with ``groups`` = G, output
  channel o reads the input channels ``(o // (O/G))·I + c``.
- γ by manifold (``gamma``): 1 for sphere, B^{-1/2} for stiefel and oblique (B = columns of a
  component), so ‖R·ω‖_F = 1/λ on every manifold. Euclidean components keep R = 1 (their step is
  plain SGD, which a scale would turn into a different learning rate) unless ``gamma`` gives a
  value for ``"euclidean"``. Pass a number or a callable ``(A, B) -> float`` per manifold.
- Row-view weights (1×1 convs, linear: components of shape (n, 1), one per output channel) read
  many input channels, so λ is not one channel's std: ``row_lambda="rms"`` (default) takes
  √(mean_j λ_j²) over the channels the row reads (the std of ⟨w, x⟩ for a unit vector w spread
  evenly over independent inputs); ``"mean"`` the mean of λ_j; ``"none"`` leaves row-view
  weights alone (R kept).
- λ is clamped to ``eps`` from below. A channel whose λ is not finite (NaN/inf activations) or
  exactly zero (a dead channel) gives no information: the components reading it keep their R,
  and a RuntimeWarning names the layer and the number of channels. A layer no measured forward
  call reached keeps its R, with a warning.

Two modes:

- ``mode="calibrate"`` (default): :meth:`Renormalizer.calibrate` runs the model on a few batches
  with the hooks on (under ``torch.no_grad``, in the model's current train/eval mode; the model's
  buffers, e.g. batch-norm running statistics, are restored afterwards), then removes the hooks.
  Call it once per epoch before :meth:`step_epoch`.
- ``mode="running"``: the hooks measure the ordinary training forward passes of the epoch (calls
  made while the layer is in training mode; eval passes are ignored), up to ``max_batches`` calls
  per layer, after which each layer's hook removes itself. :meth:`step_epoch` uses the estimate,
  resets it and re-arms the hooks for the next epoch. Hooks hold Python state: under
  ``torch.compile`` prefer ``calibrate``.

Between measurements no hook is registered, so the forward pass costs nothing extra. The scales
R are computed from λ measured under the *old* R: changing R of layer l rescales its outputs, so λ
of layer l+1 is exact only where a normalization layer (batch norm) sits in between, as in
ResNets. Under ``torch.distributed`` the statistics are summed over all ranks before R is set
(every rank must call :meth:`step_epoch`), so every rank gets the same R.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from . import checks
from . import codes as _codes

DEFAULT_EPS = 1e-6
ROW_LAMBDAS = ("rms", "mean", "none")
MODES = ("calibrate", "running")


def default_gamma(manifold: str, a: int, b: int) -> float | None:
    """γ of the default rule: 1 for sphere, B^{-1/2} for stiefel/oblique, None (R = 1) for euclidean."""
    if manifold == "sphere":
        return 1.0
    if manifold in ("stiefel", "oblique"):
        return 1.0 / math.sqrt(b)
    return None


@dataclass
class _Stats:
    """Per-channel count, mean and sum of squared deviations (float64), merged across forward calls."""

    n: torch.Tensor | None = None       # (C,) float64
    mean: torch.Tensor | None = None    # (C,) float64
    m2: torch.Tensor | None = None      # (C,) float64
    calls: int = 0

    def add(self, x: torch.Tensor, axis: int) -> None:
        xc = x.detach().movedim(axis, 0)
        xc = xc.reshape(xc.shape[0], -1)
        if xc.dtype not in (torch.float32, torch.float64):
            xc = xc.float()
        var_b, mean_b = torch.var_mean(xc, dim=1, correction=0)
        nb = float(xc.shape[1])
        mean_b, m2_b = mean_b.double(), var_b.double() * nb
        self.calls += 1
        if self.n is None:
            self.n = torch.full_like(mean_b, nb)
            self.mean, self.m2 = mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * nb / n)
        self.n = n

    def std(self) -> torch.Tensor | None:
        if self.n is None:
            return None
        return (self.m2 / self.n).sqrt()

    def state(self) -> dict:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "calls": self.calls}

    def moments(self, channels: int, device) -> torch.Tensor:
        """(2, C) float64: count and Σx per channel (the first sum over ranks: the mean of all their data)."""
        if self.n is None:
            return torch.zeros(2, channels, dtype=torch.float64, device=device)
        n = self.n.to(device)
        return torch.stack([n, self.mean.to(device) * n])

    def deviations(self, mean: torch.Tensor) -> torch.Tensor:
        """(C,) float64: Σ(x − mean)² over the data seen here, about a given (all ranks') mean: m2 + n·(x̄ − mean)²
        (the second sum over ranks; no cancellation, unlike Σx² − mean·Σx when the mean is large against the
        spread)."""
        if self.n is None:
            return torch.zeros_like(mean)
        d = self.mean.to(mean.device) - mean
        return self.m2.to(mean.device) + self.n.to(mean.device) * d * d

    @classmethod
    def summed(cls, moments: torch.Tensor, deviations: torch.Tensor, calls: int) -> "_Stats":
        """The statistics of all ranks' data from the sums of :meth:`moments` and of :meth:`deviations`."""
        n, s1 = moments
        if float(n.max()) == 0:
            return cls()
        return cls(n=n, mean=s1 / n, m2=deviations, calls=calls)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    param: torch.Tensor
    channel_axis: int             # of a batched input (a Linear's: -1)
    in_channels: int
    row_view: bool
    in_index: torch.Tensor        # (N,) long: filters: the input channel of every component; rows: the conv group
    conv_groups: int
    stats: _Stats = field(default_factory=_Stats)
    handle: object = None


def _layout(module: nn.Module, p: torch.Tensor, state: dict):
    """(channel_axis, in_channels, row_view, in_index, conv_groups) of a layer, or None if unsupported."""
    a, b = state["shape"]
    n = p.numel() // (a * b)
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return None
        groups = module.groups
        out_ch, in_per_group = p.shape[0], p.shape[1]
        in_ch = in_per_group * groups
        per_block = out_ch // groups
        row = checks.component_shape(p)[1]  # as the optimizer splits it (a 1×1 conv of one input: 1×1 rows)
        if not row:
            o = torch.arange(out_ch).repeat_interleave(in_per_group)
            c = torch.arange(in_per_group).repeat(out_ch)
            index = (o // per_block) * in_per_group + c
        else:
            index = torch.arange(out_ch) // per_block
        if index.numel() != n:
            return None
        return 1, in_ch, row, index, groups
    if isinstance(module, nn.Linear):
        if n != p.shape[0]:
            return None
        return -1, p.shape[1], True, torch.zeros(n, dtype=torch.long), 1
    return None


def _remove_hooks(layers) -> None:
    """Removes the forward pre-hooks of ``layers`` (Renormalizer.stop, and its finalizer)."""
    for layer in layers:
        if layer.handle is not None:
            layer.handle.remove()
            layer.handle = None


class Renormalizer:
    """Sets the rescale R = γ/λ of every manifold component once per epoch (see the module docstring).

    ``Renormalizer(model, optimizer)`` finds every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` of ``model``
    whose ``weight`` is a manifold parameter of ``optimizer`` (an :class:`fgsgd_cuda.FGSGD`).

    Calibration mode::

        renorm = Renormalizer(model, opt)
        for epoch in range(epochs):
            renorm.calibrate(batch for _, batch in zip(range(8), loader))   # a few batches
            renorm.step_epoch()                                             # one set_rescale
            train_one_epoch(model, opt)

    Running mode::

        renorm = Renormalizer(model, opt, mode="running", max_batches=50)
        for epoch in range(epochs):
            train_one_epoch(model, opt)      # the hooks measure the first 50 training batches
            renorm.step_epoch()

    Args:
        gamma: overrides of γ per manifold name (``"sphere"``, ``"oblique"``, ``"stiefel"``,
            ``"euclidean"``): a number, a callable ``(A, B) -> float``, or None (R = 1).
        eps: λ is clamped to at least ``eps``.
        row_lambda: λ of row-view components: ``"rms"``, ``"mean"`` or ``"none"`` (not rescaled).
        max_batches: running mode: measured forward calls per layer and epoch (None: all).
    """

    def __init__(self, model: nn.Module, optimizer, *, mode: str = "calibrate", gamma: dict | None = None,
                 eps: float = DEFAULT_EPS, row_lambda: str = "rms", max_batches: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if row_lambda not in ROW_LAMBDAS:
            raise ValueError(f"row_lambda: expected one of {ROW_LAMBDAS}, got {row_lambda!r}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps: must be a positive finite number, got {eps!r}")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches: must be a positive integer or None, got {max_batches!r}")
        gamma = dict(gamma or {})
        unknown = set(gamma) - set(_codes.MANIFOLDS)
        if unknown:
            raise ValueError(f"gamma: unknown manifolds {sorted(unknown)}; expected some of {_codes.MANIFOLDS}")
        for name, g in gamma.items():
            if g is not None and not callable(g) and not (isinstance(g, (int, float)) and g > 0 and math.isfinite(g)):
                raise ValueError(f"gamma[{name!r}]: must be a positive number, a callable (A, B) -> float, or None")
        if not hasattr(optimizer, "manifold_params") or not hasattr(optimizer, "set_rescale"):
            raise TypeError("optimizer: expected an fgsgd_cuda.FGSGD")
        self.model, self.optimizer, self.mode = model, optimizer, mode
        self.gamma, self.eps, self.row_lambda, self.max_batches = gamma, float(eps), row_lambda, max_batches
        self.layers: list[_Layer] = []
        manifold = {id(p): st for _, p, st in optimizer.manifold_params()}
        seen: dict = {}  # id of a weight -> the name of the first layer that holds it
        for name, module in model.named_modules():
            p = getattr(module, "weight", None)
            if not isinstance(p, torch.Tensor) or id(p) not in manifold:
                continue
            if id(p) in seen:
                warnings.warn(f"Renormalizer: layer {name!r} shares its weight with layer {seen[id(p)]!r}; R is "
                              f"measured from the inputs of {seen[id(p)]!r} only", RuntimeWarning, stacklevel=2)
                continue
            seen[id(p)] = name
            lay = _layout(module, p, manifold[id(p)])
            if lay is None:
                warnings.warn(f"Renormalizer: layer {name!r} ({type(module).__name__}) has its weight on manifolds "
                              "but is not a Conv1d/2d/3d or Linear layer: its R is never changed", RuntimeWarning,
                              stacklevel=2)
                continue
            axis, in_ch, row, index, groups = lay
            self.layers.append(_Layer(name or type(module).__name__, module, p, axis, in_ch, row,
                                      index.to(p.device), groups))
        if len(seen) < len(manifold):
            warnings.warn(f"Renormalizer: {len(manifold) - len(seen)} manifold parameter(s) of the optimizer are not "
                          "the weight of a layer of this model: their R is never changed", RuntimeWarning, stacklevel=2)
        # the hooks hold the Renormalizer weakly: one that is dropped (del, out of scope) is collected and its hooks
        # removed, where a strong reference from the model's hooks had kept it measuring every forward pass
        weakref.finalize(self, _remove_hooks, self.layers)
        if mode == "running":
            self.start()

    # ---------------------------------------------------------------- hooks
    def _hook(self, layer: _Layer, running: bool):
        owner = weakref.ref(self)

        def hook(module, args):
            me = owner()
            if me is None:  # collected before its finalizer ran (interpreter shutdown)
                return None
            if running and not module.training:
                return None
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            axis = layer.channel_axis
            if axis == 1 and x.dim() == layer.param.dim() - 1:   # an unbatched conv input (C, *spatial)
                axis = 0
            if x.shape[axis] != layer.in_channels:
                return None
            with torch.no_grad():
                layer.stats.add(x, axis)
            if running and me.max_batches is not None and layer.stats.calls >= me.max_batches:
                layer.handle.remove()
                layer.handle = None
            return None
        return hook

    def _arm(self, running: bool) -> None:
        for layer in self.layers:
            if running and self.max_batches is not None and layer.stats.calls >= self.max_batches:
                continue
            if layer.handle is None:
                layer.handle = layer.module.register_forward_pre_hook(self._hook(layer, running))

    def stop(self) -> None:
        """Removes every hook (the forward pass then costs nothing extra)."""
        _remove_hooks(self.layers)

    remove = stop

    def start(self) -> None:
        """Running mode: (re-)arms the hooks; they measure training-mode forward calls."""
        self._arm(running=True)

    @property
    def hooks_active(self) -> int:
        """The number of hooks registered now."""
        return sum(layer.handle is not None for layer in self.layers)

    def reset(self) -> None:
        """Forgets the statistics measured so far."""
        for layer in self.layers:
            layer.stats = _Stats()

    # ---------------------------------------------------------------- measuring
    @torch.no_grad()
    def calibrate(self, batches: Iterable, forward: Callable | None = None, *, restore_buffers: bool = True) -> dict:
        """Runs ``model`` on ``batches`` with the hooks on and returns λ per layer ({name: (C,) float64}).

        Each batch is passed as ``model(batch)``, or ``model(batch[0])`` when it is a tuple or list
        (a DataLoader's (inputs, targets)); ``forward(model, batch)`` overrides that. Statistics add
        up over the batches and over earlier calls since the last :meth:`step_epoch` / :meth:`reset`.
        With ``restore_buffers`` the model's buffers (batch-norm running statistics) are put back. A call that
        raises (a bad batch) keeps the statistics as they were before it.
        """
        saved = [(b, b.detach().clone()) for b in self.model.buffers()] if restore_buffers else []
        stats = [dataclasses.replace(layer.stats) for layer in self.layers]  # (add rebinds, never writes, tensors)
        self.stop()
        self._arm(running=False)
        try:
            for batch in batches:
                if forward is not None:
                    forward(self.model, batch)
                elif isinstance(batch, (tuple, list)):
                    self.model(batch[0])
                else:
                    self.model(batch)
        except BaseException:
            for layer, st in zip(self.layers, stats):
                layer.stats = st
            raise
        finally:
            self.stop()
            for b, v in saved:
                b.copy_(v)
            if self.mode == "running":
                self.start()
        return self.lambdas()

    def lambdas(self) -> dict:
        """λ (population std, float64) of every input channel of every measured layer, by layer name."""
        out = {}
        for layer in self.layers:
            s = layer.stats.std()
            if s is not None:
                out[layer.name] = s
        return out

    def _sync(self) -> None:
        """Merges the statistics of the ranks of torch.distributed (a no-op without it): every rank gets those of
        all their data."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for layer in self.layers:  # two sums: the mean of all ranks' data, then the deviations about it
            moments = layer.stats.moments(layer.in_channels, layer.param.device)
            dist.all_reduce(moments)
            deviations = layer.stats.deviations(moments[1] / moments[0].clamp_min(1))
            dist.all_reduce(deviations)
            layer.stats = _Stats.summed(moments, deviations, layer.stats.calls)

    # ---------------------------------------------------------------- the new scales
    def _gamma_table(self, a: int, b: int, dtype) -> torch.Tensor:
        """γ for every code (NaN where R stays 1)."""
        vals = []
        for code in _codes.ALL_CODES:
            name = _codes.manifold_of(code)
            g = self.gamma[name] if name in self.gamma else default_gamma(name, a, b)
            if callable(g):
                g = float(g(a, b))
                if not (g > 0 and math.isfinite(g)):
                    raise ValueError(f"gamma[{name!r}]({a}, {b}) = {g}: must be positive and finite")
            vals.append(float("nan") if g is None else float(g))
        return torch.tensor(vals, dtype=dtype)

    def compute_rescale(self, *, warn: bool = True) -> dict:
        """{parameter: new R (N,)} from the statistics measured so far; changes nothing."""
        out = {}
        for layer in self.layers:
            st = self.optimizer.state[layer.param]
            r_old = self.optimizer.rescale(layer.param).detach()
            lam = layer.stats.std()
            if lam is None:
                if warn:
                    warnings.warn(f"Renormalizer: layer {layer.name!r} was not reached by any measured forward call; "
                                  "its R is kept", RuntimeWarning, stacklevel=3)
                continue
            if layer.row_view and self.row_lambda == "none":
                continue
            lam = lam.to(layer.param.device)
            bad = ~torch.isfinite(lam) | (lam <= 0)
            if layer.row_view:
                per_block = lam.view(layer.conv_groups, -1)
                if self.row_lambda == "rms":
                    lam = (per_block * per_block).mean(dim=1).sqrt()
                else:
                    lam = per_block.mean(dim=1)
                bad = ~torch.isfinite(lam) | (lam <= 0)
            a, b = st["shape"]
            gamma = self._gamma_table(a, b, torch.float64).to(layer.param.device)[
                self.optimizer.codes(layer.param).long()]
            lam_c = lam[layer.in_index].clamp_min(self.eps)
            bad_c = bad[layer.in_index]
            r_new = gamma / lam_c
            r_new = torch.where(torch.isnan(gamma), torch.ones_like(r_new), r_new)
            r_new = torch.where(bad_c, r_old.double(), r_new)
            n_bad = int(bad.sum())
            if n_bad and warn:
                what = "row blocks" if layer.row_view else "input channels"
                warnings.warn(f"Renormalizer: layer {layer.name!r}: {n_bad} of {bad.numel()} {what} have a zero or "
                              f"non-finite standard deviation (dead channels or NaN/inf activations); the "
                              f"{int(bad_c.sum())} components reading them keep their R", RuntimeWarning,
                              stacklevel=3)
            r_new = r_new.to(layer.param.dtype)
            if not bool(torch.isfinite(r_new).all()) or not bool((r_new > 0).all()):
                if warn:
                    warnings.warn(f"Renormalizer: layer {layer.name!r}: the new scales overflow or underflow "
                                  f"{layer.param.dtype}; its R is kept", RuntimeWarning, stacklevel=3)
                continue
            out[layer.param] = r_new
        return out

    def step_epoch(self) -> dict:
        """Applies R = γ/λ to every measured layer at once (one set_rescale), resets the statistics.

        Returns {parameter: new R}. In running mode the hooks are re-armed for the next epoch.
        """
        self._sync()
        new = self.compute_rescale()
        if new:
            self.optimizer.set_rescale(new)
        self.reset()
        if self.mode == "running":
            self.start()
        return new

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The statistics measured so far (by layer name); R itself lives in the optimizer's state."""
        return {"mode": self.mode, "layers": {layer.name: layer.stats.state() for layer in self.layers}}

    def load_state_dict(self, state: dict) -> None:
        layers = state.get("layers", {})
        for layer in self.layers:
            s = layers.get(layer.name)
            if s is None or s["n"] is None:
                layer.stats = _Stats()
                continue
            dev = layer.param.device
            layer.stats = _Stats(n=s["n"].to(dev), mean=s["mean"].to(dev), m2=s["m2"].to(dev), calls=int(s["calls"]))
        if self.mode == "running":
            self.stop()
            self.start()

    def __repr__(self) -> str:
        return (f"Renormalizer({len(self.layers)} layers, mode={self.mode!r}, eps={self.eps}, "
                f"row_lambda={self.row_lambda!r}, hooks_active={self.hooks_active})")
