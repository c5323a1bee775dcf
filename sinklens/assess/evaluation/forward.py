"""The scoring forward: the model's own forward on a :class:`~sinklens.assess.evaluation.requests.Batch`, every family.

The HF causal LM is called with the batch's tokens, its explicit position ids and a 4-D additive block
mask (what a plain ``model(tokens)`` cannot take), so the embedding (scaled or with learned positions),
rotary variants, the per-layer masks, the final norm, the unembedding and any final logit softcap are
the family's own code; hooks and pruning edits act as in any forward. Three things are added around it,
family-independently:

- each decoder layer is wrapped for the duration of the forward (:class:`LayerStep`): layers below
  ``start_layer`` pass their input through, the stored residual replaces the stream entering
  ``start_layer`` (the layer-selection sweep reuses the dense prefix), the stream entering a ``capture``
  layer is kept, and a sliding-window layer gets the block mask narrowed to its window;
- the base model's output is cut to the scored positions before the LM head, so logits are computed
  for the targets only;
- log-probabilities are taken in float32.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ...core.errors import UnsupportedArchitectureError
from .requests import Batch


def additive_mask(allowed: Bool[Tensor, "batch query key"], dtype: torch.dtype) -> Float[Tensor, "batch 1 query key"]:
    """The eager-attention additive mask of a bool mask: 0 where allowed, the dtype's minimum elsewhere.

    This is what transformers' ``create_causal_mask`` returns for eager attention.

    Args:
        allowed: which keys each query may attend to.
        dtype: the dtype of the attention scores (the model's dtype).
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def sliding_window(model, layer: int) -> int | None:
    """The sliding window of ``layer``'s attention, or None for full attention.

    Read as the family's attention code reads it: the attention module's own ``sliding_window`` (Gemma 2,
    Qwen2/3: set on sliding layers only) where it has one, else the config's (Mistral, Phi-3: every layer).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        layer: the layer index.
    """
    attention = model.blocks[layer].attn.original_component
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(model.original_model.config, "sliding_window", None)


def _windowed(allowed: Bool[Tensor, "batch query key"], positions, window: int) -> Bool[Tensor, "batch query key"]:
    """``allowed`` narrowed to keys fewer than ``window`` positions behind the query (transformers'
    ``sliding_window_overlay``: key > query - window), by position ids so that a block-packed choice sees the
    window its own sequence would.

    Args:
        allowed: which keys each query may attend to.
        positions: position ids [batch, pos].
        window: the sliding window.
    """
    positions = positions.to(allowed.device)
    return allowed & (positions[:, :, None] - positions[:, None, :] < window)


class LayerStep(nn.Module):
    """A decoder layer during one scoring forward: skipped, fed, captured or given its window's mask.

    Args:
        layer: the model's layer (the bridge's block).
        index: its index.
        start_layer: layers below it pass their input through unchanged.
        resid: the residual stream entering ``start_layer`` (None: the model's own embedding output).
        store: where the stream entering this layer is put when ``capture``.
        capture: keep the stream entering this layer in ``store``.
        mask: the additive mask this layer uses instead of the model's (a sliding-window layer), or None.
    """

    def __init__(self, layer: nn.Module, index: int, start_layer: int, resid: Tensor | None, store: dict,
                 capture: bool, mask: Tensor | None):
        super().__init__()
        self.layer, self.index, self.start_layer = layer, index, start_layer
        self.resid, self.store, self.capture, self.mask = resid, store, capture, mask

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if self.index < self.start_layer:
            return hidden_states
        if self.index == self.start_layer and self.resid is not None:
            hidden_states = self.resid
        if self.capture:
            self.store[self.index] = hidden_states
        if self.mask is not None:
            if "attention_mask" not in kwargs:
                raise UnsupportedArchitectureError(
                    f"Layer {self.index} has a sliding window but the model passes its attention mask positionally: "
                    "sinklens cannot give it the _windowed block mask.")
            kwargs["attention_mask"] = self.mask
        return self.layer(hidden_states, *args, **kwargs)


def _decoder_layers(model) -> nn.ModuleList:
    """The module list the HF base model loops over: the one holding the bridge's blocks.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    base = model.original_model.base_model
    for child in base.children():
        if isinstance(child, nn.ModuleList) and len(child) == len(model.blocks) and all(
                a is b for a, b in zip(child, model.blocks)):
            return child
    raise UnsupportedArchitectureError(f"{type(base).__name__} keeps its decoder layers in no module list of the "
                                       "bridge's blocks: load the model with sinklens.load_model.")


def forward_scores(model, batch: Batch, *, start_layer: int = 0,
                   resid: Float[Tensor, "batch pos d_model"] | None = None, capture: Collection[int] = ()
                   ) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"], dict[int, Float[Tensor, "batch pos d_model"]]]:
    """Log-probability of each target (float32), whether it is the top-1 prediction, and captured residuals.

    Runs the model's own forward (embedding, layers with hooks and edits, final norm, LM head and softcap)
    with the batch's block mask and position ids; layers below ``start_layer`` are skipped and ``resid``
    enters ``start_layer``; logits are computed on the scored positions only.

    Args:
        model: a bridge from :func:`sinklens.load_model` (any supported family).
        batch: the requests of one forward.
        start_layer: first layer to run; layers below it are skipped (needs ``resid``).
        resid: the residual stream entering ``start_layer``, or None to start from the embeddings.
        capture: layers whose entering residual is returned (for later runs that start there).
    """
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(model, "blocks"):
        raise UnsupportedArchitectureError("Evaluation runs the model's own forward through the bridge's blocks: "
                                           "load the model with sinklens.load_model.")
    layers = _decoder_layers(model)
    dtype = hf.get_input_embeddings().weight.dtype
    mask = additive_mask(batch.allowed, dtype)
    length = batch.tokens.shape[1]
    store: dict[int, Tensor] = {}
    steps = []
    for index, layer in enumerate(layers):
        window = sliding_window(model, index)
        narrowed = None
        if window is not None and window < length:
            narrowed = additive_mask(_windowed(batch.allowed, batch.positions, window), dtype)
        steps.append(LayerStep(layer, index, start_layer, resid if index == start_layer else None, store,
                               index in capture, narrowed))

    def scored_positions(module, args, output):
        hidden = output.last_hidden_state
        output.last_hidden_state = hidden[batch.rows.to(hidden.device), batch.cols.to(hidden.device)].unsqueeze(0)
        return output

    handle = hf.base_model.register_forward_hook(scored_positions)
    try:
        for index, step in enumerate(steps):
            layers[index] = step
        with torch.inference_mode():
            logits = hf(input_ids=batch.tokens, attention_mask=mask, position_ids=batch.positions,
                        use_cache=False).logits[0].float()
            logp = logits.log_softmax(-1)
            targets = batch.targets.to(logits.device)  # the last layer's device under a device_map
            target_logp = logp.gather(1, targets[:, None])[:, 0]
            top = logits.argmax(-1) == targets
    finally:
        handle.remove()
        for index, step in enumerate(steps):
            layers[index] = step.layer
    return target_logp, top, store
