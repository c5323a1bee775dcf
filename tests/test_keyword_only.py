"""Options of the public functions are keyword-only; a former positional call warns for one release.

- the README's calls bind to the signatures as written (no deprecated path);
- each former positional spelling warns with the keyword's name and gives the keyword call's result;
- every public function of the measuring, evaluation and view modules takes its defaulted parameters by
  keyword, apart from a short, named list of naturally positional ones (so the rule stays enforced).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import sinklens as sl
from sinklens.assess.evaluation import build_plan, plan_fingerprint
from sinklens.assess.evaluation.metrics import retention_value
from sinklens.core.deprecation import keyword_only_after
from sinklens.report import views

from helpers import random_tokens

README = Path(__file__).resolve().parents[1] / "README.md"

# the modules whose public functions follow the rule
MODULES = ("sinklens.measure.census", "sinklens.measure.massive", "sinklens.measure.massive_tokens",
           "sinklens.measure.specialization", "sinklens.assess.evaluation", "sinklens.assess.evaluation.plan",
           "sinklens.assess.evaluation.metrics", "sinklens.report.views")
# defaulted parameters that stay positional: what the call is about, not how it runs
NATURALLY_POSITIONAL = {
    "sink_specialized_heads": {"eps", "q"},
    "specialization_table": {"eps", "q"},
    "evaluate": {"suite"},
    "build_plan": {"suite"},
    "attention_view": {"heads"},
    "load_items": {"path"},  # the item file (None: the bundled one), re-exported by sinklens.assess.evaluation
    "items_digest": {"path"},
}


def _public_functions():
    found = {}
    for name in sl.__all__:  # the top-level table, then every public function the modules define
        module = sl._WHERE.get(name)
        if module in MODULES and inspect.isfunction(getattr(sl, name)):
            found[name] = getattr(sl, name)
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if (not name.startswith("_") and inspect.isfunction(value)
                    and getattr(value, "__module__", "").startswith(module_name)):
                found.setdefault(name, value)
    return found


def test_every_public_option_is_keyword_only():
    functions = _public_functions()
    for name in ("run_census", "sink_scores", "first_token_comparison", "massive_activations", "bos_top_dims",
                 "massive_tokens", "sink_specialized_heads", "specialization_table", "evaluate", "build_plan",
                 "retention", "retention_value", "attention_view", "views_page", "prompt_ids"):
        assert name in functions, name
    offending = []
    for name, func in sorted(functions.items()):
        for param in inspect.signature(func).parameters.values():
            if (param.default is not param.empty and param.kind is not param.KEYWORD_ONLY
                    and param.name not in NATURALLY_POSITIONAL.get(name, set())):
                offending.append(f"{name}({param.name}=...)")
    assert not offending, f"options that are not keyword-only: {offending}"


def _readme_calls():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Call):
            func = node.func
            yield (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)), node


def test_the_readme_calls_bind_as_written():
    functions = _public_functions()
    seen = set()
    for name, call in _readme_calls():
        if name not in functions or name == "sink_scores":  # census.sink_scores(0) is the Census method
            continue
        seen.add(name)
        signature = inspect.signature(inspect.unwrap(functions[name]))
        signature.bind(*range(len(call.args)), **{kw.arg: None for kw in call.keywords})  # TypeError if refused
    assert {"run_census", "sink_specialized_heads", "evaluate", "retention"} <= seen
    method = inspect.signature(sl.Census.sink_scores)  # census.sink_scores(0)
    method.bind(None, 0)


def test_the_readme_forms_run_without_a_warning(tiny):
    probe = sl.TokenBatch(random_tokens(3, 12), torch.ones(3, 12, dtype=torch.long), True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        census = sl.run_census(tiny, probe)
        heads = sl.sink_specialized_heads(census.sink_scores(0), eps=0.3, q=0.9)
        table = sl.specialization_table(census.sink_scores(0), 0.3, 0.9, n_boot=10)
    assert isinstance(heads, list) and len(table)


def _assert_same(a, b):
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for field in dataclasses.fields(a):
            _assert_same(getattr(a, field.name), getattr(b, field.name))
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    else:
        assert a == b


def _former_calls(tiny, tmp_path):
    """keyword -> (former positional call, keyword call)."""
    tokens = random_tokens(2, 12, seed=4)
    mask = torch.ones_like(tokens)
    mask[1, -3:] = 0
    with_bos = sl.run_census(tiny, sl.TokenBatch(tokens, torch.ones_like(tokens), True), show_progress=False)
    no_bos = sl.run_census(tiny, sl.TokenBatch(tokens[:, 1:], torch.ones_like(tokens[:, 1:]), False),
                           show_progress=False)
    result = sl.evaluate(tiny, "copy", n_copy=2, copy_len=6, show_progress=False)
    ids = views.prompt_ids(tiny, tokens[0])
    view = views.attention_view(tiny, ids, [(0, 1)])
    return {
        "attention_mask": (lambda: sl.run_census(tiny, tokens, mask, None, 1, False),
                           lambda: sl.run_census(tiny, tokens, attention_mask=mask, batch_size=1, show_progress=False)),
        "key_pos": (lambda: sl.sink_scores(tiny, tokens, 1, mask),
                    lambda: sl.sink_scores(tiny, tokens, key_pos=1, attention_mask=mask)),
        "eps": (lambda: sl.first_token_comparison(with_bos, no_bos, 0.5),
                lambda: sl.first_token_comparison(with_bos, no_bos, eps=0.5)),
        "massive_activations attention_mask": (
            lambda: sl.massive_activations(tiny, tokens, mask, show_progress=False),
            lambda: sl.massive_activations(tiny, tokens, attention_mask=mask, show_progress=False)),
        "basis": (lambda: sl.bos_top_dims(tiny, tokens, 1, 3, "resid"),
                  lambda: sl.bos_top_dims(tiny, tokens, 1, 3, basis="resid")),
        "top_n": (lambda: sl.massive_tokens(tiny, tokens, mask, [0, 2], 4, 2, False),
                  lambda: sl.massive_tokens(tiny, tokens, attention_mask=mask, layers=[0, 2], top_n=4, batch_size=2,
                                            show_progress=False)),
        "limit": (lambda: plan_fingerprint(build_plan(tiny, "copy", 1, n_copy=2, copy_len=6)),
                  lambda: plan_fingerprint(build_plan(tiny, "copy", limit=1, n_copy=2, copy_len=6))),
        "evaluate limit": (
            lambda: sl.evaluate(tiny, "copy", 1, n_copy=2, copy_len=6, show_progress=False).metrics,
            lambda: sl.evaluate(tiny, "copy", limit=1, n_copy=2, copy_len=6, show_progress=False).metrics),
        "metric": (lambda: retention_value(result, result, "copy/acc"),
                   lambda: retention_value(result, result, metric="copy/acc")),
        "title": (lambda: views.views_page([view], "one view").count("one view"),
                  lambda: views.views_page([view], title="one view").count("one view")),
    }


CASES = ["attention_mask", "key_pos", "eps", "massive_activations attention_mask", "basis", "top_n", "limit",
         "evaluate limit", "metric", "title"]


def test_former_positional_calls_warn_and_agree(tiny, tmp_path):
    calls = _former_calls(tiny, tmp_path)
    assert sorted(calls) == sorted(CASES)
    for case in CASES:
        former, keyword = calls[case]
        with pytest.warns(DeprecationWarning, match=rf"\b{case.split()[-1]}=\.\.\."):
            old = former()
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            new = keyword()
        _assert_same(old, new)


def test_the_decorator_keeps_signature_and_docstring():
    @keyword_only_after("b", since="0.2")
    def f(a, b, *, c=1, d=2):
        """Doc."""
        return a, b, c, d

    assert f.__doc__ == "Doc." and f.__name__ == "f"
    assert str(inspect.signature(f)) == "(a, b, *, c=1, d=2)"
    assert f(1, 2, d=4) == (1, 2, 1, 4)
    with pytest.warns(DeprecationWarning, match=r"c, d positionally .* since sinklens 0\.2; write c=\.\.\., d="):
        assert f(1, 2, 3, 4) == (1, 2, 3, 4)
    with pytest.raises(TypeError, match="at most 2 positional"):
        f(1, 2, 3, 4, 5)
    with pytest.raises(TypeError, match="multiple values for argument 'c'"):
        f(1, 2, 3, c=3)


def test_the_decorator_maps_only_the_former_positionals():
    @keyword_only_after("a", since="0.2", formerly=("d",))
    def g(a, *, c=1, d=2):
        return a, c, d

    with pytest.warns(DeprecationWarning, match="d="):
        assert g(0, 5) == (0, 1, 5)
    with pytest.raises(TypeError, match="at most 1 positional"):
        g(0, 5, 6)
    with pytest.raises(TypeError, match="not its last positional"):
        keyword_only_after("c", since="0.2")(g.__wrapped__)
    with pytest.raises(TypeError, match="not keyword-only"):
        keyword_only_after("a", since="0.2", formerly=("a",))(g.__wrapped__)
