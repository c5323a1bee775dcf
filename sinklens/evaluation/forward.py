"""The scoring forward: the bridge's own decoder layers on a :class:`~sinklens.evaluation.requests.Batch`.

The layers are called directly with a block attention mask and explicit position ids (what a plain
``model(tokens)`` cannot take), hooks and pruning edits included, then the final norm and the
unembedding on the scored positions only. Log-probabilities are taken in float32. A forward can start
at a later layer from a stored residual (the layer-selection sweep reuses the dense prefix).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import UnsupportedArchitectureError
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


def forward_scores(model, batch: Batch, *, start_layer: int = 0,
                   resid: Float[Tensor, "batch pos d_model"] | None = None, capture: Collection[int] = ()
                   ) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"], dict[int, Float[Tensor, "batch pos d_model"]]]:
    """Log-probability of each target (float32), whether it is the top-1 prediction, and captured residuals.

    Runs the bridge's own blocks (the HF decoder layers, hooks and edits included) from ``start_layer`` on
    ``resid`` (or from the embeddings), then the final norm and unembedding on the scored positions only.

    Args:
        model: a bridge from :func:`sinklens.load_model` (a Llama-family decoder).
        batch: the requests of one forward.
        start_layer: first layer to run; layers below it are skipped (needs ``resid``).
        resid: the residual stream entering ``start_layer``, or None to start from the embeddings.
        capture: layers whose entering residual is returned (for later runs that start there).
    """
    hf = getattr(model, "original_model", None)
    inner = getattr(hf, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise UnsupportedArchitectureError("Evaluation runs the decoder layers of a Llama-family model (model.layers, "
                                           "norm, rotary_emb): load the model with sinklens.load_model.")
    n_layers = len(inner.layers)
    with torch.inference_mode():
        hidden = inner.embed_tokens(batch.tokens) if resid is None else resid
        mask = additive_mask(batch.allowed, hidden.dtype)
        rotary = inner.rotary_emb(hidden, position_ids=batch.positions)
        store = {}
        for layer in range(start_layer, n_layers):
            if layer in capture:
                store[layer] = hidden
            hidden = inner.layers[layer](hidden, attention_mask=mask, position_embeddings=rotary,
                                         position_ids=batch.positions)
        picked = hidden[batch.rows.to(hidden.device), batch.cols.to(hidden.device)].unsqueeze(0)
        logits = hf.lm_head(inner.norm(picked))[0].float()
        logp = logits.log_softmax(-1)
        targets = batch.targets.to(logits.device)  # the last layer's device under a device_map
        target_logp = logp.gather(1, targets[:, None])[:, 0]
        top = logits.argmax(-1) == targets
    return target_logp, top, store
