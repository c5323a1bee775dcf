"""Offline circuitsvis attention views.

Attention views: the pattern comes from the model itself (``run_with_cache`` filtered to one
layer's ``hook_pattern``), the token strings from its tokenizer. circuitsvis' ``str(obj)``
imports its JavaScript from a CDN and shows nothing offline, so pages are built here with the
circuitsvis bundle (``dist/cdn/iife.js``, ~1.3 MB) inlined once per page, however many views the
page holds.
"""

from __future__ import annotations

import html as html_lib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.deprecation import keyword_only_after
from ..core.errors import InputError
from ..core.hooks import pattern_hook
from ..core.loading import model_info
from ..core.tokens import TokenBatch, as_batch, token_strings, tokenize
from ..core.validate import check_index
from ..prune.spec import check_heads

# --- attention views ----------------------------------------------------------------------------


def prompt_ids(model, prompt: str | Tensor | TokenBatch, *, prepend_bos: bool = True,
               row: int = 0) -> Int[Tensor, " pos"]:
    """Token ids of one prompt: a string (tokenized, BOS prepended if asked), a 1-D id tensor (used as
    is), or row ``row`` of a TokenBatch (its padding removed).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        prompt: a string, a 1-D id tensor or a TokenBatch.
        prepend_bos: prepend BOS to a string prompt.
        row: the row of a TokenBatch.
    """
    if isinstance(prompt, str):
        batch = tokenize(model, prompt, prepend_bos=prepend_bos)
    elif isinstance(prompt, TokenBatch):
        check_index("row", row, prompt.tokens.shape[0], "prompts in the batch")
        batch = TokenBatch(prompt.tokens[row:row + 1], prompt.attention_mask[row:row + 1], prompt.prepend_bos)
    elif isinstance(prompt, Tensor) and prompt.dim() == 1:
        batch = prompt
    else:
        raise InputError(f"prompt must be a string, a 1-D tensor of token ids or a TokenBatch, got "
                         f"{type(prompt).__name__}{tuple(prompt.shape) if isinstance(prompt, Tensor) else ''}: "
                         "pick one prompt (e.g. batch.tokens[0] or TokenBatch with row=).")
    batch = as_batch(model, batch)
    return batch.tokens[0][batch.attention_mask[0].bool()].cpu()


def _layer_pattern(model, ids: Int[Tensor, " pos"], layer: int) -> Float[Tensor, "head query key"]:
    """Attention pattern of every head of ``layer`` on one prompt, read from ``hook_pattern``.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        ids: token ids of one prompt.
        layer: the layer index.
    """
    info = model_info(model)
    layer = check_index("layer", layer, info.n_layers, "layers")
    batch = as_batch(model, ids)
    name = pattern_hook(layer)
    stop = layer + 1 if layer + 1 < info.n_layers else None
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=name,
                                        stop_at_layer=stop)
    return cache[name][0].float().cpu()


@dataclass
class AttentionView:
    """Attention patterns of some heads of one layer on one prompt, ready for circuitsvis.

    ``heads`` are ``(layer, head)`` pairs, all in ``layer`` (head indices of ``layer`` are made into pairs).
    """

    layer: int
    heads: list[tuple[int, int]]
    tokens: list[str]
    pattern: Float[Tensor, "head query key"]
    title: str = ""
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        pairs = [(self.layer, int(h)) if not hasattr(h, "__len__") else (int(h[0]), int(h[1])) for h in self.heads]
        other = sorted({l for l, _ in pairs} - {self.layer})
        if other:
            raise InputError(f"An AttentionView shows one layer ({self.layer}); heads of layers {other} were given.")
        self.heads = pairs

    def head_names(self) -> list[str]:
        return [f"L{l}H{h}" for l, h in self.heads]

    def props(self) -> dict:
        """The circuitsvis ``AttentionHeads`` properties (weights rounded to 5 decimals to keep pages small)."""
        return {"attention": torch.round(self.pattern, decimals=5).tolist(), "tokens": self.tokens,
                "attentionHeadNames": self.head_names(), "maskUpperTri": True}

    def fragment(self, include_script: bool = True) -> str:
        """HTML snippet (a div and its render call); with ``include_script`` the circuitsvis bundle is inlined.

        Args:
            include_script: inline the circuitsvis bundle (once per page).
        """
        return (_bundle_tag() if include_script else "") + _view_div(self)

    def html(self) -> str:
        """A self-contained HTML page holding this view (opens offline)."""
        return views_page([self], title=self.title or f"Layer {self.layer}")

    def _repr_html_(self) -> str:
        return self.fragment()


