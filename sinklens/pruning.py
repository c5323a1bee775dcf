"""Top-k QK column pruning of attention heads, and whole-head removal, as reversible edits.

QK column pruning of head (l, h) with kept dims S (RESEARCH.md): W_Q^h[:, d] = 0 and W_K^h[:, d] = 0 for
every input (d_model) dim d not in S, in the HF convention ``q_proj.weight[h*d_head:(h+1)*d_head, d]``.

Kept dims (``dims=``): ``"bos_top"`` (the k largest |x_d| of the BOS vector at the head's layer, measured
on probe tokens in one forward for all layers involved), ``"random"`` (a seeded control),
``"weight_norm"`` (the k largest column norms of the head's stacked W_Q and W_K rows), or explicit dims
(one set for all heads, or a mapping per head).

GQA (several query heads read one KV head), ``gqa=``:
- ``"exact"``: every selected query head gets its own pruned Q and a pruned private copy of its KV
  head's K (the thesis semantics); sibling heads are untouched. When every head of a group is selected
  with the same dims this is a plain edit of the shared k_proj rows. Otherwise the selected heads'
  scores are recomputed in a hook on ``hook_attn_scores`` from the layer's attention input with the
  pruned K copy and the model's own rotary cos/sin, keeping its mask (generation with a KV cache works:
  the pruned keys of earlier positions are kept by the hook).
- ``"shared"``: the shared k_proj rows keep the union of the group's selected heads' dims; refused
  unless every head of the group is selected (``force=True`` overrides: siblings then change too).
- ``"q_only"``: only W_Q is pruned.

Edits are applied in place (weights) plus permanent hooks (which survive ``run_with_hooks`` /
``run_with_cache`` / ``reset_hooks()``), so every forward sees them: plain calls, hooked runs,
``generate``. ``restore()`` writes the saved slices back (bitwise) and removes the hooks. Active
edits are tracked on the model; overlapping edits are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import InputError, SinklensError
from .loading import ModelInfo, model_info
from .massive import BASES, MassiveActivations, massive_activations
from .tokens import as_batch
from .validate import as_int, check_choice, check_index, check_k

DIMS_POLICIES = ("bos_top", "random", "weight_norm")
GQA_POLICIES = ("exact", "shared", "q_only")

Head = tuple[int, int]


# --- argument checks ----------------------------------------------------------------------------

def check_heads(heads, info: ModelInfo) -> list[Head]:
    """A non-empty list of distinct ``(layer, head)`` pairs inside the model, sorted."""
    example = "e.g. heads=[(12, 3), (12, 5)]"
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) and not hasattr(heads, "__iter__"):
        raise InputError(f"heads must be a list of (layer, head) pairs ({example}), got {type(heads).__name__}.")
    heads = list(heads)
    if not heads:
        raise InputError(f"heads is empty: pass at least one (layer, head) pair ({example}).")
    if len(heads) == 2 and all(as_int(x) is not None for x in heads):
        raise InputError(f"heads={tuple(heads)} looks like a single pair: wrap it in a list, heads=[{tuple(heads)}].")
    out = []
    for pair in heads:
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise InputError(f"Each head must be a (layer, head) pair ({example}), got {pair!r}.")
        layer, head = (as_int(x) for x in pair)
        if layer is None or head is None:
            raise InputError(f"Head {pair!r} must hold two ints (layer, head).")
        check_index("layer", layer, info.n_layers, "layers")
        check_index("head", head, info.n_heads, "query heads per layer")
        out.append((layer, head))
    if len(set(out)) != len(out):
        dup = sorted({p for p in out if out.count(p) > 1})
        raise InputError(f"Duplicate heads {dup}: list each (layer, head) once.")
    return sorted(out)


def _check_seed(seed) -> int:
    seed = as_int(seed)
    if seed is None or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}.")
    return seed


def _check_editable(model) -> None:
    if getattr(model, "compatibility_mode", False):
        raise InputError("The model is in compatibility mode (RMSNorm gains folded into W_Q/W_K): QK column pruning "
                         "is defined on the raw HF weights. Load it with sinklens.load_model and do not call "
                         "enable_compatibility_mode().")
    if getattr(model, "original_model", None) is None or not hasattr(model, "blocks"):
        raise InputError(f"Expected a TransformerBridge from sinklens.load_model, got {type(model).__name__}.")


# --- choosing the kept dims ---------------------------------------------------------------------

def _weights(model, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """HF q_proj, k_proj and o_proj weights of ``layer`` (the live tensors)."""
    attn = model.blocks[layer].attn
    return attn.q.original_component.weight, attn.k.original_component.weight, attn.o.original_component.weight


def _bias(model, layer: int, which: str) -> Tensor | None:
    return getattr(getattr(model.blocks[layer].attn, which).original_component, "bias", None)


def attention_scaling(model, info: ModelInfo, layer: int) -> float:
    """The factor ``layer``'s attention multiplies q . k by (the HF module's ``scaling``, else d_head^-0.5)."""
    return float(getattr(model.blocks[layer].attn.original_component, "scaling", info.d_head ** -0.5))


def _check_dim_set(dims, k: int, d_model: int, where: str) -> Tensor:
    if isinstance(dims, Tensor):
        values = dims
    else:
        try:
            values = torch.as_tensor(list(dims), device="cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{where}: dims must be a 1-D list or tensor of ints, got {dims!r}.") from err
    if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise InputError(f"{where}: dims must be a 1-D tensor of integer indices, got dtype {values.dtype}, "
                         f"shape {tuple(values.shape)}.")
    if values.numel() != k:
        raise InputError(f"{where}: got {values.numel()} dims but k={k}: pass exactly k dims (or change k).")
    values = values.long().cpu()
    if (int(values.min()) < 0 or int(values.max()) >= d_model):
        raise InputError(f"{where}: dims must lie in [0, {d_model}) (d_model), "
                         f"found {int(values.min())}..{int(values.max())}.")
    if values.unique().numel() != k:
        raise InputError(f"{where}: dims hold duplicates; pass k distinct indices.")
    return values.sort().values


def _random_dims(seed: int, layer: int, head: int, k: int, d_model: int) -> Tensor:
    # one generator per (seed, layer, head): a head's draw does not depend on the other heads, and the
    # dims at k are the first k of one permutation (nested across k)
    digest = hashlib.sha256(f"sinklens-random-dims:{seed}:{layer}:{head}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(d_model, generator=generator, device="cpu")[:k]


def _weight_norm_dims(model, info: ModelInfo, layer: int, head: int, k: int) -> Tensor:
    wq, wk, _ = _weights(model, layer)
    dh = info.d_head
    g = head // info.group_size
    rows = torch.cat([wq[head * dh:(head + 1) * dh], wk[g * dh:(g + 1) * dh]]).float()
    return rows.norm(dim=0).topk(k).indices


def _bos_stats(model, info: ModelInfo, tokens, layers: list[int], attention_mask) -> MassiveActivations:
    if tokens is None:
        raise InputError('dims="bos_top" needs tokens: pass BOS-prepended probe tokens (sinklens.probe_tokens), or a '
                         "MassiveActivations measured on them, as tokens=.")
    if isinstance(tokens, MassiveActivations):
        missing = [layer for layer in layers if layer not in tokens.layers]
        if missing:
            raise InputError(f"The MassiveActivations passed as tokens= lacks layers {missing}: measure them with "
                             "sinklens.massive_activations(model, tokens, layers=...).")
        if tokens.prepend_bos is False:
            raise InputError('dims="bos_top" needs BOS vectors, but these activations were measured without BOS: '
                             "measure them on tokens with prepend_bos=True.")
        return tokens
    batch = as_batch(model, tokens, attention_mask)
    first = batch.tokens.gather(1, batch.attention_mask.argmax(1, keepdim=True)).flatten()
    if info.bos_id is None or bool((first != info.bos_id).any()):
        raise InputError('dims="bos_top" needs every prompt to start with BOS (id '
                         f"{info.bos_id}); found first tokens {sorted(set(first.tolist()))[:5]}. "
                         "Use sinklens.probe_tokens(..., prepend_bos=True) or tokenize(..., prepend_bos=True).")
    if active_edits(model):
        raise InputError('dims="bos_top" would measure the BOS vectors on a model with active edits '
                         f"({len(active_edits(model))}): restore them, or measure once on the dense model with "
                         "sinklens.massive_activations and pass the result as tokens=.")
    return massive_activations(model, batch, layers=layers, show_progress=False)


def select_dims(model, heads: Sequence[Head], k: int, dims="bos_top", tokens=None, basis: str = "normalized",
                seed: int = 0, attention_mask: Int[Tensor, "batch pos"] | None = None) -> dict[Head, Int[Tensor, " k"]]:
    """The kept dims of every head, sorted ascending: ``{(layer, head): LongTensor[k]}``.

    ``dims``: a policy name (``"bos_top"``, ``"random"``, ``"weight_norm"``), one 1-D set of k indices
    for all heads, or a mapping ``{(layer, head): indices}`` covering exactly ``heads``. ``"bos_top"``
    measures every layer involved in one forward of ``tokens`` (or reads a MassiveActivations passed
    as ``tokens``); ``basis`` picks ``"normalized"`` (attention input, default) or ``"resid"``.
    """
    info = model_info(model)
    heads = check_heads(heads, info)
    k = check_k(k, info.d_model)
    if isinstance(dims, str):
        check_choice("dims policy", dims, DIMS_POLICIES)
        check_choice("basis", basis, BASES)
        if dims == "random":
            seed = _check_seed(seed)
            return {(l, h): _random_dims(seed, l, h, k, info.d_model).sort().values for l, h in heads}
        if dims == "weight_norm":
            return {(l, h): _weight_norm_dims(model, info, l, h, k).sort().values for l, h in heads}
        layers = sorted({l for l, _ in heads})
        stats = _bos_stats(model, info, tokens, layers, attention_mask)
        top = {layer: stats.top_dims(layer, k, basis).cpu() for layer in layers}
        return {(l, h): top[l].sort().values for l, h in heads}
    if isinstance(dims, Mapping):
        given = {}
        for key, value in dims.items():
            pair = check_heads([key], info)[0]
            given[pair] = _check_dim_set(value, k, info.d_model, f"dims for head {pair}")
        if set(given) != set(heads):
            extra, missing = sorted(set(given) - set(heads)), sorted(set(heads) - set(given))
            raise InputError(f"The dims mapping must cover exactly the pruned heads: missing {missing}, extra {extra}.")
        return {pair: given[pair] for pair in heads}
    shared = _check_dim_set(dims, k, info.d_model, "dims")
    return {pair: shared.clone() for pair in heads}


def _policy_name(dims) -> str:
    return dims if isinstance(dims, str) else "explicit"


# --- the plan of one pruning --------------------------------------------------------------------

@dataclass
class PruningPlan:
    """What a pruning changes, decided before anything is edited."""

    heads: list[Head]
    k: int
    dims: dict[Head, Tensor]  # kept dims of each head's Q (and of its K under "exact")
    dims_policy: str
    basis: str | None
    gqa: str
    seed: int | None
    force: bool
    prepend_bos: bool | None
    q_edits: dict[Head, Tensor] = field(default_factory=dict)  # query heads whose q_proj rows are edited
    k_edits: dict[Head, Tensor] = field(default_factory=dict)  # (layer, kv head) whose shared k_proj rows are edited
    k_copies: dict[Head, Tensor] = field(default_factory=dict)  # query heads given a pruned private K copy (hook)


def plan_pruning(model, heads, k: int, dims="bos_top", tokens=None, basis: str = "normalized", gqa: str = "exact",
                 seed: int = 0, force: bool = False,
                 attention_mask: Int[Tensor, "batch pos"] | None = None) -> PruningPlan:
    """Validate every argument and decide the edits (see :func:`apply_pruning`); changes nothing."""
    _check_editable(model)
    info = model_info(model)
    heads = check_heads(heads, info)
    k = check_k(k, info.d_model)
    gqa = check_choice("gqa policy", gqa, GQA_POLICIES)
    if not isinstance(force, bool):
        raise InputError(f"force must be True or False, got {force!r}.")
    if isinstance(dims, str):
        check_choice("dims policy", dims, DIMS_POLICIES)
    check_choice("basis", basis, BASES)
    policy = _policy_name(dims)
    seed = _check_seed(seed) if policy == "random" else None
    gs = info.group_size
    if gqa == "shared" and not force:
        for layer, group in sorted({(l, h // gs) for l, h in heads}):
            members = set(range(group * gs, (group + 1) * gs))
            chosen = {h for l, h in heads if l == layer and h in members}
            if chosen != members:
                raise InputError(
                    f'gqa="shared" zeroes K columns that KV head {group} of layer {layer} shares with query heads '
                    f"{sorted(members)}, but only {sorted(chosen)} are selected. Select the whole group, use "
                    'gqa="exact" (private K copies) or "q_only", or pass force=True to change the siblings too.')
    kept = select_dims(model, heads, k, dims, tokens, basis, seed if seed is not None else 0, attention_mask)
    prepend_bos = None  # bos_top: measured on BOS-first prompts (checked), or as recorded by a MassiveActivations
    if policy == "bos_top":
        prepend_bos = tokens.prepend_bos if isinstance(tokens, MassiveActivations) else True
    plan = PruningPlan(heads=heads, k=k, dims=kept, dims_policy=policy, basis=basis if policy == "bos_top" else None,
                       gqa=gqa, seed=seed, force=force, prepend_bos=prepend_bos)
    full = info.d_model
    plan.q_edits = {pair: d for pair, d in kept.items() if d.numel() < full}
    for layer, group in sorted({(l, h // gs) for l, h in heads}):
        members = list(range(group * gs, (group + 1) * gs))
        chosen = [h for h in members if (layer, h) in kept]
        sets = [kept[(layer, h)] for h in chosen]
        if gqa == "q_only":
            continue
        if gqa == "shared":
            keep = torch.unique(torch.cat(sets)).sort().values
            if keep.numel() < full:
                plan.k_edits[(layer, group)] = keep
            continue
        if len(chosen) == len(members) and all(torch.equal(s, sets[0]) for s in sets):
            if sets[0].numel() < full:
                plan.k_edits[(layer, group)] = sets[0]
        else:
            plan.k_copies.update({(layer, h): s for h, s in zip(chosen, sets) if s.numel() < full})
    return plan


# --- permanent hooks ----------------------------------------------------------------------------

def _attach(model, name: str, fn, prepend: bool = False):
    """Add ``fn`` to hook point ``name`` as a permanent hook; returns what :func:`_detach` needs."""
    point = model.hook_dict[name]
    handle = point.add_hook(fn, dir="fwd", is_permanent=True, prepend=prepend)
    return point, handle


def _detach(point, handle) -> None:
    handle.hook.remove()
    point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


def rotate(x: Float[Tensor, "... d_head"], cos: Tensor, sin: Tensor) -> Float[Tensor, "... d_head"]:
    """Llama rotary embedding (rotate-half) of [batch, head, pos, d_head] with cos/sin [batch or 1, pos, d_head]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def project(x: Float[Tensor, "batch pos d_model"], weight: Float[Tensor, "head d_head d_kept"],
            index: Int[Tensor, "head d_kept"], bias: Tensor | None = None) -> Float[Tensor, "batch head pos d_head"]:
    """Per-head projections reading only the kept input dims: ``x[..., S_h] @ W_h[:, S_h].T (+ b_h)``."""
    out = torch.einsum("bpnk,nek->bnpe", x[:, :, index], weight)
    return out if bias is None else out + bias[None, :, None, :]


