"""One head list per run: notebook 02's specialized_heads.json, read back and checked by notebooks 03-05."""

import json

import numpy as np
import pytest
import torch

import sinklens as sl
from sinklens.core.errors import InputError
from sinklens.series import head_list

from helpers import random_tokens

EPS, Q = 0.15, 0.5


@pytest.fixture
def probe(tiny):
    ids = random_tokens(6, 12, seed=3)
    texts = [" ".join(f"w{i}" for i in row[1:].tolist()) for row in ids]
    return sl.tokenize(tiny, texts, prepend_bos=True)


def hf_heads(hf_model, batch, eps, q):
    """Sink-specialized heads from HF eager attentions, in numpy: alpha_0 = mean over rows of A[:, 0]."""
    with torch.no_grad():
        attentions = hf_model(batch.tokens, attention_mask=batch.attention_mask, output_attentions=True).attentions
    alpha0 = np.stack([a[:, :, :, 0].double().numpy().mean(-1) for a in attentions], 1)  # [prompt, layer, head]
    frac = (alpha0 > eps).mean(0)
    return sorted((int(layer), int(head)) for layer, head in zip(*np.nonzero(frac >= q)))


def write(tmp_path, record, name="specialized_heads.json"):
    path = tmp_path / name
    path.write_text(json.dumps(record))
    return path


def test_measured_heads_match_hf_and_round_trip_through_the_file(tiny, hf_reference, probe, tmp_path):
    measured = head_list.specialized_heads(tiny, probe, eps=EPS, q=Q, batch_size=4)
    expected = hf_heads(hf_reference, probe, EPS, Q)
    assert expected and measured.heads == expected and measured.source == head_list.MEASURED
    record = head_list.head_list_record(tiny, measured.heads, eps=EPS, q=Q, prepend_bos=True,
                                        probe={"n_prompts": 6, "seq_len": 12})
    info = sl.model_info(tiny)
    assert record["n_specialized"] == len(expected) and record["n_heads"] == info.n_layers * info.n_heads
    assert record["headline"]["specialized_pct"] == pytest.approx(100 * len(expected) / record["n_heads"])
    path = write(tmp_path, record)
    listed = head_list.specialized_heads(tiny, probe, heads_from=str(path), eps=EPS, q=Q)
    assert listed.heads == expected and listed.source == str(path) and listed.probe["n_prompts"] == 6
    assert listed.as_dict() == {"heads_from": str(path), "n_sink_heads": len(expected), "eps": EPS, "q": Q,
                               "probe": {"n_prompts": 6, "seq_len": 12}}
    assert head_list.series_head_list("", tiny, eps=EPS, q=Q) is None  # standalone: the notebook measures


def _record(tiny, **changes):
    info = sl.model_info(tiny)
    record = head_list.head_list_record(tiny, [(0, 0), (info.n_layers - 1, info.n_heads - 1)], eps=EPS, q=Q,
                                        prepend_bos=True, probe={"n_prompts": 6, "seq_len": 12})
    for key, value in changes.items():
        if key.startswith("model_"):
            record["model"][key[len("model_"):]] = value
        else:
            record[key] = value
    return record


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file. In a series notebook 02 writes it into the run folder"),
    ("not json", "is not a head list written by notebook 02"),
    ("no heads", "is not a head list written by notebook 02 (its 'heads' must be a list"),
    ("other model", "holds the heads of model 'meta-llama/Llama-2-7b-hf', not of"),
    ("other shape", "was measured on a model of shape"),
    ("out of range", "lists head (3, 0), outside a model of 3 layers"),
    ("other eps", "was measured with eps=0.3, q=0.5, but this notebook has eps=0.15"),
])
def test_bad_heads_from_names_the_file_and_the_fix(tiny, probe, tmp_path, case, message):
    info = sl.model_info(tiny)
    if case == "missing":
        path = tmp_path / "nowhere.json"
    elif case == "not json":
        path = tmp_path / "broken.json"
        path.write_text("{not json")
    elif case == "no heads":
        path = write(tmp_path, _record(tiny, heads=None))
    elif case == "other model":
        path = write(tmp_path, _record(tiny, model_name="meta-llama/Llama-2-7b-hf"))
    elif case == "other shape":  # same name, e.g. a checkpoint folder overwritten by another model
        path = write(tmp_path, _record(tiny, model_n_heads=info.n_heads + 1))
    elif case == "out of range":
        path = write(tmp_path, _record(tiny, heads=[[info.n_layers, 0]]))
    else:
        path = write(tmp_path, _record(tiny, eps=0.3))
    with pytest.raises(InputError) as caught:
        head_list.specialized_heads(tiny, probe, heads_from=str(path), eps=EPS, q=Q)
    text = str(caught.value)
    assert message in text and str(path) in text and "leave heads_from empty" in text, text


def test_record_refuses_heads_outside_the_model(tiny):
    info = sl.model_info(tiny)
    with pytest.raises(InputError, match="lists head"):
        head_list.head_list_record(tiny, [(info.n_layers, 0)], eps=EPS, q=Q, prepend_bos=True,
                                   probe={"n_prompts": 1, "seq_len": 2})


def test_best_layer_set_reads_notebook_05_or_falls_back(tiny, tmp_path):
    info = sl.model_info(tiny)
    sink = head_list.HeadList(heads=[(0, 1), (1, 0), (1, 2), (2, 3)], eps=0.3, q=0.9, model=info.as_dict(),
                              probe={}, source="measured")
    alone = head_list.best_layer_set(tiny, sink)  # no file: the layer holding most of the heads
    assert alone.heads == [(1, 0), (1, 2)] and alone.k is None and alone.source.startswith("the sink-specialized")
    best = {"layers": [0, 2], "heads": [[0, 1], [2, 3]], "retention": 0.93}
    path = tmp_path / "layer_selection.json"
    path.write_text(json.dumps({"best": best, "settings": {"model": info.name, "k": 4}}))
    chosen = head_list.best_layer_set(tiny, sink, selection_from=str(path))
    assert chosen.heads == [(0, 1), (2, 3)] and chosen.k == 4 and chosen.retention == 0.93
    assert chosen.as_dict() == {"source": str(path), "layers": [0, 2], "n_heads": 2, "k": 4, "retention": 0.93}
    path.write_text(json.dumps({"best": None, "settings": {"model": info.name, "k": 4}}))  # no set met the target
    missed = head_list.best_layer_set(tiny, sink, selection_from=str(path))
    assert missed.heads == alone.heads and "met no retention target" in missed.source
    path.write_text(json.dumps({"best": best, "settings": {"model": "other/model", "k": 4}}))
    with pytest.raises(InputError, match="selection_from .*other/model"):
        head_list.best_layer_set(tiny, sink, selection_from=str(path))
    path.write_text("{}")
    with pytest.raises(InputError, match="not a layer_selection.json"):
        head_list.best_layer_set(tiny, sink, selection_from=str(path))
    with pytest.raises(InputError, match="no such file"):
        head_list.best_layer_set(tiny, sink, selection_from=str(tmp_path / "missing.json"))
