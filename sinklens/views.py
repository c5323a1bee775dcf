"""What the notebooks show: offline circuitsvis attention views, and the summaries of a sink census.

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

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .census import Census
from .errors import InputError
from .hooks import pattern_hook
from .loading import model_info
from .massive import MassiveActivations
from .tokens import TokenBatch, as_batch, tokenize
from .validate import check_fraction, check_index

# --- attention views ----------------------------------------------------------------------------


def token_strings(model, ids: Int[Tensor, " pos"] | Sequence[int]) -> list[str]:
    """One display string per token id, decoded one id at a time by the model's tokenizer."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return [model.tokenizer.decode([int(i)]) for i in ids]


def prompt_ids(model, prompt: str | Tensor | TokenBatch, prepend_bos: bool = True, row: int = 0) -> Int[Tensor, " pos"]:
    """Token ids of one prompt: a string (tokenized, BOS prepended if asked), a 1-D id tensor (used as
    is), or row ``row`` of a TokenBatch (its padding removed)."""
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


def layer_pattern(model, ids: Int[Tensor, " pos"], layer: int) -> Float[Tensor, "head query key"]:
    """Attention pattern of every head of ``layer`` on one prompt, read from ``hook_pattern``."""
    info = model_info(model)
    check_index("layer", layer, info.n_layers, "layers")
    batch = as_batch(model, ids)
    name = pattern_hook(layer)
    stop = layer + 1 if layer + 1 < info.n_layers else None
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=name,
                                        stop_at_layer=stop)
    return cache[name][0].float().cpu()


@dataclass
class AttentionView:
    """Attention patterns of some heads of one layer on one prompt, ready for circuitsvis."""

    layer: int
    heads: list[int]
    tokens: list[str]
    pattern: Float[Tensor, "head query key"]
    title: str = ""
    token_ids: list[int] = field(default_factory=list)

    def head_names(self) -> list[str]:
        return [f"L{self.layer}H{h}" for h in self.heads]

    def props(self) -> dict:
        """The circuitsvis ``AttentionHeads`` properties (weights rounded to 5 decimals to keep pages small)."""
        return {"attention": torch.round(self.pattern, decimals=5).tolist(), "tokens": self.tokens, "attentionHeadNames": self.head_names(),
                "maskUpperTri": True}

    def fragment(self, include_script: bool = True) -> str:
        """HTML snippet (a div and its render call); with ``include_script`` the circuitsvis bundle is inlined."""
        return (_bundle_tag() if include_script else "") + _view_div(self)

    def html(self) -> str:
        """A self-contained HTML page holding this view (opens offline)."""
        return views_page([self], title=self.title or f"Layer {self.layer}")

    def _repr_html_(self) -> str:
        return self.fragment()