def masked_like(scores: Tensor) -> Tensor:
    """Entries the model masked (set to the dtype's minimum, or -inf) in ``hook_attn_scores``."""
    return scores <= torch.finfo(scores.dtype).min / 2


class _KCopyHooks:
    """Hooks of one layer that give selected query heads a pruned private copy of their KV head's K.

    At ``hook_attn_scores`` the selected heads' rows are replaced by rot_q_h . rot_k'_h * scaling,
    where rot_q is the model's own (already pruned) rotated query and k'_h = x W_K^g[S_h-columns only]^T
    is rotated with the model's cos/sin; masked entries are kept. Keys of earlier positions are kept
    between calls so a KV-cached decoding step (fewer queries than keys) sees the whole pruned K.
    """

    def __init__(self, model, info: ModelInfo, layer: int, copies: dict[int, Tensor]):
        self.layer, self.info = layer, info
        self.heads = sorted(copies)
        dh, gs = info.d_head, info.group_size
        _, wk, _ = _weights(model, layer)
        # full-width rows with the dropped columns zeroed, one block per selected head: the same linear an
        # ungrouped checkpoint computes (so the two agree to the last bits, not just to rounding)
        rows = torch.cat([wk[(h // gs) * dh:(h // gs + 1) * dh] for h in self.heads])  # [n*dh, d_model]
        drop = torch.cat([_drop_mask(copies[h], info.d_model, wk.device)[None].expand(dh, -1) for h in self.heads])
        self.weight = rows.masked_fill(drop, 0).clone()
        bias = _bias(model, layer, "k")
        self.bias = None if bias is None else torch.cat([bias[(h // gs) * dh:(h // gs + 1) * dh] for h in self.heads])
        self.scaling = attention_scaling(model, info, layer)
        self.head_index = torch.tensor(self.heads, device=wk.device)
        self.x = self.cos = self.sin = self.rot_q = self.keys = None

    def hooks(self) -> list[tuple[str, object, bool]]:
        p = f"blocks.{self.layer}.attn."
        return [(p + "k.hook_in", self._set("x"), False), (p + "hook_cos", self._set("cos"), False),
                (p + "hook_sin", self._set("sin"), False), (p + "hook_rot_q", self._set("rot_q"), False),
                (p + "hook_attn_scores", self._scores, True)]

    def _set(self, slot: str):
        def capture(tensor: Tensor, hook) -> None:
            setattr(self, slot, tensor)
        return capture

    def _scores(self, scores: Tensor, hook) -> Tensor:
        if self.x is None or self.cos is None or self.rot_q is None:
            raise SinklensError(f"Pruning hooks of layer {self.layer} did not see the attention inputs: was the "
                                "attention module called outside the bridge, or a hook removed by "
                                "reset_hooks(including_permanent=True)?")
        q_len, kv_len = scores.shape[-2:]
        rot_q = self.rot_q[:, :, self.heads].transpose(1, 2)  # [b, n, q, dh]
        b, length = self.x.shape[:2]
        k = torch.nn.functional.linear(self.x, self.weight, self.bias).view(b, length, len(self.heads), -1)
        new = rotate(k.transpose(1, 2), self.cos, self.sin).to(rot_q.dtype)
        if kv_len == q_len:
            keys = new
        elif self.keys is not None and self.keys.shape[0] == new.shape[0] and self.keys.shape[2] + q_len == kv_len:
            keys = torch.cat([self.keys, new], dim=2)
        else:
            raise SinklensError(f"Layer {self.layer}: a cached decoding step has {kv_len} keys but the pruning hook "
                                f"holds {None if self.keys is None else self.keys.shape[2]} earlier ones. Start the "
                                "generation inside the pruning context (or use gqa='shared'/'q_only' or save_pruned).")
        self.keys = keys
        self.x = self.cos = self.sin = self.rot_q = None
        pruned = (rot_q @ keys.transpose(-1, -2) * self.scaling).to(scores.dtype)
        scores = scores.clone()
        chosen = scores[:, self.head_index]
        scores[:, self.head_index] = torch.where(masked_like(chosen), chosen, pruned)
        return scores


# --- active edits on a model --------------------------------------------------------------------

def active_edits(model) -> list:
    """The pruning / head-removal handles currently applied to ``model`` (oldest first)."""
    return list(model.__dict__.get("_sinklens_edits", []))


def _conflicts(a: set, b: set) -> set:
    """Units two edits both write, or one writes and the other reads."""
    clash = {u for u in a & b if u[0] != "kread"}
    clash |= {u for u in a if u[0] == "k" and ("kread",) + u[1:] in b}
    clash |= {u for u in b if u[0] == "k" and ("kread",) + u[1:] in a}
    return clash


class _Edit:
    """Base of reversible edits: saved weight slices, permanent hooks, registration on the model."""

    kind = "edit"

    def __init__(self, model, units: set):
        self.model = model
        self._units = units
        self._saved: list[tuple[Tensor, tuple, Tensor]] = []
        self._hooks: list = []
        self.active = False
        for other in active_edits(model):
            clash = _conflicts(units, other._units)
            if clash:
                where = sorted({(u[1], u[2]) for u in clash})
                raise InputError(f"This {self.kind} overlaps an active {other.kind} at (layer, head or kv head) "
                                 f"{where}: restore the other one first (nested or overlapping edits of the same heads "
                                 "are refused).")

    def _zero(self, weight: Tensor, index: tuple, value_mask: Tensor | None = None) -> None:
        """Save ``weight[index]`` and set it to zero (where ``value_mask`` is True, if given)."""
        with torch.no_grad():
            original = weight[index].clone()
            self._saved.append((weight, index, original))
            if value_mask is None:
                weight[index] = 0
            else:
                weight[index] = original.masked_fill(value_mask, 0)

    def _register(self) -> None:
        self.model.__dict__.setdefault("_sinklens_edits", []).append(self)
        self.active = True

    def restore(self) -> None:
        """Undo the edit: write the saved weights back bitwise and remove the hooks (idempotent)."""
        if not self.active:
            return
        with torch.no_grad():
            for weight, index, original in reversed(self._saved):
                weight[index] = original
        for point, handle in self._hooks:
            _detach(point, handle)
        self._saved, self._hooks = [], []
        edits = self.model.__dict__.get("_sinklens_edits", [])
        edits[:] = [e for e in edits if e is not self]
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class PruneHandle(_Edit):
    """An applied QK column pruning (see :func:`apply_pruning`). ``restore()`` undoes it."""

    kind = "QK pruning"

    def __init__(self, model, plan: PruningPlan):
        info = model_info(model)
        gs = info.group_size
        units = {("q", l, h) for l, h in plan.heads} | {("k", l, g) for l, g in plan.k_edits}
        units |= {("kread", l, h // gs) for l, h in plan.k_copies}
        super().__init__(model, units)
        self.plan, self.info = plan, info
        dh, full = info.d_head, info.d_model
        try:
            copies: dict[int, dict[int, Tensor]] = {}
            for (layer, head), keep in plan.k_copies.items():
                copies.setdefault(layer, {})[head] = keep
            for layer, per_head in copies.items():  # snapshot K before any edit of this pruning
                for name, fn, prepend in _KCopyHooks(model, info, layer, per_head).hooks():
                    self._hooks.append(_attach(model, name, fn, prepend))
            for (layer, head), keep in plan.q_edits.items():
                wq, _, _ = _weights(model, layer)
                self._zero(wq, (slice(head * dh, (head + 1) * dh),), _drop_mask(keep, full, wq.device))
            for (layer, group), keep in plan.k_edits.items():
                _, wk, _ = _weights(model, layer)
                self._zero(wk, (slice(group * dh, (group + 1) * dh),), _drop_mask(keep, full, wk.device))
        except Exception:
            self.active = True
            self.restore()
            raise
        self._register()

    # records --------------------------------------------------------------------------------
    @property
    def heads(self) -> list[Head]:
        return list(self.plan.heads)

    @property
    def dims(self) -> dict[Head, Tensor]:
        return dict(self.plan.dims)

    @property
    def layout(self) -> str:
        """``"grouped"`` when every K change is a shared-row edit, ``"ungrouped"`` when a standalone
        checkpoint needs one K copy per query head (gqa="exact" with partial or mixed groups)."""
        return "ungrouped" if self.plan.k_copies else "grouped"

    def params_zeroed(self) -> dict:
        """Q/K weights this pruning sets to zero, and their share of the model's parameters.

        Counted in the layout a standalone checkpoint of this pruning has (:attr:`layout`): with
        ``"ungrouped"`` every selected head has its own K copy, so its zeroed K columns count per head.
        """
        info, plan = self.info, self.plan
        dh, full = info.d_head, info.d_model
        q = sum(dh * (full - d.numel()) for d in plan.q_edits.values())
        if self.layout == "ungrouped":  # only gqa="exact" makes private copies
            k = sum(dh * (full - plan.dims[p].numel()) for p in plan.heads)
        else:
            k = sum(dh * (full - d.numel()) for d in plan.k_edits.values())
        total = count_parameters(self.model)
        return {"q": int(q), "k": int(k), "total": int(q + k), "model_params": total,
                "share": (q + k) / total, "layout": self.layout}

    def record(self) -> dict:
        """JSON-ready description (policy, k, dims per head, GQA handling, counts)."""
        plan = self.plan
        return {"kind": "qk_pruning", "heads": [list(p) for p in plan.heads], "k": plan.k,
                "dims_policy": plan.dims_policy, "basis": plan.basis, "gqa": plan.gqa, "seed": plan.seed,
                "force": plan.force, "prepend_bos": plan.prepend_bos,
                "dims": {f"{l}.{h}": plan.dims[(l, h)].tolist() for l, h in plan.heads},
                "k_shared_edits": {f"{l}.{g}": d.tolist() for (l, g), d in plan.k_edits.items()},
                "k_private_copies": [f"{l}.{h}" for l, h in sorted(plan.k_copies)],
                "params_zeroed": self.params_zeroed()}

    def dims_frame(self) -> pd.DataFrame:
        """One row per (layer, head, kept dim)."""
        rows = [{"layer": l, "head": h, "dim": int(d)} for (l, h) in self.plan.heads for d in self.plan.dims[(l, h)]]
        return pd.DataFrame(rows, columns=["layer", "head", "dim"])

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return (f"PruneHandle({len(self.plan.heads)} heads, k={self.plan.k}, dims={self.plan.dims_policy}, "
                f"gqa={self.plan.gqa}, {state})")


def _drop_mask(keep: Tensor, d_model: int, device) -> Tensor:
    """[d_model] bool, True on the dims to zero (broadcasts over the head's rows)."""
    mask = torch.ones(d_model, dtype=torch.bool, device=device)
    mask[keep.to(device)] = False
    return mask


class HeadRemovalHandle(_Edit):
    """Whole heads removed: the head's input columns of o_proj are zeroed, so its output is zero."""

    kind = "head removal"

    def __init__(self, model, heads: Sequence[Head]):
        _check_editable(model)
        info = model_info(model)
        heads = check_heads(heads, info)
        super().__init__(model, {("o", l, h) for l, h in heads})
        self.info, self.heads = info, heads
        dh = info.d_head
        for layer, head in heads:
            _, _, wo = _weights(model, layer)
            self._zero(wo, (slice(None), slice(head * dh, (head + 1) * dh)))
        self._register()

    def params_zeroed(self) -> dict:
        """o_proj weights zeroed and their share of the model's parameters."""
        total = count_parameters(self.model)
        n = len(self.heads) * self.info.d_head * self.info.d_model
        return {"o": n, "total": n, "model_params": total, "share": n / total, "layout": "grouped"}

    def record(self) -> dict:
        return {"kind": "head_removal", "heads": [list(p) for p in self.heads], "params_zeroed": self.params_zeroed()}

    def __repr__(self) -> str:
        return f"HeadRemovalHandle({len(self.heads)} heads, {'active' if self.active else 'restored'})"


def count_parameters(model) -> int:
    """Parameters of the HF model (tied weights counted once)."""
    return sum(p.numel() for p in model.original_model.parameters())


# --- public entry points ------------------------------------------------------------------------

def apply_pruning(model, heads: Sequence[Head], k: int, dims="bos_top", tokens=None, basis: str = "normalized",
                  gqa: str = "exact", seed: int = 0, force: bool = False,
                  attention_mask: Int[Tensor, "batch pos"] | None = None) -> PruneHandle:
    """Prune the Q/K input columns of ``heads`` to ``k`` kept dims now; ``handle.restore()`` undoes it.

    Every argument is checked (and bos_top dims measured) before the model is touched. See the module
    docstring for ``dims`` and ``gqa``; ``seed`` is used by ``dims="random"``; ``tokens`` (ids, a
    TokenBatch, or a MassiveActivations measured on them) by ``dims="bos_top"``.
    """
    plan = plan_pruning(model, heads, k, dims, tokens, basis, gqa, seed, force, attention_mask)
    return PruneHandle(model, plan)


@contextmanager
def prune_qk(model, heads: Sequence[Head], k: int, dims="bos_top", tokens=None, basis: str = "normalized",
             gqa: str = "exact", seed: int = 0, force: bool = False,
             attention_mask: Int[Tensor, "batch pos"] | None = None) -> Iterator[PruneHandle]:
    """Context manager: inside it every forward sees the pruned model; on exit it is restored bitwise.

    Same arguments as :func:`apply_pruning`; yields its handle.
    """
    handle = apply_pruning(model, heads, k, dims, tokens, basis, gqa, seed, force, attention_mask)
    try:
        yield handle
    finally:
        handle.restore()


def apply_head_removal(model, heads: Sequence[Head]) -> HeadRemovalHandle:
    """Remove whole heads now (their o_proj input columns zeroed); ``handle.restore()`` undoes it."""
    return HeadRemovalHandle(model, heads)


@contextmanager
def remove_heads(model, heads: Sequence[Head]) -> Iterator[HeadRemovalHandle]:
    """Context manager: ``heads`` contribute nothing inside it; restored bitwise on exit."""
    handle = apply_head_removal(model, heads)
    try:
        yield handle
    finally:
        handle.restore()


def layer_heads(heads: Sequence[Head], layer: int = -1) -> tuple[int, list[Head]]:
    """``(layer, the pairs of heads in that layer)``; ``layer=-1`` picks the layer holding most of ``heads``
    (the lowest such layer on ties)."""
    if as_int(layer) is None or layer < -1:
        raise InputError(f"layer must be an int >= 0, or -1 for the layer with most heads; got {layer!r}.")
    pairs = sorted((int(l), int(h)) for l, h in heads)
    if not pairs:
        raise InputError("No heads to choose a layer from: lower eps or q, or pass other heads.")
    if layer == -1:
        counts = pd.Series([l for l, _ in pairs]).value_counts()
        layer = int(min(counts[counts == counts.max()].index))
    chosen = [p for p in pairs if p[0] == layer]
    if not chosen:
        raise InputError(f"Layer {layer} holds none of the heads; layers that do: {sorted({l for l, _ in pairs})}. "
                         "Pass one of them, or -1 for the layer with most heads.")
    return int(layer), chosen
