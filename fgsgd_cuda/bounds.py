r"""Norms of the weight groups, the paper's Table 1 check, and three norm-based generalization bounds.

``report(model, optimizer, n_samples)`` prints a table and returns a dict with, for every weight
layer l (every ``nn.Conv1d/2d/3d`` and ``nn.Linear``, in module order) and every group g of its
components:

- the Frobenius, spectral and ℓ2→1 norms δ_{g,l,F}, δ_{g,l,2}, δ_{g,l,2→1} of the *concatenated
  group weights*, for the parameter the network uses (p = R·ω) and for the unrescaled ω = p/R;
- the check of the paper's Table 1 on every manifold component ω (sphere ‖ω‖_F = 1; stiefel
  ‖ω‖_2 = 1 and ‖ω‖_F = √B; oblique ‖ω‖_F = √B): the largest relative deviation |‖ω‖ − t|/t per
  manifold and layer, and pass/fail against ``tol`` (1e-5: fp32);
- three bounds, computed in log space (natural logarithms; log10 is printed), so that ResNet-101
  depth gives finite numbers where the products of norms overflow float64.

**Concatenated group weights (our choice: the paper does not fix the layout).** The components of
group g (A×B each: k×k filters, or n×1 rows of the row view) are put side by side,
W_{g,l} = [ω_{i_1} ω_{i_2} ⋯ ω_{i_m}] ∈ R^{A×mB}, members in component order (none of the three
norms depends on that order). ‖X‖_{2→1} is the sum of the Euclidean norms of the rows of X
(DESIGN.md §1), ‖X‖_2 the largest singular value. Layers whose weight is not on manifolds (and
every layer when no optimizer is given) form one Euclidean group with the same layout
(k×k filters for 4-D weights with a kernel larger than 1×1, else one n×1 row per output channel),
with R = 1. Biases and normalization layers are not part of the bounds.

**Per layer.** The whole layer is L_l = [W_{g_1,l} ⋯ W_{g_G,l}] (all N components side by side;
for a linear or row-view layer this is the transpose of its (O, n) weight matrix). The per-group
norms enter the bounds through

    δ_{l,F}   = (Σ_g δ_{g,l,F}²)^{1/2}     = ‖L_l‖_F                        (exact)
    δ_{l,2}   = (Σ_g δ_{g,l,2}²)^{1/2}     ≥ ‖L_l‖_2   (‖[X Y]‖_2² = ‖XXᵀ + YYᵀ‖_2 ≤ ‖X‖_2² + ‖Y‖_2²)
    δ_{l,2→1} =  Σ_g δ_{g,l,2→1}           ≥ ‖L_l‖_{2→1} (row by row, √(a + b) ≤ √a + √b)

so every bound below, being non-decreasing in each norm, computed from the group norms is an upper
bound of the same bound computed from the exact layer norms (reported as well: ``bounds_exact``).

**The bounds** (D = number of weight layers, n = ``n_samples``, B_x = ``input_norm`` bounds ‖x‖_2
of the inputs, γ = ``margin``; constants and logarithmic factors as in the sources; the paper's
Table 2 lists these bounds evaluated with the per-group norms of renormalized weights; we could
not obtain its exact typeset formulas, so these are the standard forms of the cited results):

- ``nts`` — Neyshabur, Tomioka & Srebro, "Norm-based capacity control in neural networks",
  COLT 2015 (Frobenius / ℓ2,2 group norm; in the form quoted by Golowich et al. 2018, §1):
  B_x · 2^D · Π_l δ_{l,F} / (γ √n)
- ``bft`` — Bartlett, Foster & Telgarsky, "Spectrally-normalized margin bounds for neural
  networks", NeurIPS 2017, Theorem 1.1 with reference matrices M_l = 0 and 1-Lipschitz
  activations, without its ln(width) factor:
  B_x · Π_l δ_{l,2} · (Σ_l (δ_{l,2→1} / δ_{l,2})^{2/3})^{3/2} / (γ √n)
- ``grs`` — Golowich, Rakhlin & Shamir, "Size-independent sample complexity of neural
  networks", COLT 2018, Theorem 1 (Rademacher complexity of depth-D networks with Frobenius-norm
  bounded layers and 1-Lipschitz positive-homogeneous activations):
  B_x · (√(2 D ln 2) + 1) · Π_l δ_{l,F} / (γ √n)

In log space: Σ_l ln δ_l, ln δ_{l,F} = ½·logsumexp_g(2 ln δ_{g,l,F}) and
(3/2)·logsumexp_l((2/3)(ln δ_{l,2→1} − ln δ_{l,2})); everything is in float64.

**Checkpoints** (``python -m fgsgd_cuda.bounds CHECKPOINT``). :func:`save_checkpoint` writes, with
``torch.save``, a dict::

    {"format": "fgsgd_cuda.checkpoint", "version": 1,
     "builder": "package.module:function",   # returns the nn.Module (see below)
     "builder_kwargs": {...},                # plain data: its keyword arguments
     "model": model.state_dict(),
     "optimizer": optimizer.state_dict(),    # FGSGD state: codes, groups, R ("rescale"), momenta
     "param_names": [[names of group 0], ...],  # the model parameters of each optimizer group
     "n_samples": int or None,               # training-set size for the bounds
     "renormalizer": Renormalizer.state_dict() or absent, ...extra keys}

Everything in it is tensors and plain Python data, so it loads with ``torch.load(...,
weights_only=True)`` (the default since torch 2.6), which runs no code from the file. Loading a
pickled ``nn.Module`` instead (``"model": model``) needs ``weights_only=False`` and so
``--trust-pickle``: unpickling can run arbitrary code, use it only on files you trust. The builder
named in the file is imported and called only if it is marked with :func:`model_builder` (so a
file cannot name, say, ``os:system``); ``--builder module:function`` on the command line overrides
it and needs no mark. The optimizer is rebuilt as ``FGSGD`` over the named parameters with the
saved hyper-parameters (``init_projx=False``), then ``load_state_dict`` restores the grouping,
codes and R exactly.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from typing import Any

import torch
from torch import nn

from . import checks
from . import codes as _codes

BOUNDS = ("nts", "bft", "grs")
BOUND_NAMES = {
    "nts": "Neyshabur-Tomioka-Srebro 2015: B_x 2^D prod_l d_lF / (margin sqrt n)",
    "bft": "Bartlett-Foster-Telgarsky 2017: B_x prod_l d_l2 (sum_l (d_l21/d_l2)^(2/3))^(3/2) / (margin sqrt n)",
    "grs": "Golowich-Rakhlin-Shamir 2018: B_x (sqrt(2 D ln2)+1) prod_l d_lF / (margin sqrt n)",
}
NORMS = ("frobenius", "spectral", "l21")
CHECKPOINT_FORMAT = "fgsgd_cuda.checkpoint"
CHECKPOINT_VERSION = 1
TRAINING_FORMAT = "fgsgd_cuda.train_imagenet"  # train_imagenet.save_checkpoint's checkpoint.pt
DEFAULT_TOL = 1e-5


# ---------------------------------------------------------------- norms
def _max_eig_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """√λ_max of a batch of symmetric positive semi-definite matrices."""
    if gram.shape[0] == 0:
        return gram.new_zeros(0)
    return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()


def layer_norms(x: torch.Tensor, group_index: torch.Tensor, num_groups: int,
                exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms of every group's W_g = [ω_{i_1} ⋯ ω_{i_m}] ∈ R^{A×mB} and of the whole layer L = [ω_1 ⋯ ω_N].

    ``x``: (N, A, B) components; ``group_index``: (N,) group of every component. Returns (G, 3) and
    (3,) float64 tensors of (Frobenius, spectral, ℓ2→1 = sum of row norms). Spectral norms are
    √λ_max of the smaller of W Wᵀ and Wᵀ W. With ``exact=False`` the spectral norm of L is NaN
    where it would need a Gram matrix of the whole layer (A > 4B: the row view), the costly part.
    """
    x = x.detach().to(torch.float64)
    n, a, b = x.shape
    gi = group_index.to(x.device).long()
    rows2 = torch.zeros(num_groups, a, dtype=torch.float64, device=x.device)
    rows2.index_add_(0, gi, (x * x).sum(dim=2))
    fro2 = rows2.sum(dim=1)
    exact_fro, exact_l21 = fro2.sum().sqrt(), rows2.sum(dim=0).sqrt().sum()
    if a <= 4 * b:
        # small A (k×k filters): W_g W_gᵀ = Σ_{i∈g} ω_i ω_iᵀ, and L Lᵀ is the sum over the groups
        gram = torch.zeros(num_groups + 1, a, a, dtype=torch.float64, device=x.device)
        gram[:num_groups].index_add_(0, gi, x @ x.transpose(1, 2))
        gram[num_groups] = gram[:num_groups].sum(dim=0)
        spectral = _max_eig_sqrt(gram)
        spectral, exact_spectral = spectral[:num_groups], spectral[num_groups]
    else:
        # large A (the row view): zero-padded group matrices (G, A, mB), and Wᵀ W when mB < A
        sizes = torch.bincount(gi, minlength=num_groups)
        m = int(sizes.max()) if n else 0
        order = torch.argsort(gi, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        pos = torch.empty_like(gi)
        pos[order] = torch.arange(n, device=x.device) - starts[gi[order]]
        padded = torch.zeros(num_groups, m, a, b, dtype=torch.float64, device=x.device)
        padded[gi, pos] = x
        w = padded.permute(0, 2, 1, 3).reshape(num_groups, a, m * b)
        spectral = _max_eig_sqrt(w @ w.transpose(1, 2) if a <= m * b else w.transpose(1, 2) @ w)
        if exact:
            whole = x.permute(1, 0, 2).reshape(a, n * b)
            exact_spectral = _max_eig_sqrt((whole @ whole.T if a <= n * b else whole.T @ whole)[None])[0]
        else:
            exact_spectral = exact_fro.new_tensor(float("nan"))
    group = torch.stack([fro2.sqrt(), spectral, rows2.sqrt().sum(dim=1)], dim=1)
    return group, torch.stack([exact_fro, exact_spectral, exact_l21])


def group_norms(x: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G, 3) float64: Frobenius, spectral and ℓ2→1 norm of W_g = [ω_{i_1} ⋯ ω_{i_m}] ∈ R^{A×mB} per group."""
    return layer_norms(x, group_index, num_groups)[0]


def compose_layer(group: torch.Tensor) -> torch.Tensor:
    """(3,) float64 logs of δ_{l,F}, δ_{l,2}, δ_{l,2→1} from the (G, 3) group norms (see the module docstring)."""
    logs = group.log()
    return torch.stack([0.5 * torch.logsumexp(2 * logs[:, 0], 0), 0.5 * torch.logsumexp(2 * logs[:, 1], 0),
                        torch.logsumexp(logs[:, 2], 0)])


def log_bounds(log_norms: torch.Tensor, n_samples: int, *, margin: float = 1.0, input_norm: float = 1.0) -> dict:
    """Natural logs of the three bounds from (D, 3) per-layer logs of (δ_F, δ_2, δ_{2→1}), in float64."""
    log_norms = log_norms.to(torch.float64)
    depth = log_norms.shape[0]
    common = math.log(input_norm) - math.log(margin) - 0.5 * math.log(n_samples)
    sum_f = float(log_norms[:, 0].sum())
    sum_s = float(log_norms[:, 1].sum())
    if depth == 0:
        return {"nts": common, "bft": common, "grs": common}
    if math.isinf(sum_s) and sum_s < 0:        # a zero layer: the network is the zero function
        bft = -math.inf
    else:
        ratio = (2.0 / 3.0) * (log_norms[:, 2] - log_norms[:, 1])
        bft = sum_s + 1.5 * float(torch.logsumexp(ratio, 0)) + common
    return {"nts": depth * math.log(2.0) + sum_f + common,
            "bft": bft,
            "grs": math.log(math.sqrt(2.0 * depth * math.log(2.0)) + 1.0) + sum_f + common}


def _bound_entry(log_value: float) -> dict:
    return {"log": log_value, "log10": log_value / math.log(10.0),
            "value": math.exp(log_value) if log_value < 709.0 else math.inf}


# ---------------------------------------------------------------- layers
def _component_layout(p: torch.Tensor) -> tuple[int, int]:
    """(A, B) of the components of a weight that is not on manifolds (FGSGD's layout)."""
    return checks.component_shape(p)[0]


def weight_layers(model: nn.Module, optimizer=None) -> list[dict]:
    """Every Conv1d/2d/3d and Linear weight of ``model`` with its components, groups and R."""
    manifold = {}
    if optimizer is not None:
        manifold = {id(p): st for _, p, st in optimizer.manifold_params()}
    out, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        p = getattr(module, "weight", None)
        if not isinstance(p, torch.Tensor) or p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        st = manifold.get(id(p))
        if st is not None:
            r = optimizer.rescale(p)
            out.append(dict(name=name, param=p, shape=tuple(st["shape"]), codes=optimizer.codes(p),
                            group_index=optimizer.grouping(p).group_index, group_codes=st["group_codes"],
                            num_groups=int(st["num_groups"]), rescale=r, on_manifold=True))
        else:
            a, b = _component_layout(p)
            n = p.numel() // (a * b)
            out.append(dict(name=name, param=p, shape=(a, b),
                            codes=torch.zeros(n, dtype=torch.uint8, device=p.device),
                            group_index=torch.zeros(n, dtype=torch.int32, device=p.device),
                            group_codes=torch.zeros(1, dtype=torch.uint8), num_groups=1, rescale=None,
                            on_manifold=False))
    return out


def table1_check(omega: torch.Tensor, codes: torch.Tensor) -> dict:
    """Largest relative deviation from the paper's Table 1 per manifold and norm, for (N, A, B) ω in float64."""
    omega = omega.to(torch.float64)
    b = omega.shape[2]
    out = {}
    for code in torch.unique(codes).tolist():
        name = _codes.manifold_of(code)
        if name == "euclidean":
            continue
        w = omega[codes.to(omega.device) == code]
        entry = out.setdefault(name, {"count": 0})
        entry["count"] += int(w.shape[0])
        target_f = 1.0 if name == "sphere" else math.sqrt(b)
        dev_f = float(((w.norm(dim=(1, 2)) - target_f).abs() / target_f).max())
        entry["frobenius"] = max(entry.get("frobenius", 0.0), dev_f)
        if name == "stiefel":
            s = torch.linalg.eigvalsh(w.transpose(1, 2) @ w)[:, -1].clamp_min(0).sqrt()
            entry["spectral"] = max(entry.get("spectral", 0.0), float((s - 1.0).abs().max()))
    return out


# ---------------------------------------------------------------- the report
@torch.no_grad()
def report(model: nn.Module, optimizer=None, n_samples: int = 50000, *, margin: float = 1.0,
           input_norm: float = 1.0, tol: float = DEFAULT_TOL, print_table: bool = True, file=None,
           per_group: bool = False, exact: bool = True) -> dict:
    """Norms per layer and group, the Table 1 check and the three bounds (see the module docstring).

    Returns a dict: ``layers`` (per layer: name, weight shape, component shape, number of groups,
    manifolds, ``groups`` = {"size", "manifold", "p", "omega"} with (G, 3) float64 tensors of
    (δ_F, δ_2, δ_{2→1}), ``norms`` = composed per-layer norms of p and ω, ``exact`` = the exact norms
    of L_l, ``table1``), ``table1`` (overall: ``max_deviation``, ``passed``, ``per_manifold``),
    ``bounds`` and ``bounds_exact`` ({"p"|"omega": {"nts"|"bft"|"grs": {"log", "log10", "value"}}}),
    ``depth``, ``n_samples``, ``margin``, ``input_norm``. Prints the table when ``print_table``
    (every group too with ``per_group``). ``exact=False`` skips the exact layer norms of row-view
    layers (a Gram matrix of the whole layer each: the slow part on big networks); ``bounds_exact``
    is then None.
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples: must be a positive integer, got {n_samples!r}")
    for key, v in (("margin", margin), ("input_norm", input_norm), ("tol", tol)):
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{key}: must be a positive finite number, got {v!r}")
    layers_out = []
    logs = {"p": [], "omega": []}
    logs_exact = {"p": [], "omega": []}
    overall: dict[str, dict] = {}
    for lay in weight_layers(model, optimizer):
        a, b = lay["shape"]
        p = lay["param"].detach()
        comps = p.reshape(-1, a, b).to(torch.float64)
        r = lay["rescale"]
        omega = comps if r is None else comps / r.detach().to(torch.float64).reshape(-1, 1, 1)
        entry: dict[str, Any] = dict(name=lay["name"], weight_shape=tuple(p.shape), component_shape=(a, b),
                                     num_components=comps.shape[0], num_groups=lay["num_groups"],
                                     on_manifold=lay["on_manifold"], groups={}, norms={}, exact={})
        sizes = torch.bincount(lay["group_index"].long().cpu(), minlength=lay["num_groups"])
        entry["groups"]["size"] = sizes
        entry["groups"]["manifold"] = [_codes.manifold_of(c) for c in lay["group_codes"].tolist()]
        kinds: dict[str, int] = {}
        for name in entry["groups"]["manifold"]:
            kinds[name] = kinds.get(name, 0) + 1
        entry["manifolds"] = kinds
        for key, x in (("p", comps), ("omega", omega)):
            g, layer = layer_norms(x, lay["group_index"], lay["num_groups"], exact)
            g, layer = g.cpu(), layer.cpu()
            entry["groups"][key] = g
            composed = compose_layer(g)
            logs[key].append(composed)
            logs_exact[key].append(layer.log())
            entry["norms"][key] = dict(zip(NORMS, composed.exp().tolist()))
            entry["exact"][key] = dict(zip(NORMS, layer.tolist()))
        t1 = table1_check(omega, lay["codes"]) if lay["on_manifold"] else {}
        entry["table1"] = t1
        for name, vals in t1.items():
            tot = overall.setdefault(name, {"count": 0})
            tot["count"] += vals["count"]
            for k in ("frobenius", "spectral"):
                if k in vals:
                    tot[k] = max(tot.get(k, 0.0), vals[k])
        layers_out.append(entry)
    max_dev = max((v for m in overall.values() for k, v in m.items() if k != "count"), default=0.0)
    result: dict[str, Any] = dict(
        n_samples=n_samples, margin=float(margin), input_norm=float(input_norm), depth=len(layers_out),
        layers=layers_out,
        table1=dict(tolerance=tol, max_deviation=max_dev, passed=bool(max_dev <= tol), per_manifold=overall),
        bounds={}, bounds_exact={} if exact else None)
    for key in ("p", "omega"):
        for target, source in ((result["bounds"], logs), (result["bounds_exact"], logs_exact)):
            if target is result["bounds_exact"] and not exact:
                continue
            stacked = torch.stack(source[key]) if source[key] else torch.zeros(0, 3, dtype=torch.float64)
            lb = log_bounds(stacked, n_samples, margin=margin, input_norm=input_norm)
            target[key] = {name: _bound_entry(lb[name]) for name in BOUNDS}
    if print_table:
        print_report(result, file=file, per_group=per_group)
    return result


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:>9}"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:9.4f}"
    return f"{v:9.3e}"


def print_report(result: dict, file=None, per_group: bool = False) -> None:
    """Prints the dict of :func:`report` as a text table."""
    out = file if file is not None else sys.stdout
    w = lambda s="": print(s, file=out)  # noqa: E731
    w(f"FG-SGD norms and generalization bounds: D = {result['depth']} weight layers, n = {result['n_samples']}, "
      f"margin = {result['margin']:g}, input norm B_x = {result['input_norm']:g}")
    w("per layer: norms composed from the group norms delta_{g,l} (F: sqrt of sum of squares, 2: sqrt of sum of "
      "squares, 2->1: sum); p = R*omega is what the network uses")
    head = (f"{'layer':<28} {'comp':>7} {'N':>8} {'G':>7} {'manifolds':<18} "
            f"{'p F':>9} {'p 2':>9} {'p 2->1':>9} {'w F':>9} {'w 2':>9} {'w 2->1':>9} {'table1':>9}")
    w(head)
    w("-" * len(head))
    for lay in result["layers"]:
        kinds = " ".join(f"{k[:2]}{v}" for k, v in sorted(lay["manifolds"].items()))
        dev = max((v for m in lay["table1"].values() for k, v in m.items() if k != "count"), default=None)
        comp = "x".join(map(str, lay["component_shape"]))
        p, o = lay["norms"]["p"], lay["norms"]["omega"]
        devs = f"{'-':>9}" if dev is None else f"{dev:9.2e}"
        w(f"{lay['name'][:28]:<28} {comp:>7} {lay['num_components']:>8} {lay['num_groups']:>7} {kinds[:18]:<18} "
          f"{_fmt(p['frobenius'])} {_fmt(p['spectral'])} {_fmt(p['l21'])} "
          f"{_fmt(o['frobenius'])} {_fmt(o['spectral'])} {_fmt(o['l21'])} {devs}")
        if per_group:
            g = lay["groups"]
            for j in range(lay["num_groups"]):
                gp, go = g["p"][j].tolist(), g["omega"][j].tolist()
                w(f"  group {j:<6} size {int(g['size'][j]):<5} {g['manifold'][j]:<10}"
                  f"{'':>29} {_fmt(gp[0])} {_fmt(gp[1])} {_fmt(gp[2])} {_fmt(go[0])} {_fmt(go[1])} {_fmt(go[2])}")
    t1 = result["table1"]
    w()
    w(f"Table 1 (relative deviation of every manifold component omega = p/R, tolerance {t1['tolerance']:g}): "
      f"max {t1['max_deviation']:.3e} -> {'PASS' if t1['passed'] else 'FAIL'}")
    for name, vals in sorted(t1["per_manifold"].items()):
        parts = [f"{k} {vals[k]:.3e}" for k in ("frobenius", "spectral") if k in vals]
        w(f"  {name:<8} {vals['count']:>9} components: " + ", ".join(parts))
    w()
    w(f"{'bound':<6} {'log10 (p, groups)':>18} {'log10 (omega, groups)':>22} {'log10 (p, exact layer)':>23}  formula")
    for name in BOUNDS:
        ex = result["bounds_exact"]["p"][name]["log10"] if result["bounds_exact"] else float("nan")
        w(f"{name:<6} {result['bounds']['p'][name]['log10']:>18.4f} {result['bounds']['omega'][name]['log10']:>22.4f} "
          f"{ex:>23.4f}  {BOUND_NAMES[name]}")


# ---------------------------------------------------------------- checkpoints
def model_builder(fn):
    """Marks ``fn`` as a model builder that a checkpoint may name (see the module docstring)."""
    fn.__fgsgd_model_builder__ = True
    return fn


def _import(path: str):
    if ":" not in path:
        raise ValueError(f"builder: expected 'package.module:function', got {path!r}")
    mod, _, attr = path.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def save_checkpoint(path, model: nn.Module, optimizer=None, *, builder: str, builder_kwargs: dict | None = None,
                    n_samples: int | None = None, renormalizer=None, **extra) -> dict:
    """Writes the checkpoint format of the module docstring with ``torch.save``; returns the dict."""
    names = {id(p): n for n, p in model.named_parameters()}
    ckpt: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "builder": builder,
                            "builder_kwargs": dict(builder_kwargs or {}), "model": model.state_dict(),
                            "n_samples": n_samples}
    if optimizer is not None:
        try:
            ckpt["param_names"] = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        except KeyError:
            raise ValueError("save_checkpoint: every parameter of the optimizer must be a parameter of the model")
        ckpt["optimizer"] = optimizer.state_dict()
    if renormalizer is not None:
        ckpt["renormalizer"] = renormalizer.state_dict()
    ckpt.update(extra)
    torch.save(ckpt, path)
    return ckpt


def load_checkpoint(path, *, map_location="cpu", weights_only: bool = True, builder: str | None = None):
    """(model, optimizer or None, checkpoint dict) from a file of :func:`save_checkpoint`, or of
    ``python -m fgsgd_cuda.train_imagenet`` (its ``checkpoint.pt``: the model and optimizer are built from the run's
    arguments, as the training script builds them).

    ``builder`` ("module:function") overrides the checkpoint's; a builder named by the file must be
    marked with :func:`model_builder`. ``weights_only=False`` allows a pickled ``nn.Module`` under
    "model" (trusted files only).
    """
    from .optimizer import FGSGD, MANIFOLD_DEFAULTS

    ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    if isinstance(ckpt, dict) and (ckpt.get("format") == TRAINING_FORMAT or (  # or one written before it said so
            "format" not in ckpt and {"args", "model", "optimizer", "steps_per_epoch"} <= set(ckpt))):
        return _load_training_checkpoint(ckpt, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an fgsgd_cuda checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("version", 1) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt['version']} is newer than this fgsgd_cuda "
                         f"({CHECKPOINT_VERSION})")
    if isinstance(ckpt.get("model"), nn.Module):
        model = ckpt["model"]
    else:
        path_b = builder or ckpt.get("builder")
        if not path_b:
            raise ValueError(f"{path}: the checkpoint names no builder; pass builder='module:function'")
        fn = _import(path_b)
        if builder is None and not getattr(fn, "__fgsgd_model_builder__", False):
            raise ValueError(f"{path}: the builder {path_b!r} named in the checkpoint is not marked with "
                             "fgsgd_cuda.bounds.model_builder; pass it explicitly (--builder) if you trust it")
        model = fn(**ckpt.get("builder_kwargs", {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"builder {path_b!r} returned {type(model).__name__}, not an nn.Module")
        model.load_state_dict(ckpt["model"])
    model = model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
    optimizer = None
    if ckpt.get("optimizer") is not None:
        named = dict(model.named_parameters())
        known = {"lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize", *MANIFOLD_DEFAULTS}
        groups = []
        for names, g in zip(ckpt["param_names"], ckpt["optimizer"]["param_groups"]):
            # the backend is where the report runs ("auto"), not the training run's (a GPU's "cuda")
            groups.append({**{k: v for k, v in g.items() if k in known and k != "backend"},
                           "params": [named[n] for n in names]})
        # a capturable optimizer's checkpoint: the optimizer-wide option, which every group must match
        capturable = any(g.get("capturable", False) for g in ckpt["optimizer"]["param_groups"])
        optimizer = FGSGD(groups, init_projx=False, capturable=capturable)
        optimizer.load_state_dict(ckpt["optimizer"])
    return model, optimizer, ckpt


def _load_training_checkpoint(ckpt: dict, map_location):
    """(model, optimizer or None, checkpoint) of a train_imagenet checkpoint: the model of its ``arch`` and the
    optimizer of its command line (FGSGD, or None for the SGD baseline: the report then has no manifold state), built
    before the saved states are loaded into them, as a resumed run does (FGSGD projects its weights when it is
    built; the saved ones carry R). The backend is where the report runs ("auto")."""
    from argparse import Namespace

    from .imagenet_models import build_model
    from .imagenet_optim import build_optimizer

    args = Namespace(**{**ckpt["args"], "backend": "auto"})
    model = build_model(args.arch, int(ckpt.get("num_classes", args.num_classes)))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = None
    if args.optimizer == "fgsgd":
        optimizer = build_optimizer(args, model, args.lr, args.lr if args.manifold_lr is None else args.manifold_lr)
    model.load_state_dict(ckpt["model"])
    model = model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return model, optimizer, ckpt


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgsgd_cuda.bounds",
                                     description="Norms, Table 1 check and generalization bounds of an fgsgd_cuda "
                                                 "checkpoint (format: see fgsgd_cuda/bounds.py).")
    parser.add_argument("checkpoint")
    parser.add_argument("--n-samples", type=int, default=None, help="training-set size (default: the checkpoint's)")
    parser.add_argument("--margin", type=float, default=1.0)
    parser.add_argument("--input-norm", type=float, default=1.0, help="bound B_x on the inputs' l2 norm")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="Table 1 tolerance (relative)")
    parser.add_argument("--per-group", action="store_true", help="print every group")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    parser.add_argument("--builder", default=None, help="module:function building the model (overrides the file's)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="torch.load with weights_only=False (pickled modules; runs code from the file)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when the Table 1 check fails")
    args = parser.parse_args(argv)
    model, optimizer, ckpt = load_checkpoint(args.checkpoint, weights_only=not args.trust_pickle,
                                             builder=args.builder)
    n = args.n_samples if args.n_samples is not None else ckpt.get("n_samples")
    if n is None:
        parser.error("the checkpoint has no n_samples: pass --n-samples")
    result = report(model, optimizer, int(n), margin=args.margin, input_norm=args.input_norm, tol=args.tol,
                    per_group=args.per_group)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable(result), fh, indent=1)
    return 1 if args.strict and not result["table1"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
