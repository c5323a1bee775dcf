"""sinklens.core.validate.check_int: one check and one message for every integer argument."""

from __future__ import annotations

import numpy as np
import pytest

import sinklens as sl
from sinklens.core.validate import check_index, check_int, check_k, check_layers

BAD_INTS = [
    pytest.param(3.0, "float", id="integral-float"),
    pytest.param(2.5, "float", id="float"),
    pytest.param("3", "str", id="digit-string"),
    pytest.param("three", "str", id="string"),
    pytest.param(None, "NoneType", id="none"),
    pytest.param(True, "bool", id="true"),
    pytest.param(False, "bool", id="false"),
    pytest.param([3], "list", id="list"),
    pytest.param(np.float32(3), "float32", id="numpy-float"),
]


@pytest.mark.parametrize("value, type_name", BAD_INTS)
def test_every_bad_kind_gets_one_message_naming_the_argument(value, type_name):
    with pytest.raises(sl.InputError) as err:
        check_int("batch_size", value, minimum=1)
    message = str(err.value)
    assert message.startswith("batch_size must be an int >= 1, got ")
    assert f"({type_name})" in message


def test_hints_for_values_that_look_like_ints():
    with pytest.raises(sl.InputError, match=r"Pass 3, not 3\.0\."):
        check_int("n", 3.0)
    with pytest.raises(sl.InputError, match="Pass the number 3, not the string '3'"):
        check_int("n", "3")


@pytest.mark.parametrize("value", [0, -4, np.int64(0)])
def test_below_minimum(value):
    with pytest.raises(sl.InputError, match=r"^limit must be an int >= 1 \(items per task\) or None, got"):
        check_int("limit", value, minimum=1, allow_none=True, meaning="items per task")


@pytest.mark.parametrize("value", [7, np.int64(7), np.int32(7), np.uint8(7)])
def test_python_and_numpy_ints_come_back_as_python_ints(value):
    out = check_int("n", value, minimum=0)
    assert out == 7 and type(out) is int


def test_none_only_where_allowed():
    assert check_int("limit", None, allow_none=True) is None
    with pytest.raises(sl.InputError, match="^limit must be an int, got None"):
        check_int("limit", None)


def test_index_k_and_layers_share_the_check():
    for call, name in ((lambda: check_index("layer", 1.0, 4, "layers"), "layer"), (lambda: check_k("2", 16), "k"),
                       (lambda: check_layers([0, True], 4), "layer")):
        with pytest.raises(sl.InputError, match=f"^{name} must be an int, got "):
            call()
    layers = check_layers([np.int64(2), 0], 4)
    assert layers == [0, 2] and all(type(layer) is int for layer in layers)


def test_check_frame_names_the_missing_columns_and_the_source():
    import pandas as pd

    from sinklens.core.validate import check_frame

    frame = pd.DataFrame({"layer": [1], "head": [2]})
    assert check_frame(frame, ["layer"], "table", "sl.f") is frame
    with pytest.raises(sl.InputError, match=r"lacks columns \['alpha_0'\].*sl\.f"):
        check_frame(frame, ["layer", "alpha_0"], "table", "sl.f")
    with pytest.raises(sl.InputError, match="non-empty DataFrame from sl.f, got an empty one"):
        check_frame(frame.iloc[:0], ["layer"], "table", "sl.f")
    assert check_frame(frame.iloc[:0], ["layer"], "table", "sl.f", allow_empty=True).empty
    with pytest.raises(sl.InputError, match="must be a DataFrame from sl.f, got list"):
        check_frame([], ["layer"], "table", "sl.f", allow_empty=True)


def test_check_choices_takes_a_list_or_one_string_and_names_the_bad_entry():
    from sinklens.core.validate import check_choices

    assert check_choices("fills", "mean", ("zero", "mean")) == ["mean"]
    assert check_choices("fills", ("zero", "mean"), ("zero", "mean")) == ["zero", "mean"]
    assert check_choices("fills", ["mean", "mean"], ("zero", "mean"), drop_duplicates=True) == ["mean"]
    with pytest.raises(sl.InputError, match="fills holds duplicates"):
        check_choices("fills", ["mean", "mean"], ("zero", "mean"))
    with pytest.raises(sl.InputError, match="Unknown fill 'median'"):
        check_choices("fills", ["zero", "median"], ("zero", "mean"))
    with pytest.raises(sl.InputError, match="fills is empty"):
        check_choices("fills", [], ("zero", "mean"))
    with pytest.raises(sl.InputError, match="fills must be a list"):
        check_choices("fills", 3, ("zero", "mean"))
