import sinklens as sl

from helpers import random_tokens


def test_tiny_loads_and_runs(tiny):
    info = sl.model_info(tiny)
    assert info.n_layers == 3 and info.bos_id == 1
    out = tiny(random_tokens(2, 8))
    assert out.shape == (2, 8, 128)