def attention_view(model, prompt: str | Tensor | TokenBatch, heads: Sequence[tuple[int, int]] | None = None, *,
                   layer: int | None = None, prepend_bos: bool = True, row: int = 0,
                   title: str | None = None) -> AttentionView:
    """Attention of ``heads`` (``(layer, head)`` pairs, all in one layer), or of every head of ``layer``, on one
    prompt, as an :class:`AttentionView`.

    The pattern is the model's own ``hook_pattern``; tokens are decoded by its tokenizer.
    See :func:`prompt_ids` for the accepted prompts.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        prompt: a string, a 1-D id tensor or a TokenBatch (see :func:`prompt_ids`).
        heads: ``(layer, head)`` pairs of one layer, e.g. ``[(14, 3), (14, 7)]``; None: every head of ``layer``.
        layer: the layer whose every head is shown (only without ``heads``).
        prepend_bos: prepend BOS to a string prompt.
        row: the row of a TokenBatch.
        title: the view's title (default: model, layer and heads).
    """
    info = model_info(model)
    if heads is None:
        if layer is None:
            raise InputError("Pass heads=[(layer, head), ...] (one layer), or layer= for every head of a layer.")
        layer = check_index("layer", layer, info.n_layers, "layers")
        pairs = [(layer, h) for h in range(info.n_heads)]
    else:
        if layer is not None:
            raise InputError("Pass heads= or layer=, not both: heads are (layer, head) pairs and name their layer.")
        check_heads(heads, info)
        pairs = [(int(l), int(h)) for l, h in heads]  # in the caller's order
        layers = sorted({l for l, _ in pairs})
        if len(layers) != 1:
            raise InputError(f"An attention view shows one layer, but heads span layers {layers}: make one view per "
                             "layer (sinklens.layer_heads(heads, layer) picks a layer's heads).")
        layer = layers[0]
    ids = prompt_ids(model, prompt, prepend_bos=prepend_bos, row=row)
    heads = [h for _, h in pairs]
    pattern = _layer_pattern(model, ids, layer)[heads]
    names = ", ".join(f"H{h}" for h in heads) if len(heads) <= 4 else f"{len(heads)} heads"
    return AttentionView(layer=layer, heads=pairs, tokens=token_strings(model, ids), pattern=pattern,
                         title=title or f"{info.name}: layer {layer}, {names}", token_ids=ids.tolist())


@keyword_only_after("views", since="0.2")
def views_page(views: Sequence[AttentionView], *, title: str = "Attention views") -> str:
    """One self-contained HTML page with every view, the circuitsvis bundle inlined once.

    Args:
        views: the views, in page order.
        title: the page title.
    """
    views = list(views)
    if not views or not all(isinstance(v, AttentionView) for v in views):
        raise InputError("views must be a non-empty list of AttentionView (from sinklens.report.views.attention_view).")
    # a view whose title is the page's is not titled twice
    body = "\n".join((f"<h2>{html_lib.escape(v.title)}</h2>\n" if v.title and v.title != title else "") + _view_div(v)
                     for v in views)
    return (f'<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>{html_lib.escape(title)}</title>\n'
            f"{_bundle_tag()}\n</head>\n<body>\n<h1>{html_lib.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


@lru_cache(maxsize=1)
def _bundle() -> str:
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise InputError(f"The circuitsvis bundle {path} is missing: reinstall circuitsvis (pip install "
                         "--force-reinstall circuitsvis).")
    # "</script" inside the bundle's strings would end the inline script; "<\/script" is the same JS string
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script")


def _bundle_tag() -> str:
    """A classic script defining the global ``CircuitsVis`` (shared by every view on the page)."""
    return f"<script>\n{_bundle()}\n</script>\n"


def _view_div(view: AttentionView) -> str:
    element = "circuits-vis-" + uuid.uuid4().hex[:12]
    props = json.dumps(view.props()).replace("</", "<\\/")
    return (f'<div id="{element}" style="margin: 15px 0;"></div>\n<script>\n'
            f'CircuitsVis.render("{element}", CircuitsVis.AttentionHeads, {props});\n</script>\n')
