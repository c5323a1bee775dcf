"""Sink census from each query row's log-sum-exp, the attention running in a fused kernel (engine="sdpa").

With s_ij = scaling * q_i . k_j (masked as the model masks it) and LSE_i = log sum_j exp(s_ij), the
pattern is A_ij = exp(s_ij - LSE_i). So the sink score of key k,
alpha_k = 1/(T-k) * sum_{i>=k} exp(s_ik - LSE_i), needs only key column k and each row's LSE, which a
fused attention kernel returns with its output. First keys only: one forward plus O(T x m) work per
head. ``full=True`` adds every key's column mean and each row's largest weight (head confidence),
accumulated over blocks of query rows, so at most [batch, head, block, T] is alive, never T x T.

Why not hook_rot_q / hook_rot_k: the TransformerLens 4.3 bridge reimplements attention step by step
in every layer whatever hooks are set (scores, mask, float32 softmax, pattern: several
[batch, head, T, T] tensors), so reading q and k from its hooks saves no memory. During a fused
forward each decoder layer runs instead the Hugging Face attention module the bridge wraps, i.e. the
model's own code: q/k/v projections (through the bridge's linear components, so hook_q/k/v still
fire), rotary, then the attention function named by ``config._attn_implementation``. That function is
:func:`_lse_attention`: it calls the fused kernel with the model's scaling and mask (the mask the
model builds for SDPA), hands (q, k, LSE) to the census, and returns the kernel's output. The
bridge's own attention hooks (hook_attn_scores, hook_pattern, hook_rot_q/k, hook_z) do not fire.
Everything is restored on exit.

LSE sources, by device: CPU ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel
``F.scaled_dot_product_attention`` uses on CPU; GQA and float masks supported); CUDA the flash kernel
(fp16/bf16, no padding mask) or the memory-efficient kernel; otherwise a blocked LSE in plain torch
next to ``F.scaled_dot_product_attention`` (an extra pass over the scores; a warning says so).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core.edits import eager_pattern_edits
from ..core.errors import InputError
from ..core.hooks import batches, gather_relative, relative_index
from ..core.tokens import TokenBatch
from ..core.validate import check_index

ATTENTION_NAME = "sinklens_lse"
BACKENDS = ("cpu_flash", "cuda_flash", "cuda_efficient", "blocked")
# query rows per block in full mode: this share of T (so a block holds ~4% of one layer's pattern)
BLOCK_SHARE = 0.04
MIN_BLOCK = 16

# the census (or other observer) that _lse_attention hands each layer's (q, k, LSE) to
_OBSERVER: contextvars.ContextVar[LseCensus | FirstKeyWeights | None] = contextvars.ContextVar(
    "sinklens_lse_observer", default=None)


# --- attention with its log-sum-exp ---------------------------------------------------------------

def _choose_backend(device: torch.device, dtype: torch.dtype, masked: bool) -> str:
    """The kernel that returns LSE on ``device``: CPU flash, CUDA flash (fp16/bf16, no mask),
    CUDA memory-efficient, or the blocked fallback elsewhere."""
    if device.type == "cpu":
        return "cpu_flash"
    if device.type == "cuda":
        return "cuda_flash" if dtype in (torch.float16, torch.bfloat16) and not masked else "cuda_efficient"
    return "blocked"


def attention_with_lse(query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv_head k d"],
                       value: Float[Tensor, "batch kv_head k d"], mask: Bool[Tensor, "batch 1 q k"] | None,
                       scaling: float, backend: str | None = None
                       ) -> tuple[Float[Tensor, "batch head q d"], Float[Tensor, "batch head q"], str]:
    """Causal attention output and each query row's LSE (float32) from one kernel call.

    Args:
        query, key, value: rotary already applied; key/value with the KV heads (GQA not expanded).
        mask: the model's boolean SDPA mask (True = attend), or None for plain causal attention.
        scaling: the model's score scale (1/sqrt(d_head) for Llama).
        backend: one of ``BACKENDS``; None picks by device (:func:`_choose_backend`).
    Returns:
        ``(output, lse, backend used)``. A kernel that fails falls back to ``"blocked"`` with a warning.
    """
    backend = backend or _choose_backend(query.device, query.dtype, mask is not None)
    if backend not in BACKENDS:
        raise InputError(f"Unknown LSE backend {backend!r}: use one of {BACKENDS}.")
    groups = query.shape[1] // key.shape[1]
    float_mask = None
    if mask is not None:
        float_mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        float_mask.masked_fill_(~mask, torch.finfo(query.dtype).min)
    try:
        if backend == "cpu_flash":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, mask is None, attn_mask=float_mask, scale=scaling)[:2]
            return out, lse.float(), backend
        if backend == "cuda_flash":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                query, _expand(key, groups), _expand(value, groups), 0.0, True, False, scale=scaling)[:2]
            return out, lse.float(), backend
        if backend == "cuda_efficient":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, _expand(key, groups), _expand(value, groups), float_mask, True, 0.0, mask is None,
                scale=scaling)[:2]
            return out, lse[..., :query.shape[2]].float(), backend
    except RuntimeError as err:
        warnings.warn(f"sinklens: the {backend} attention kernel failed ({err}); computing the LSE blockwise "
                      "instead (an extra pass over the scores).", RuntimeWarning, stacklevel=2)
    out = F.scaled_dot_product_attention(query, _expand(key, groups), _expand(value, groups), attn_mask=mask,
                                         is_causal=mask is None, scale=scaling)
    return out, _blocked_lse(query, key, mask, scaling), "blocked"


def _blocked_lse(query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv_head k d"],
                mask: Bool[Tensor, "batch 1 q k"] | None, scaling: float,
                block: int | None = None) -> Float[Tensor, "batch head q"]:
    """Each query row's log-sum-exp of its masked scores, over blocks of query rows (float32)."""
    width = query.shape[2]
    block = block or _block_rows(width)
    lse = torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
    for start in range(0, width, block):
        stop = min(width, start + block)
        scores = _group_scores(query[:, :, start:stop], key[:, :, :stop], scaling)
        allowed = _allowed_block(mask, start, stop, query.device)
        lse[:, :, start:stop] = scores.masked_fill_(~allowed, -math.inf).logsumexp(-1)
    return lse


