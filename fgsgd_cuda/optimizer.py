"""``FGSGD``: a drop-in ``torch.optim.Optimizer`` for fine-grained SGD on products of weight manifolds.

A thin class over :func:`fgsgd_cuda.functional.manifold_step` (manifold groups) and
``torch.optim.sgd.sgd`` (Euclidean groups), in the style of ``torch/optim/sgd.py``.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Iterator

import torch
from torch.optim.optimizer import Optimizer
from torch.optim.sgd import sgd

from . import checks, dispatch, streams
from . import codes as _codes
from .euclidean import sgd_step
from .functional import component_view, prepare_manifold_step, staged, unstage
from .grouping import MEMBERSHIP_OPTIONS, Grouping, make_grouping, membership
from .state_checks import check_loadable

MANIFOLD_DEFAULTS = dict(
    manifolds=None,          # None or []: a Euclidean group (plain SGD); else the kinds given to the groups
    assign="round_robin",    # how kinds are given to groups: "round_robin" | "random"
    collection="PIO",        # "PI" | "PO" | "PIO"
    group_size=16,           # components per group (balanced), unless num_groups is given
    num_groups=None,         # groups per run (per output channel for PI, input channel for PO, weight for PIO)
    selection="random",      # membership: "random" (seeded, without replacement) | "deterministic"
    seed=0,
    retraction=None,         # per kind, e.g. {"stiefel": "cayley", "sphere": "exp"}; defaults normalize / qr
    group_clip=None,         # c of the group step size s_g = 1/max(1, ‖ξ_g‖/c); None: s_g = 1
    stabilize=50,            # re-project onto the manifolds every `stabilize` steps (0 / None: never)
    backend="auto",          # "auto" | "cpu" | "cuda" | "triton" | "torch"
    check_finite=True,       # refuse a step whose gradients hold inf/nan (one host sync per step; capturable: skip it)
    capturable=False,        # no host sync in the step: it captures in a CUDA graph (see the class docstring)
    foreach=None,            # Euclidean groups: passed to torch.optim.sgd
    fused=None,
)
# the options that only manifold groups read: given to an optimizer without a manifold group they would change
# nothing (on a Euclidean group of one with manifold groups they are the unread defaults, as torch's Optimizer
# copies every default into every group, and param-group dicts copied from an optimizer carry them)
MANIFOLD_ONLY = ("assign", "collection", "group_size", "num_groups", "selection", "seed", "retraction", "group_clip",
                 "stabilize")


class FGSGD(Optimizer):
    r"""Fine-grained SGD (Ozay, NeurIPS 2019, Algorithm 1) on products of sphere, oblique, Stiefel and
    Euclidean manifolds, and plain SGD on everything else.

    Every parameter of a group whose ``manifolds`` is a non-empty list is split into components: a
    4-D weight (O, I, kh, kw) with a kernel larger than 1×1 into its O·I filters (kh×kw matrices),
    any other weight into its O rows (an n×1 matrix each: sphere and oblique only). The components
    of each parameter are grouped (``collection``, ``group_size`` / ``num_groups``, ``selection``,
    ``seed``) and every group gets one manifold kind from ``manifolds`` (``assign``, ``retraction``).
    At construction every component is moved onto its manifold; every step then runs DESIGN.md §1:
    ξ = Π_ω(R·g), group step size s_g (``group_clip``), momentum with transport by projection,
    nesterov, dampening, retraction, rescale p = R·ω, re-projection every ``stabilize`` steps.

    Groups with ``manifolds=None`` behave exactly as :class:`torch.optim.SGD` (``maximize`` too; on a manifold group
    ``maximize=True`` is an error, and ``differentiable=True`` everywhere). Weight decay on a
    group with a non-Euclidean manifold is an error (those norms are fixed); so is an option only manifold
    groups read (``MANIFOLD_ONLY``: ``group_clip``, ``retraction``, the grouping, ``stabilize``) given to an
    optimizer without any manifold group: ``FGSGD(model.parameters(), group_clip=1.0)`` would be unclipped SGD.

    Use :func:`fgsgd_cuda.param_groups` to split a model: ``FGSGD(param_groups(model), lr=0.1,
    momentum=0.9)``. Construct the optimizer before loading a checkpoint into the model, then load the
    optimizer's state: resuming is then exact.

    ``capturable=True`` (the same for every group) makes the step free of host synchronisation, so that it
    can be captured in a CUDA graph and replayed, and lets ``torch.amp.GradScaler`` hand it its scale and
    inf flag instead of synchronising (``_step_supports_amp_scaling``):

    - every manifold parameter counts its steps in a float32 tensor on its device (``state["step"]``); the
      kernels read the counts to decide the first step and every ``stabilize``-th re-projection, and add one;
    - ``lr`` may be a one-element tensor on the parameters' device (an LR scheduler then updates it in
      place, which a replayed graph sees);
    - under GradScaler the kernels read the scaled gradients and unscale them on the fly (1/scale folded into
      s_g; a group with ``group_clip`` gets its gradients unscaled in place first, by one multi-tensor op),
      and a step with inf/nan is skipped on the device: weights, buffers and counts keep their bits.
      Without GradScaler, ``check_finite`` computes that flag itself (one pass over the gradients) instead
      of raising;
    - manifold groups need the ``cpu``, ``cuda`` or ``triton`` backend; Euclidean groups run torch's fused SGD,
      whose momentum buffers then start at zero (so with dampening τ the first buffer is (1-τ)·g, not g).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *, maximize: bool = False,
                 differentiable: bool = False, init_projx: bool = True, **manifold_options):
        unknown = set(manifold_options) - set(MANIFOLD_DEFAULTS)
        if unknown:
            raise TypeError(f"FGSGD got unknown options {sorted(unknown)}; known: {sorted(MANIFOLD_DEFAULTS)}")
        if differentiable:  # torch.optim.SGD's keyword, accepted for a drop-in swap
            raise ValueError("differentiable: FGSGD's step is not differentiable (it runs fused kernels in place); "
                             "got differentiable=True")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize, **{**MANIFOLD_DEFAULTS, **manifold_options})
        self._init_projx = init_projx
        self._init_runtime()
        # the initial projections wait until every group is checked: a bad group leaves the weights alone
        self._pending_projx: list | None = []
        super().__init__(params, defaults)
        if not any(g["manifolds"] for g in self.param_groups):
            _refuse_manifold_only_options(manifold_options)
        pending, self._pending_projx = self._pending_projx, None
        with torch.no_grad():
            for args in pending:
                self._projx(*args)

    def _init_runtime(self) -> None:
        """What a step keeps besides the state (caches, side streams, flags): made anew, never saved."""
        self._group_cache: dict = {}
        self._view_cache: dict = {}  # component views of weights and momentum buffers (functional.cached_view)
        self._staging: dict = {}  # contiguous copies of channels-last CPU weights and gradients (functional.staged)
        self._overlap = streams.Overlap()  # CUDA: the small launches of a step on a side stream
        self._finite_flags: dict = {}  # capturable check_finite: device -> persistent (found_inf, one)
        # per manifold group gi, with the group dict they were found for (param_groups reordered or replaced: found
        # again): whether it holds weights of several dtypes or devices; its _CHECKED_OPTIONS at its last check
        self._mixed_groups: dict = {}  # gi -> (group, mixed)
        self._checked_options: dict = {}  # gi -> (group, options)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_init_projx": self._init_projx}

    def __setstate__(self, state: dict) -> None:
        """copy.deepcopy and pickle keep torch's Optimizer state (defaults, state, param_groups) and ``init_projx``;
        the rest is made anew here. torch's load_state_dict calls this too, with the loaded state and groups only:
        ``init_projx`` stays this optimizer's."""
        init_projx = state.get("_init_projx", getattr(self, "_init_projx", True))
        super().__setstate__(state)
        self._init_runtime()
        self._init_projx = init_projx
        self._pending_projx = None

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler passes grad_scale / found_inf to a capturable step instead of synchronising."""
        return bool(self.defaults["capturable"])

    # ---------------------------------------------------------------- construction
    def add_param_group(self, param_group: dict) -> None:
        unknown = set(param_group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"param group: unknown options {sorted(unknown)}; known: {sorted(self.defaults)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_hyperparameters(group)
            self._check_own_memory()
            if group["manifolds"]:
                self._init_manifold_group(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            for p in group["params"]:
                self.state.pop(p, None)
            raise

    def _check_hyperparameters(self, group: dict) -> None:
        if not isinstance(group["capturable"], bool) or group["capturable"] != self.defaults["capturable"]:
            raise ValueError(f"capturable: must be the same bool for every param group (the optimizer's is "
                             f"{self.defaults['capturable']}), got {group['capturable']!r}")
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            v = group[key]
            if key == "lr" and isinstance(v, torch.Tensor):
                if not group["capturable"]:
                    raise ValueError("lr: a tensor learning rate needs capturable=True (else pass a number)")
                if v.numel() != 1 or v.dtype not in checks.FLOAT_DTYPES:
                    raise ValueError(f"lr: a tensor learning rate must be a one-element float32 or float64 tensor, "
                                     f"got {v.dtype} of shape {tuple(v.shape)}")
                v = float(v)
            # numbers.Real: numpy scalars too (np.float32(0.1)), as torch.optim.SGD takes them
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or v < 0 or v != v:
                raise ValueError(f"{key}: must be a non-negative number, got {v!r}")
        if group["capturable"] and not group["manifolds"] and (group["foreach"] or group["fused"] is False):
            raise ValueError("capturable: Euclidean groups run torch's fused SGD (found_inf and a tensor lr without "
                             f"a host sync); got foreach={group['foreach']!r}, fused={group['fused']!r}")
        if group["foreach"] and group["fused"]:
            raise ValueError("foreach and fused: cannot both be True (as in torch.optim.SGD); got foreach=True, "
                             "fused=True")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov: needs momentum > 0 and dampening = 0")
        if group["backend"] not in dispatch.BACKENDS:
            raise ValueError(f"backend: unknown backend {group['backend']!r}; expected one of {dispatch.BACKENDS}")
        if not isinstance(group["maximize"], bool):
            raise ValueError(f"maximize: must be a bool, got {group['maximize']!r}")
        if not group["manifolds"]:
            return
        if group["maximize"]:
            raise ValueError("maximize: manifold groups minimize (FG-SGD's step descends along -Π(R·g)); got "
                             "maximize=True on a group with manifolds=" + repr(group["manifolds"]) + ". Negate the "
                             "loss, or keep maximize=True for Euclidean groups only (they run torch's SGD with it)")
        if isinstance(group["manifolds"], str):
            group["manifolds"] = [group["manifolds"]]
        if not isinstance(group["manifolds"], (list, tuple)):
            # the kinds go to the groups in this order: a set's order changes with PYTHONHASHSEED (other kinds for
            # the same filters on another rank or in a resumed run)
            raise TypeError(f"manifolds: must be a list or tuple of kinds (in the order the groups get them), got "
                            f"{type(group['manifolds']).__name__} {group['manifolds']!r}")
        group["manifolds"] = list(group["manifolds"])
        if group["retraction"] is not None and not isinstance(group["retraction"], Mapping):
            raise TypeError(f"retraction: must be a dict of kind -> retraction (e.g. {{'sphere': 'exp'}}) or None, "
                            f"got {group['retraction']!r}")
        seed = group["seed"]
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2 ** 62:
            raise ValueError(f"seed: must be an integer in [0, 2**62), got {seed!r}")
        curved = [m for m in group["manifolds"] if m != "euclidean"]
        if group["weight_decay"] != 0 and curved:
            raise ValueError(
                f"weight_decay: {group['weight_decay']} on a manifold group ({curved}) is meaningless (the norms of "
                "its components are fixed); set weight_decay=0 there and put weight decay on the Euclidean group")
        clip = group["group_clip"]
        if clip is not None and (not isinstance(clip, numbers.Real) or isinstance(clip, bool) or not clip > 0):
            raise ValueError(f"group_clip: must be a positive number or None, got {clip!r}")
        stab = group["stabilize"]
        if stab is not None and (not isinstance(stab, int) or isinstance(stab, bool) or stab < 0):
            raise ValueError(f"stabilize: must be a non-negative integer or None, got {stab!r}")

    def _check_own_memory(self) -> None:
        """No manifold parameter shares memory with another parameter of the optimizer (the same tensor twice in a
        group, or views of one storage): one launch steps all of a group's parameters in parallel, so two that
        overlap would be stepped in a race (a weight listed twice in a group came out different with 1 and 2 CPU
        threads), and a Euclidean view of a manifold weight would move it off its manifold. torch.optim.SGD warns
        about a duplicate and steps it twice; here it is an error. Run as each group is added (the pairs of the
        earlier groups were checked then)."""
        where = [(g, j) for g, group in enumerate(self.param_groups) for j in range(len(group["params"]))]
        pair = checks.overlapping([self.param_groups[g]["params"][j] for g, j in where],
                                  {k for k, (g, _) in enumerate(where) if self.param_groups[g]["manifolds"]})
        if pair is not None:
            (g0, j0), (g1, j1) = sorted(where[k] for k in pair)
            same = self.param_groups[g0]["params"][j0] is self.param_groups[g1]["params"][j1]
            raise ValueError(f"param_groups[{g1}]['params'][{j1}]: "
                             f"{'is the same tensor as' if same else 'shares memory with'} "
                             f"param_groups[{g0}]['params'][{j0}]; a manifold parameter must own its memory (one "
                             "launch steps a group's parameters in parallel: two that overlap would be stepped in a "
                             "race; a Euclidean view of a manifold weight would move it off its manifold). List each "
                             "parameter once, each in memory of its own")

    @staticmethod
    def _component_layout(p: torch.Tensor, name: str) -> tuple[int, int, tuple[int, int], bool]:
        """(O, I, (A, B), is_row_view): the grid of components of p, their shape, and whether they are rows."""
        if p.dim() < 2:
            raise ValueError(f"{name}: a manifold parameter needs at least 2 dimensions (a weight), got shape "
                             f"{tuple(p.shape)}; put biases and norm parameters in a Euclidean group")
        if p.is_meta:
            raise ValueError(f"{name}: is on the meta device (it holds no values to move onto a manifold); build "
                             "the optimizer once the model is materialized (to_empty and its initialisation)")
        shape, is_row = checks.component_shape(p)
        if shape[0] * shape[1] == 0 and p.shape[0] > 0:
            raise ValueError(f"{name}: its components have no entries (shape {tuple(p.shape)}: {p.shape[0]} "
                             f"components of {shape[0]}x{shape[1]}), which no manifold holds; put it in a "
                             "Euclidean group")
        return p.shape[0], 1 if is_row else p.shape[1], shape, is_row

    def _init_manifold_group(self, group: dict, gi: int) -> None:
        kinds = group["manifolds"]
        params, codes = [], []
        for j, p in enumerate(group["params"]):
            name = f"param_groups[{gi}]['params'][{j}]"
            if p.dtype not in checks.FLOAT_DTYPES:
                raise TypeError(f"{name}: manifold parameters must be float32 or float64, got {p.dtype}")
            out_ch, in_ch, shape, is_row = self._component_layout(p, name)
            # the backend of its steps (manifold_step's choice); kh×1 filters longer than MAX_ELEMS are rows too
            impl = dispatch.get(group["backend"] if checks.takes_step_kernels(*shape) else "torch", p.device)
            if group["capturable"]:
                if not getattr(impl, "device_controls", False):
                    raise ValueError(f"{name}: capturable=True needs kernels that read the step's controls "
                                     f"(backend 'cpu', 'cuda' or 'triton', components of at most "
                                     f"{checks.MAX_ELEMS} entries or rows); this parameter would run on the "
                                     f"{impl.__class__.__name__}, which reads them on the host")
                lr = group["lr"]
                if isinstance(lr, torch.Tensor) and lr.device != p.device:
                    raise ValueError(f"lr: a tensor learning rate must be on the parameters' device ({p.device}), "
                                     f"got {lr.device}")
            if is_row and "stiefel" in kinds:
                raise ValueError(f"{name}: the row view (1×1 convs, linear weights) supports sphere, oblique and "
                                 f"euclidean only, got manifolds={kinds}")
            options = {k: group[k] for k in MEMBERSHIP_OPTIONS}
            options["seed"] = int(group["seed"]) + 7919 * j
            grouping = make_grouping(out_ch, in_ch, manifolds=kinds, assign=group["assign"],
                                     retraction=group["retraction"], **options)
            for code in torch.unique(grouping.group_codes).tolist():
                checks.code_for_shape(code, shape[0], shape[1], f"{name} ({_codes.manifold_of(code)})")
            checks.finite(p.detach(), name)
            curved = grouping.codes != _codes.EUCLIDEAN
            # columns of zeros by their largest entry (a norm underflows to 0 for entries of 1e-23 in fp32)
            zero_cols = (p.detach().reshape(-1, *shape).abs().amax(dim=-2) == 0).any(-1).cpu() & curved
            if bool(zero_cols.any()):
                raise ValueError(f"{name}: {int(zero_cols.sum())} components have an all-zero column (or are all "
                                 "zero) and cannot be moved onto the sphere/oblique/stiefel manifolds; initialise the "
                                 "weight randomly (e.g. the default nn.init) before building the optimizer")
            state = self.state[p]
            # per component only the code, which the kernels read, 2 bits each when the weight has at most 4
            # (fgsgd_cuda/codes.py pack); the membership is kept as its options
            state.update(shape=shape, codes=_codes.pack(grouping.codes).to(p.device),
                         group_codes=grouping.group_codes.to(p.device), num_groups=grouping.num_groups,
                         membership=options, step=self._new_step_count(group, p), rescale=None)
            params.append(p)
            codes.append(state["codes"])
        if self._init_projx:
            if self._pending_projx is not None:
                self._pending_projx.append((params, codes, group["backend"]))
            else:
                with torch.no_grad():
                    self._projx(params, codes, group["backend"])

    @staticmethod
    def _new_step_count(group: dict, p: torch.Tensor, value: float = 0.0):
        """A manifold parameter's count of steps taken: an int, or (capturable) a float32 tensor on its device."""
        return torch.tensor(float(value), dtype=torch.float32, device=p.device) if group["capturable"] else int(value)

    def _projx(self, params, codes, backend) -> None:
        """Moves every component of the manifold parameters onto its manifold, one call per shape, device and dtype
        (under no_grad)."""
        by_shape: dict = {}
        for k, p in enumerate(params):
            by_shape.setdefault((self.state[p]["shape"], p.device, p.dtype), []).append(k)
        for (shape, device, _), idx in by_shape.items():
            name = backend if shape[0] * shape[1] <= checks.MAX_ELEMS else "torch"
            targets = [params[k].detach() for k in idx]
            work = [staged(t) for t in targets]
            # the backend directly, as manifold_step does: ops.projx_ refuses components of more than 64
            # entries, which go to the torch backend here (long rows of the row view)
            dispatch.get(name, device).projx_([component_view(w, shape) for w in work], [codes[k] for k in idx], [])
            for t, w in zip(targets, work):
                unstage(t, w)

    def load_state_dict(self, state_dict) -> None:
        # a checkpoint that does not fit the parameters is refused whole, by name, before anything is loaded
        # (fgsgd_cuda/state_checks.py); torch's own load checks only the number of parameters per group
        check_loadable(self, state_dict)
        # torch casts every tensor of a parameter's state to the parameter's dtype and mangles strings inside
        # containers: keep the grouping's integer tensors (codes, group_codes) and membership options as saved
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        ints = {i: {k: v for k, v in state_dict["state"].get(i, {}).items()
                    if (isinstance(v, torch.Tensor) and not v.is_floating_point()) or k == "membership"}
                for i in saved_ids}
        params = [p for g in self.param_groups for p in g["params"]]
        # a checkpoint from before the membership options were kept: they are the ones this optimizer made
        membership_now = {i: self.state[p].get("membership") for i, p in zip(saved_ids, params) if p in self.state}
        capturable = self.defaults["capturable"]
        backends = [g["backend"] for g in self.param_groups]
        super().load_state_dict(_with_own_options(state_dict, self.param_groups))
        # how the step runs is this optimizer's choice, not the checkpoint's (a GPU run's backend="cuda" resumes on
        # a CPU optimizer, a reference run's "torch" does not slow down this one)
        for group, backend in zip(self.param_groups, backends):
            group["capturable"] = capturable
            group["backend"] = backend
        for i, p in zip(saved_ids, params):
            if p not in self.state:  # nothing saved for it (a Euclidean parameter without momentum)
                continue
            st = self.state[p]
            for k, v in ints[i].items():
                st[k] = v.to(device=p.device).clone() if isinstance(v, torch.Tensor) else dict(v)
            st.pop("group_index", None)  # older checkpoints stored it; it is recomputed now
            if "shape" in st:
                st["shape"] = tuple(st["shape"])  # the step batches by it (a dict key)
            if "codes" in st and "membership" not in st and membership_now.get(i) is not None:
                st["membership"] = dict(membership_now[i])
        for group in self.param_groups:  # step counts as this optimizer keeps them (a capturable one: tensors)
            for p in group["params"] if group["manifolds"] else ():
                st = self.state.get(p, {})
                if "step" in st and isinstance(st["step"], torch.Tensor) != group["capturable"]:
                    count = float(st["step"])
                    st["step"] = self._new_step_count(group, p, count)
                    if count == 0 and not group["capturable"]:
                        # a capturable step that was skipped (found_inf) made the buffer and never wrote it: this
                        # optimizer tells a first step by a missing buffer, the capturable one by its count
                        st.pop("momentum_buffer", None)
        self._group_cache.clear()  # keyed by the ids of the parameters: the groups are rebuilt from the state
        self._mixed_groups.clear()  # found again at the next step (the weights may have moved)
        self._checked_options.clear()
        self._view_cache.clear()   # holds views of the old momentum buffers

    # ---------------------------------------------------------------- access for the library's tools
    def manifold_params(self) -> Iterator[tuple[dict, torch.Tensor, dict]]:
        """(group, parameter, state) of every manifold parameter."""
        for group in self.param_groups:
            if group["manifolds"]:
                for p in group["params"]:
                    yield group, p, self.state[p]

    def grouping(self, p: torch.Tensor) -> Grouping:
        """The grouping of a manifold parameter: its group codes from the state and the group of every
        component, recomputed from the membership options kept in the state (and checked against the
        stored codes). One host synchronisation; not for the hot path."""
        st = self.state[p]
        out_ch, in_ch, _, _ = self._component_layout(p, "grouping")
        group_index, count = membership(out_ch, in_ch, **st["membership"])
        grouping = Grouping(group_index.to(p.device), st["group_codes"])
        if count != st["num_groups"] or not torch.equal(grouping.codes, self.codes(p)):
            raise RuntimeError(f"grouping: the membership options {st['membership']} do not reproduce the stored "
                               f"codes of this parameter (shape {tuple(p.shape)}); the state is inconsistent")
        return grouping

    def _group_index(self, p: torch.Tensor) -> torch.Tensor:
        """grouping(p).group_index, kept in the group-clip cache: a batch that changes (a parameter without a
        gradient in some step) rebuilds its sort from it, not the membership (seconds on a large model)."""
        key = ("group_index", id(p))
        gi = self._group_cache.get(key)
        if gi is None:
            gi = self._group_cache[key] = self.grouping(p).group_index
        return gi

    def num_components(self, p: torch.Tensor) -> int:
        """N: the number of components of a manifold parameter."""
        a, b = self.state[p]["shape"]
        return p.numel() // (a * b)

    def codes(self, p: torch.Tensor) -> torch.Tensor:
        """The uint8 (N,) code of every component of a manifold parameter (the state may keep them packed)."""
        return _codes.unpack(self.state[p]["codes"], self.num_components(p))

    def components(self, p: torch.Tensor) -> torch.Tensor:
        """The (N, A, B) components of a manifold parameter: a view of p, or a copy when p is not contiguous (a
        channels-last conv weight, whose filters are strided)."""
        return p.reshape(-1, *self.state[p]["shape"])

    def rescale(self, p: torch.Tensor) -> torch.Tensor:
        """R of every component of p (ones when never rescaled)."""
        st = self.state[p]
        r = st.get("rescale")
        return torch.ones(self.num_components(p), dtype=p.dtype, device=p.device) if r is None else r

    @torch.no_grad()
    def set_rescale(self, new_rescale: dict) -> None:
        """Applies new scales R (DESIGN.md §1 "Rescaling"): p ← (R_new/R_old)·p, one launch per shape, device and
        dtype.

        ``new_rescale`` maps manifold parameters to (N,) tensors of positive finite scales.
        """
        groups = {}
        for p, r_new in new_rescale.items():
            st = self.state.get(p)
            if not st or "codes" not in st:
                raise ValueError("set_rescale: every key must be a manifold parameter of this optimizer")
            n = self.num_components(p)
            r_new = torch.as_tensor(r_new).to(device=p.device, dtype=p.dtype).reshape(-1)
            if r_new.numel() != n:
                raise ValueError(f"set_rescale: expected {n} scales for a parameter of shape {tuple(p.shape)}, "
                                 f"got {r_new.numel()}")
            if not bool(torch.isfinite(r_new).all()) or not bool((r_new > 0).all()):
                raise ValueError("set_rescale: scales must be finite and positive")
            ratio = (r_new / self.rescale(p)).contiguous()
            backend = next(g["backend"] for g in self.param_groups if any(q is p for q in g["params"]))
            groups.setdefault((st["shape"], p.device, p.dtype, backend), []).append((p, st, r_new, ratio))
        for (shape, device, _, backend), items in groups.items():
            name = backend if shape[0] * shape[1] <= checks.MAX_ELEMS else "torch"
            work = [staged(p) for p, *_ in items]
            dispatch.get(name, device).rescale_([component_view(w, shape) for w in work],
                                                [st["codes"] for _, st, _, _ in items], [ratio for *_, ratio in items])
            for (p, *_), w in zip(items, work):
                unstage(p, w)
            for _, st, r_new, _ in items:
                st["rescale"] = r_new.contiguous()

    # ---------------------------------------------------------------- the step
    def _gather(self):
        """(work, finite_checks, sparse): per group (group, params with a gradient, their gradients); the groups
        whose gradients check_finite reads; the indices of the Euclidean groups with sparse gradients (an
        nn.Embedding(sparse=True)), which step as torch.optim.SGD steps them."""
        work, finite_checks, sparse = [], [], set()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                j = next(j for j, p in enumerate(group["params"]) if p.grad is not None and p.grad.is_sparse)
                if group["manifolds"] or group["capturable"]:
                    raise RuntimeError(f"param_groups[{gi}]['params'][{j}]: has a sparse gradient, which "
                                       + ("a manifold group's kernels cannot read" if group["manifolds"] else
                                          "a capturable step cannot take (torch's fused SGD reads dense ones)"))
                sparse.add(gi)
            if group["check_finite"] and grads:
                # a sparse gradient's values (no multi-tensor norm takes sparse tensors on CUDA)
                finite_checks.append((gi, group, params, grads if gi not in sparse else
                                      [g.coalesce().values() if g.is_sparse else g for g in grads]))
            work.append((group, params, grads))
        return work, finite_checks, sparse

    @staticmethod
    def _check_finite(finite_checks) -> None:
        if finite_checks and finite_checks[0][3][0].is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("check_finite: the finiteness check synchronises with the host, which a CUDA graph "
                               "capture cannot do; build the optimizer with check_finite=False to capture its step")
        # a screen, then the exact check only when it fires: one value per gradient whose non-finiteness follows
        # from any inf/nan in it (an overflow of finite values is a false alarm the exact check clears). On the
        # CPU a plain sum per tensor (reads only: 2.1 ms against 3.1 for the norms on ResNet-50's gradients, 2
        # threads); on GPUs the multi-tensor norm (one launch)
        norms = [n for _, _, _, grads in finite_checks
                 for n in (torch._foreach_norm(grads) if grads[0].is_cuda else [g.sum() for g in grads])]
        if norms and not bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all()):
            for gi, group, params, grads in finite_checks:
                for p, g in zip(params, grads):
                    if not bool(torch.isfinite(g).all()):
                        j = next(k for k, q in enumerate(group["params"]) if q is p)
                        raise ValueError(f"param_groups[{gi}]['params'][{j}]: the gradient holds inf or nan; the step "
                                         "was not taken (use torch.amp.GradScaler, or check_finite=False to allow it)")

    # ---------------------------------------------------------------- capturable steps and GradScaler
    @staticmethod
    def _unscales_in_kernel(group: dict) -> bool:
        """Whether the step of this group reads GradScaler's scaled gradients itself (capturable only): manifold
        groups without weight decay and group_clip (the kernels fold 1/scale into s_g) and Euclidean groups
        (torch's fused SGD takes grad_scale)."""
        return group["capturable"] and (not group["manifolds"] or
                                        (group["weight_decay"] == 0 and group["group_clip"] is None))

    def _amp_prologue(self, work) -> tuple[dict | None, dict | None]:
        """GradScaler's part of a step (only a capturable optimizer gets it: _step_supports_amp_scaling), as
        (grad_scale, found_inf), each per device or None when GradScaler did not pass it. grad_scale is set
        when the gradients are still scaled: the groups that cannot read them so (_unscales_in_kernel) get them
        unscaled in place here (one multi-tensor op)."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None, None
        devices = _by_device([g for _, _, gs in work for g in gs])
        scales = flags = None
        if grad_scale is not None:
            scales = {d: grad_scale.to(device=d, dtype=torch.float32) for d in devices}
            rest = [g for group, _, gs in work if not self._unscales_in_kernel(group) for g in gs]
            for device, idx in _by_device(rest).items():
                torch._foreach_div_([rest[k] for k in idx], scales[device])
        if found_inf is not None:
            flags = {d: found_inf.to(device=d, dtype=torch.float32) for d in devices}
        return scales, flags

    def _device_finite_flags(self, finite_checks) -> dict:
        """check_finite without a host sync (capturable): a float32 flag per device, nonzero when any gradient of
        a group with check_finite holds inf/nan; the step is then skipped on the device. Persistent buffers:
        nothing is allocated once the first step has made them."""
        grads = [g for _, _, _, gs in finite_checks for g in gs]
        flags = {}
        for device, idx in _by_device(grads).items():
            if device not in self._finite_flags:
                self._finite_flags[device] = (torch.zeros(1, dtype=torch.float32, device=device),
                                              torch.ones(1, dtype=torch.float32, device=device))
            flag, one = self._finite_flags[device]
            flag.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_([grads[k] for k in idx], flag, one)
            flags[device] = flag
        for device, flag in flags.items():  # one device's inf skips the step on every device
            for other, f in flags.items():
                if other != device:
                    flag.add_(f.to(device))
        return flags

    def _euclidean_capturable(self, group, params, grads, found_inf, grad_scale) -> None:
        """A Euclidean group of a capturable step: torch's fused SGD, which reads found_inf, grad_scale and a
        tensor lr on the device. Momentum buffers that do not exist yet start at zero when the step may be
        skipped, so that a skipped first step leaves buffers a later step can read."""
        for device, idx in _by_device(params).items():
            ps, gs = [params[k] for k in idx], [grads[k] for k in idx]
            states = [self.state[p] for p in ps] if group["momentum"] != 0 else [{}] * len(ps)
            f = _flag_for(found_inf, device)
            if group["momentum"] != 0 and f is not None:
                for p, st in zip(ps, states):
                    if st.get("momentum_buffer") is None:
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs = [st.get("momentum_buffer") for st in states]
            sgd(ps, gs, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"], fused=True,
                found_inf=f, grad_scale=_flag_for(grad_scale, device))
            if group["momentum"] != 0:
                for st, buf in zip(states, bufs):
                    st["momentum_buffer"] = buf

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (one that raises while it prepares, or at its first launch, changes nothing:
        _step_groups).

        Under ``torch.compile`` the step runs eagerly (a graph break): its work is already a few fused launches,
        and its host-side caches (groups, views, copies) and checks are not traceable."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, finite_checks, sparse = self._gather()
        grad_scale, found_inf = self._amp_prologue(work)
        if self.defaults["capturable"]:
            if found_inf is None and finite_checks:
                found_inf = self._device_finite_flags(finite_checks)
        else:
            if found_inf and float(next(iter(found_inf.values()))) != 0:
                return loss  # set by hand on a non-capturable optimizer: read on the host
            self._check_finite(finite_checks)
        for group, params, _ in work:  # the groups of group_clip, before anything changes (a bad state raises here)
            if group["manifolds"] and group["group_clip"] is not None:
                for p in params:
                    self._group_index(p)
        try:
            self._step_groups(work, found_inf, grad_scale, sparse)
        finally:
            self._overlap.join()  # the side stream's launches are part of this step
        return loss

    def _step_groups(self, work, found_inf, grad_scale, sparse=frozenset()) -> None:
        """The groups' steps: every manifold group prepared (all that allocates or may fail:
        functional.prepare_manifold_step, with the options and the state of each batch's first weight checked),
        then launched, then the Euclidean groups: a failure while preparing (a model moved to another dtype or
        device after its state was made, a changed option the step cannot honour), or an op that refuses the first
        batch's tensors, leaves every group as it was. (Torch's SGD checks the Euclidean tensors as it steps them:
        one Euclidean layer moved alone fails after the manifold launches.)"""
        launches = [launch for gi, (group, params, grads) in enumerate(work) if params and group["manifolds"]
                    for launch in self._prepare_manifold_group(gi, group, params, grads, found_inf, grad_scale)]
        try:
            for launch in launches:
                launch()
        except Exception:
            self._mixed_groups.clear()  # a weight moved to another dtype or device: the groups are split anew
            raise
        self._step_euclidean_groups(work, found_inf, grad_scale, sparse)

    def _step_euclidean_groups(self, work, found_inf, grad_scale, sparse) -> None:
        for gi, (group, params, grads) in enumerate(work):
            if not params or group["manifolds"]:
                continue
            if group["capturable"]:
                self._euclidean_capturable(group, params, grads, found_inf, grad_scale)
            else:  # without momentum no state, as torch.optim.SGD keeps none
                bufs = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] != 0 else \
                    [None] * len(params)
                new_buffers = any(b is None for b in bufs)
                sgd_step(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                         lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                         maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"],
                         has_sparse_grad=gi in sparse)
                if group["momentum"] != 0 and new_buffers:  # sgd made buffers where there were none
                    for p, buf in zip(params, bufs):
                        self.state[p]["momentum_buffer"] = buf

    def _prepare_manifold_group(self, gi, group, params, grads, found_inf, grad_scale) -> list:
        """The launches of a manifold group's step (param_groups[gi]): one call for all its parameters, or one per
        device and dtype when the group holds several (a call takes one dtype and device: a model split over
        devices, or a float64 layer in a float32 model) or a flag or scale (one tensor per device) goes with it."""
        options = tuple(group[k] for k in _CHECKED_OPTIONS)
        checked = self._checked_options.get(gi)
        if checked is None or checked[0] is not group or checked[1] != options:  # set or changed since its last step
            self._refuse_changed_options(gi, group)
            self._checked_options[gi] = (group, options)
        lr = group["lr"]  # set by schedulers at every step: only its type (a float is one check)
        if type(lr) is not float and (isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.Tensor))):
            raise TypeError(f"param_groups[{gi}]['lr']: must be a number (or, capturable, a one-element tensor), got "
                            f"{lr!r}")
        found = self._mixed_groups.get(gi)
        if found is not None and found[0] is group:
            mixed = found[1]
        else:  # once per group: a read of every weight's dtype and device costs host time at each step
            mixed = len({(p.dtype, p.device) for p in group["params"]}) > 1
            self._mixed_groups[gi] = (group, mixed)
        by_device = (_by_device(params, lambda t: (t.device, t.dtype)) if mixed or found_inf or grad_scale
                     else {(None, None): None})
        launches = []
        for (device, _), idx in by_device.items():
            ps, gs = (params, grads) if idx is None else ([params[k] for k in idx], [grads[k] for k in idx])
            if "codes" not in self.state.get(ps[0], ()) or "codes" not in self.state.get(ps[-1], ()):
                self._refuse_changed_options(gi, group)  # (read with get: a refused step adds no state entry)
            states = [self.state[p] for p in ps]
            launches.append(prepare_manifold_step(
                ps, gs, states, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                group_clip=group["group_clip"], stabilize=group["stabilize"], backend=group["backend"],
                cache=self._group_cache, views=self._view_cache, group_index=lambda k, ps=ps: self._group_index(ps[k]),
                capturable=group["capturable"], found_inf=_flag_for(found_inf, device),
                grad_scale=_flag_for(grad_scale, device) if self._unscales_in_kernel(group) else None,
                overlap=self._overlap, staging=self._staging, names=lambda k, ps=ps: self._param_name(gi, ps[k])))
        return launches

    def _refuse_changed_options(self, gi: int, group: dict) -> None:
        """A manifold group's step refused, before anything changes, when options it was built with were changed
        in ``param_groups`` to what the step cannot do: the _CHECKED_OPTIONS, checked as at construction whenever
        they differ from the group's last checked step (nesterov with dampening, weight decay, maximize, a flipped
        capturable, a bad group_clip, stabilize or backend), or ``manifolds`` given to a group built Euclidean (its
        parameters have no codes). lr, which a scheduler sets at every step, only has its type checked there
        (_prepare_manifold_group), as torch's optimizers do not check it; the options that fix the grouping (manifolds, collection, group_size, seed) were
        used at construction."""
        try:
            self._check_hyperparameters(group)
        except (ValueError, TypeError) as e:
            raise type(e)(f"param_groups[{gi}] (changed after the optimizer was built): {e}") from None
        for j, p in enumerate(group["params"]):
            if "codes" not in self.state.get(p, {}):
                raise ValueError(f"param_groups[{gi}]['params'][{j}]: has no manifold state (codes), but its group "
                                 f"now has manifolds={group['manifolds']!r}; a group's manifolds are fixed when it is "
                                 "added: give them to the optimizer's constructor or add_param_group")

    def _param_name(self, gi: int, p: torch.Tensor) -> str:
        """param_groups[gi]['params'][j] of p (errors only: a search)."""
        j = next(j for j, q in enumerate(self.param_groups[gi]["params"]) if q is p)
        return f"param_groups[{gi}]['params'][{j}]"


def _with_own_options(state_dict: dict, own_groups: list) -> dict:
    """The checkpoint with every option its groups lack (a torch.optim.SGD checkpoint has no ``manifolds``,
    ``backend``, ...) taken from this optimizer's group at the same position, as torch's optimizers fill in the
    options an older checkpoint lacks (check_loadable has judged the states by these groups)."""
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(own_groups):
        return state_dict  # torch's own check names this
    groups = [{**{k: v for k, v in own.items() if k != "params"}, **saved} for own, saved in zip(own_groups, saved_groups)]
    return {**state_dict, "param_groups": groups}


def _refuse_manifold_only_options(options: dict) -> None:
    """The options of an optimizer without a manifold group: a manifold-only one set away from its default is an
    error, not a silent no-op (e.g. ``FGSGD(model.parameters(), group_clip=1.0)`` is plain SGD, unclipped)."""
    for key in MANIFOLD_ONLY:
        if key in options and options[key] != MANIFOLD_DEFAULTS[key]:
            raise ValueError(f"{key}: only manifold groups use it, but this optimizer has no manifold group, so "
                             f"{key}={options[key]!r} would change nothing; give the group manifolds=[...] (or "
                             "build the groups with fgsgd_cuda.param_groups(model)), or drop the option")


def _by_device(tensors, key=lambda t: t.device) -> dict:
    """key(t) (default: its device) -> indices of the tensors with it, in order."""
    out: dict = {}
    for k, t in enumerate(tensors):
        out.setdefault(key(t), []).append(k)
    return out


# the options of a manifold group checked again (_check_hyperparameters) when they change after construction: a
# tuple of them per step is cheap, a full check is not (lr changes at every step under a scheduler: not among them)
_CHECKED_OPTIONS = ("momentum", "dampening", "nesterov", "weight_decay", "maximize", "capturable", "group_clip",
                    "stabilize", "backend")


def _flag_for(found_inf: dict | None, device):
    """The step's per-device tensor (a found_inf flag or a grad scale) on ``device`` (None: none; a device
    without its own gets a copy)."""
    if not found_inf:
        return None
    flag = found_inf.get(device)
    return flag if flag is not None else next(iter(found_inf.values())).to(device)