def attention_view(model, prompt: str | Tensor | TokenBatch, layer: int, heads: int | Sequence[int] | None = None,
                   prepend_bos: bool = True, row: int = 0, title: str | None = None) -> AttentionView:
    """Attention of ``heads`` (default: all heads) of ``layer`` on one prompt, as an :class:`AttentionView`.

    The pattern is the model's own ``hook_pattern``; tokens are decoded by its tokenizer.
    See :func:`prompt_ids` for the accepted prompts.
    """
    info = model_info(model)
    check_index("layer", layer, info.n_layers, "layers")
    heads = list(range(info.n_heads)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    if not heads:
        raise InputError("heads is empty: pass a head index, a list of heads, or None for all heads of the layer.")
    for head in heads:
        check_index("head", head, info.n_heads, "query heads per layer")
    ids = prompt_ids(model, prompt, prepend_bos=prepend_bos, row=row)
    pattern = layer_pattern(model, ids, layer)[heads]
    names = ", ".join(f"H{h}" for h in heads) if len(heads) <= 4 else f"{len(heads)} heads"
    return AttentionView(layer=layer, heads=heads, tokens=token_strings(model, ids), pattern=pattern,
                         title=title or f"{info.name}: layer {layer}, {names}", token_ids=ids.tolist())


def views_page(views: Sequence[AttentionView], title: str = "Attention views") -> str:
    """One self-contained HTML page with every view, the circuitsvis bundle inlined once."""
    views = list(views)
    if not views or not all(isinstance(v, AttentionView) for v in views):
        raise InputError("views must be a non-empty list of AttentionView (from sinklens.views.attention_view).")
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
        raise InputError(f"The circuitsvis bundle {path} is missing: reinstall circuitsvis (pip install --force-reinstall "
                         "circuitsvis).")
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


# --- choosing heads -----------------------------------------------------------------------------


def strongest_sink_head(source: Census | pd.DataFrame) -> tuple[int, int]:
    """``(layer, head)`` with the highest mean BOS sink score: from a Census (mean alpha_0 over
    prompts) or a ``specialization_table`` (its ``mean`` column)."""
    if isinstance(source, Census):
        mean = source.sink_scores(0).mean(0)
        flat = int(torch.argmax(torch.nan_to_num(mean, nan=-1.0)))
        return source.layers[flat // mean.shape[1]], flat % mean.shape[1]
    if isinstance(source, pd.DataFrame) and {"layer", "head", "mean"} <= set(source.columns) and not source.empty:
        best = source.loc[source["mean"].idxmax()]
        return int(best["layer"]), int(best["head"])
    raise InputError("strongest_sink_head needs a Census or the DataFrame from sinklens.specialization_table "
                     f"(columns layer, head, mean), got {type(source).__name__}.")


# --- summaries of a census ----------------------------------------------------------------------


def first_token_record(model, batch: TokenBatch) -> dict:
    """Which token the prompts start with: whether BOS was prepended, the distinct first ids and their strings."""
    if not isinstance(batch, TokenBatch):
        raise InputError(f"batch must be a TokenBatch (from sinklens.probe_tokens or tokenize), got {type(batch).__name__}.")
    starts = batch.attention_mask.argmax(1)
    first = batch.tokens.gather(1, starts[:, None]).flatten().cpu()
    ids = sorted(set(first.tolist()))
    info = model_info(model)
    return {"prepend_bos": batch.prepend_bos, "bos_id": info.bos_id,
            "bos_string": None if info.bos_id is None else token_strings(model, [info.bos_id])[0],
            "first_ids": ids[:20], "n_distinct_first_ids": len(ids),
            "first_strings": token_strings(model, ids[:20])}


def non_first_summary(census: Census, model=None, threshold: float = 0.1, min_queries: int = 8,
                      top_heads: int = 5) -> pd.DataFrame:
    """Non-first sinks (``Census.non_first_sinks``) grouped by token: hits (prompt, head, position
    triples), distinct prompts and heads, positions, mean score and the heads hit most often.
    Token strings are decoded when ``model`` is given."""
    if not isinstance(census, Census):
        raise InputError(f"census must be a Census (from sinklens.run_census), got {type(census).__name__}.")
    hits = census.non_first_sinks(threshold, min_queries)
    columns = ["token_id", "token", "n_hits", "n_prompts", "n_heads", "positions", "mean_score", "top_heads"]
    if hits.empty:
        return pd.DataFrame(columns=columns)
    hits = hits.assign(label=[f"L{l}H{h}" for l, h in zip(hits["layer"], hits["head"])])
    rows = []
    for token_id, part in hits.groupby("token_id"):
        positions = sorted(set(part["position"].tolist()))
        heads = part["label"].value_counts().head(top_heads)
        rows.append({"token_id": int(token_id), "token": None, "n_hits": len(part),
                     "n_prompts": part["prompt"].nunique(), "n_heads": part["label"].nunique(),
                     "positions": " ".join(map(str, positions[:10])) + (" ..." if len(positions) > 10 else ""),
                     "mean_score": float(part["score"].mean()),
                     "top_heads": " ".join(f"{k}({v})" for k, v in heads.items())})
    frame = pd.DataFrame(rows, columns=columns).sort_values("n_hits", ascending=False, ignore_index=True)
    if model is not None:
        frame["token"] = token_strings(model, frame["token_id"].tolist())
    return frame


# case names written by sinklens.census.first_token_comparison
CASE_BOS = "BOS at position 0"
CASE_AFTER_BOS = "first text token at position 1 (after BOS)"
CASE_NO_BOS = "first text token at position 0 (no BOS)"


def first_token_verdict(comparison: pd.DataFrame) -> dict:
    """Read a ``first_token_comparison`` table: overall sink rate and mean alpha per case, and a verdict.

    Rule (rates are Sink^eps over all heads): "position" when the first text token without BOS
    sinks at least half as often as BOS does and the same token behind BOS sinks less than half as
    often as without; "token" when without BOS it sinks less than half as often as BOS; else "mixed".
    """
    cases = (CASE_BOS, CASE_AFTER_BOS, CASE_NO_BOS)
    if not isinstance(comparison, pd.DataFrame) or not set(cases) <= set(comparison.get("case", [])):
        raise InputError(f"comparison must be the DataFrame from sinklens.first_token_comparison with cases {cases}.")
    overall = comparison.groupby("case")[["sink_rate", "mean_alpha"]].mean()
    rate = {case: float(overall.loc[case, "sink_rate"]) for case in cases}
    if rate[CASE_BOS] == 0 and rate[CASE_NO_BOS] == 0:
        verdict, text = "none", "Neither BOS nor the first text token is a sink at this eps."
    elif rate[CASE_NO_BOS] >= 0.5 * rate[CASE_BOS] and rate[CASE_AFTER_BOS] < 0.5 * rate[CASE_NO_BOS]:
        verdict, text = "position", ("The sink is positional: without BOS the first text token becomes the sink, "
                                     "and the same token behind BOS is not one.")
    elif rate[CASE_NO_BOS] < 0.5 * rate[CASE_BOS]:
        verdict, text = "token", "The sink follows the BOS token: without it, the first position sinks far less."
    else:
        verdict, text = "mixed", "Both the BOS token and the first position matter."
    return {"verdict": verdict, "explanation": text,
            "sink_rate_pct": rate, "mean_alpha": {case: float(overall.loc[case, "mean_alpha"]) for case in cases}}


def sink_discovery_summary(model, census: Census, massive: MassiveActivations, comparison: pd.DataFrame,
                           eps: float = 0.3, first_token: dict | None = None, probe: dict | None = None,
                           parameters: dict | None = None) -> dict:
    """The numbers notebook 01 reports, as a JSON-ready dict: Sink^eps overall and per layer, heads whose
    mean alpha_0 exceeds eps, the strongest head, massive dims by layer (resid basis, Sun et al.
    criterion), the with/without-BOS verdict, model info, the first token used, the probe set and
    the notebook parameters."""
    if not isinstance(census, Census) or not isinstance(massive, MassiveActivations):
        raise InputError("sink_discovery_summary needs a Census (run_census) and a MassiveActivations "
                         "(massive_activations).")
    check_fraction("eps", eps)
    mean_alpha = census.sink_scores(0).mean(0)
    dims = massive.massive_dims("resid")
    by_layer = {str(layer): sorted(int(d) for d in part["dim"]) for layer, part in dims.groupby("layer")}
    layer, head = strongest_sink_head(census)
    return {
        "model": model_info(model).as_dict(),
        "parameters": parameters,
        "prepend_bos": census.prepend_bos,
        "first_token": first_token,
        "probe": probe,
        "n_prompts": census.n_prompts,
        "eps": eps,
        "sink_rate_pct": census.sink_rate(eps),
        "sink_rate_by_layer_pct": {str(l): float(r) for l, r in zip(census.layers, census.sink_rate_by_layer(eps))},
        "n_heads": int(mean_alpha.numel()),
        "n_heads_mean_alpha0_above_eps": int((mean_alpha > eps).sum()),
        "strongest_head": {"layer": layer, "head": head,
                           "mean_alpha0": float(mean_alpha[census.layers.index(layer), head])},
        "massive_dims_by_layer": by_layer,
        "bos_comparison": first_token_verdict(comparison),
    }