def _group_scores(query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv_head k d"],
                 scaling: float) -> Float[Tensor, "batch head q k"]:
    """float32 scaled scores q . k without expanding K: query head h reads KV head h // group."""
    b, n_heads, n_q, d = query.shape
    n_kv, n_k = key.shape[1], key.shape[2]
    grouped = query.float().reshape(b, n_kv, (n_heads // n_kv) * n_q, d)
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scaling)
    return scores.view(b, n_heads, n_q, n_k)


def _allowed_block(mask: Bool[Tensor, "batch 1 q k"] | None, start: int, stop: int,
                  device: torch.device) -> Bool[Tensor, "batch 1 block k"]:
    """Which keys 0..stop-1 query rows start..stop-1 may attend to: the model's mask, or causal when None."""
    if mask is not None:
        return mask[:, :, start:stop, :stop]
    rows = torch.arange(start, stop, device=device)[:, None]
    return (rows >= torch.arange(stop, device=device)[None, :])[None, None]


def _block_rows(width: int) -> int:
    """Default query rows per block for a sequence of ``width`` tokens."""
    return min(width, max(MIN_BLOCK, int(BLOCK_SHARE * width)))


def _expand(kv: Tensor, groups: int) -> Tensor:
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _lse_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The attention function registered as ``ATTENTION_NAME`` (the Hugging Face AttentionInterface
    signature): the fused kernel's output, with (q, k, LSE) handed to the active census."""
    if dropout:
        raise InputError("The sdpa census runs the model in eval mode: call model.eval() first.")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise InputError(f"The sdpa census expected a boolean SDPA mask, got {attention_mask.dtype}: "
                         "use engine='eager' for this model.")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    observer = _OBSERVER.get()
    backend = observer.backend if observer is not None else None
    out, lse, used = attention_with_lse(query, key, value, attention_mask, scaling, backend)
    if observer is not None:
        observer.observe(module.layer_idx, query, key, lse, attention_mask, scaling, used)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _lse_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# --- running the bridge with fused attention -------------------------------------------------------

def _check_fused_support(model) -> None:
    """Refuse, before any forward, a model whose attention the fused engine cannot drive."""
    hf = getattr(model, "original_model", None)
    config = getattr(hf, "config", None)
    blocks = getattr(model, "blocks", None)
    if config is None or blocks is None:
        raise InputError(f"engine='sdpa' needs a TransformerBridge over a Hugging Face model, got "
                         f"{type(model).__name__}: use engine='eager'.")
    calibrated = eager_pattern_edits(model)
    if calibrated:
        raise InputError(f"engine='sdpa' runs attention in a fused kernel, without the pattern hook where the active "
                         f"{calibrated[0].kind} edits the patterns: restore it first, or use engine='eager'.")
    if getattr(config, "attn_logit_softcapping", None):
        raise InputError(f"engine='sdpa' cannot drive soft-capped attention scores (attn_logit_softcapping="
                         f"{config.attn_logit_softcapping} in {config.model_type}): use engine='eager'.")
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        native = getattr(attn, "original_component", None)
        layer = getattr(block, "original_component", None)
        if native is None or layer is None or layer._modules.get("self_attn") is not attn:
            raise InputError(f"engine='sdpa' cannot drive layer {i}: its attention is not a bridge over the Hugging "
                             "Face module's self_attn. Use engine='eager'.")
        if getattr(native, "layer_idx", None) != i or not hasattr(native, "scaling") or native.config is not config:
            raise InputError(f"engine='sdpa' cannot drive layer {i}'s attention ({type(native).__name__}): it does not "
                             "dispatch through config._attn_implementation with a layer_idx. Use engine='eager'.")


@contextlib.contextmanager
def fused_attention(model, observer: LseCensus | FirstKeyWeights | None = None) -> Iterator[None]:
    """Inside, every forward of the bridge runs each layer's HF attention module with :func:`_lse_attention`
    (no [T, T] tensor); ``observer`` receives each layer's (q, k, LSE). Restored on exit, also on error.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        observer: the census that reduces each layer, or None to only run the fused forward
            (e.g. to read residual-stream hooks at long context).
    """
    _check_fused_support(model)
    config = model.original_model.config
    layers = [block.original_component for block in model.blocks]
    previous = config._attn_implementation
    token = _OBSERVER.set(observer)
    try:
        for block, layer in zip(model.blocks, layers):
            layer._modules["self_attn"] = block.attn.original_component
        config._attn_implementation = ATTENTION_NAME
        yield
    finally:
        config._attn_implementation = previous
        for block, layer in zip(model.blocks, layers):
            layer._modules["self_attn"] = block.attn
        _OBSERVER.reset(token)


# --- the census ---------------------------------------------------------------------------------------

class LseCensus:
    """Reduces each layer's (q, k, LSE) of one sub-batch to relative-position sink scores and confidences.

    Args:
        mask: the sub-batch's 0/1 padding mask [batch, pos].
        layers: the layers to reduce (others run the kernel only).
        first_keys: m, the number of first key positions (relative to each prompt's first real token).
        full: also every key's column mean and each row's maximum weight.
        block: query rows per block in full mode (None: :func:`_block_rows`).
        backend: LSE kernel (None: by device).
    """

    def __init__(self, mask: Tensor, layers: Sequence[int], first_keys: int, full: bool, block: int | None,
                 backend: str | None):
        self.query = mask.float()
        self.absolute, self.valid, self.lengths = relative_index(mask)
        self.first_keys, self.full, self.backend = first_keys, full, backend
        self.block = block or _block_rows(mask.shape[1])
        self.slots = {layer: i for i, layer in enumerate(layers)}
        width = mask.shape[1] if full else first_keys
        n = mask.shape[0]
        self.alpha: dict[int, Tensor] = {}
        self.confidence: dict[int, Tensor] = {}
        self.shape = (n, width)
        self.backends: set[str] = set()

    def observe(self, layer: int, query: Tensor, key: Tensor, lse: Tensor, mask: Tensor | None, scaling: float,
                backend: str) -> None:
        """Reduce one layer (called by :func:`_lse_attention`)."""
        if layer not in self.slots:
            return
        self.backends.add(backend)
        if self.full:
            self.alpha[layer], self.confidence[layer] = self._full(query, key, lse, mask, scaling)
        else:
            self.alpha[layer] = self._first(query, key, lse, mask, scaling)
            self.confidence[layer] = torch.full(query.shape[:2], float("nan"), device=query.device)

    def _first(self, query, key, lse, mask, scaling) -> Tensor:
        m = self.first_keys
        positions = self.absolute[:, :m]  # [b, m] absolute key positions of relative keys 0..m-1
        index = positions[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
        scores = _group_scores(query, key.gather(2, index), scaling)  # [b, h, T, m]
        rows = torch.arange(query.shape[2], device=query.device)
        if mask is None:
            allowed = rows[None, :, None] >= positions[:, None, :]
        else:
            allowed = mask[:, 0].gather(2, positions[:, None, :].expand(-1, query.shape[2], -1))
        allowed = allowed & self.query.bool()[:, :, None]  # [b, T, m]
        weights = scores.sub_(lse[..., None]).exp_().masked_fill_(~allowed[:, None], 0.0)
        seen_by = (self.lengths[:, None] - torch.arange(m, device=query.device)[None, :]).float()
        return weights.sum(2) / seen_by[:, None, :]

    def _full(self, query, key, lse, mask, scaling) -> tuple[Tensor, Tensor]:
        b, n_heads, width, _ = query.shape
        column = torch.zeros((b, n_heads, width), dtype=torch.float32, device=query.device)
        row_max = torch.zeros((b, n_heads, width), dtype=torch.float32, device=query.device)
        padded = bool((self.query == 0).any())
        for start in range(0, width, self.block):
            stop = min(width, start + self.block)
            weights = _group_scores(query[:, :, start:stop], key[:, :, :stop], scaling)
            weights.sub_(lse[:, :, start:stop, None]).exp_()
            weights.masked_fill_(~_allowed_block(mask, start, stop, query.device), 0.0)
            row_max[:, :, start:stop] = weights.amax(-1)
            if padded:
                weights.mul_(self.query[:, None, start:stop, None])
            column[:, :, :stop] += weights.sum(2)
        seen_by = self.query.flip(1).cumsum(1).flip(1)
        column_mean = column / seen_by[:, None, :]
        alpha = gather_relative(column_mean, self.absolute, self.valid)
        confidence = (row_max * self.query[:, None, :]).sum(-1) / self.lengths[:, None].float()
        return alpha, confidence

    def result(self) -> tuple[Tensor, Tensor]:
        """``(alpha [batch, layer, head, key], confidence [batch, layer, head])`` on the CPU."""
        missing = [layer for layer in self.slots if layer not in self.alpha]
        if missing:
            raise RuntimeError(f"The fused forward did not reach layers {missing}: the attention dispatch was "
                               "bypassed.")
        order = sorted(self.slots, key=self.slots.get)
        return (torch.stack([self.alpha[layer] for layer in order], 1).cpu(),
                torch.stack([self.confidence[layer] for layer in order], 1).cpu())


def lse_statistics(model, batch: TokenBatch, layers: Sequence[int], first_keys: int = 4, full: bool = False,
                   batch_size: int = 8, block_size: int | None = None, backend: str | None = None,
                   show_progress: bool = True) -> tuple[Float[Tensor, "batch layer head key"],
                                                        Float[Tensor, "batch layer head"], str]:
    """Sink scores (first ``first_keys`` relative keys, or every key with ``full``) and confidences
    (NaN unless ``full``) of ``layers`` from fused forwards; what :func:`sinklens.run_census` returns
    for engine="sdpa". Inputs are checked by the caller.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        batch: validated tokens and 0/1 mask.
        layers: sorted layer indices.
        first_keys: m, the first key positions measured when not ``full``.
        full: every key's column mean and each row's maximum, over blocks of query rows.
        batch_size: prompts per forward.
        block_size: query rows per block in full mode (None: about 4% of the width).
        backend: LSE kernel, one of ``BACKENDS`` (None: by device).
        show_progress: progress bar over sub-batches.
    Returns:
        ``(alpha, confidence, backends used joined by "+")``.
    """
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise InputError(f"block_size must be a positive int or None, got {block_size!r}.")
    if backend is not None and backend not in BACKENDS:
        raise InputError(f"Unknown LSE backend {backend!r}: use one of {BACKENDS}.")
    _check_fused_support(model)
    n, width = batch.tokens.shape
    alpha = torch.full((n, len(layers), model.cfg.n_heads, width if full else first_keys), float("nan"))
    confidence = torch.empty((n, len(layers), model.cfg.n_heads))
    used: set[str] = set()
    last = max(layers) + 1
    stop = last if last < model.cfg.n_layers else None
    for offset, sub in batches(batch, batch_size, desc="sink census (sdpa)", show_progress=show_progress):
        rows = slice(offset, offset + sub.tokens.shape[0])
        census = LseCensus(sub.attention_mask, layers, first_keys, full, block_size, backend)
        with fused_attention(model, census), torch.inference_mode():
            model(sub.tokens, attention_mask=sub.attention_mask, stop_at_layer=stop)
        sub_alpha, sub_conf = census.result()
        alpha[rows, :, :, :sub_alpha.shape[-1]] = sub_alpha
        confidence[rows] = sub_conf
        used |= census.backends
    return alpha, confidence, "+".join(sorted(used))


class FirstKeyWeights:
    """Observer keeping one head's attention weights to the first ``n_keys`` keys for every query row.

    Args:
        layer, head: the head.
        n_keys: key positions 0..n_keys-1 (absolute; pass unpadded prompts).
    """

    def __init__(self, layer: int, head: int, n_keys: int):
        self.layer, self.head, self.n_keys = layer, head, n_keys
        self.weights: Tensor | None = None
        self.backend: str | None = None

    def observe(self, layer: int, query: Tensor, key: Tensor, lse: Tensor, mask: Tensor | None, scaling: float,
                backend: str) -> None:
        """Keep [batch, query, n_keys] weights of the head (called by :func:`_lse_attention`)."""
        if layer != self.layer:
            return
        group = query.shape[1] // key.shape[1]
        q = query[:, self.head:self.head + 1]
        k = key[:, self.head // group:self.head // group + 1, :self.n_keys]
        scores = _group_scores(q, k, scaling)[:, 0]  # [b, T, n_keys]
        allowed = _allowed_block(mask, 0, query.shape[2], query.device)[:, 0, :, :self.n_keys]
        weights = scores.sub_(lse[:, self.head, :, None]).exp_().masked_fill_(~allowed, 0.0)
        self.weights = weights.cpu()


def first_key_weights(model, tokens: TokenBatch, layer: int, head: int, first_keys: int = 16, *,
                      n_keys: int | None = None) -> Float[Tensor, "batch query key"]:
    """Attention weights of head (``layer``, ``head``) from every query to keys 0..first_keys-1, from one fused
    forward stopped after ``layer`` (O(T x first_keys) memory). Prompts must be unpadded.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: an unpadded :class:`TokenBatch` (e.g. from :func:`sinklens.probe_tokens`).
        layer, head: the head to read.
        first_keys: number of first key positions (the word ``run_census`` uses for the same count).
        n_keys: the former name of ``first_keys`` (deprecated).
    """
    if n_keys is not None:
        warnings.warn("first_key_weights(n_keys=) is now first_keys=; n_keys will be removed in the next release.",
                      DeprecationWarning, stacklevel=2)
        first_keys = n_keys
    info_heads, info_layers = model.cfg.n_heads, model.cfg.n_layers
    if not isinstance(tokens, TokenBatch) or not bool(tokens.attention_mask.bool().all()):
        raise InputError("first_key_weights needs an unpadded TokenBatch (e.g. sinklens.probe_tokens).")
    check_index("layer", layer, info_layers, "layers")
    check_index("head", head, info_heads, "heads")
    width = tokens.tokens.shape[1]
    if isinstance(first_keys, bool) or not isinstance(first_keys, int) or not 1 <= first_keys <= width:
        raise InputError(f"first_keys must be an int in 1..{width} (the prompt length), got {first_keys!r}.")
    observer = FirstKeyWeights(layer, head, first_keys)
    stop = layer + 1 if layer + 1 < info_layers else None
    with fused_attention(model, observer), torch.inference_mode():
        model(tokens.tokens, attention_mask=tokens.attention_mask, stop_at_layer=stop)
    return observer.weights
