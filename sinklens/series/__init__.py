"""The notebook series: running it, its run folders, its report.

Modules, one concept each:

- :mod:`~sinklens.series.params`: typed notebook parameters and the checks of their values.
- :mod:`~sinklens.series.folder`: ``RunFolder``, where a notebook writes figures, tables and JSON.
- :mod:`~sinklens.series.head_list`: the run's one list of sink-specialized heads (``heads_from``).
- :mod:`~sinklens.series.runner`: plan and execute the series (``python -m sinklens run``).
- :mod:`~sinklens.series.outputs`: what a run folder holds (manifest, each notebook's outputs, summaries).
- :mod:`~sinklens.series.wording`: labels and units of headline numbers, captions of figures.
- :mod:`~sinklens.series.findings`: the run's findings in sentences, from its summaries.
- :mod:`~sinklens.series.headline`: headline numbers and the README block (``python -m sinklens headline``).
- :mod:`~sinklens.series.pngs`: PNG copies of the plotly figures.
- :mod:`~sinklens.series.report`: the report ``index.html`` (``python -m sinklens report``).
- :mod:`~sinklens.series.cli`: the command line.

A notebook needs three names: ``check_params`` (its second cell), ``RunFolder`` and the
``head_list`` module.
"""

import importlib

# resolved on first use, so that the command line (sinklens.series.cli) checks its arguments without importing
# torch or pandas: name -> module that defines it (the module itself for head_list)
_EXPORTS = {"RunFolder": ".folder", "check_params": ".params", "head_list": ".head_list"}

__all__ = ["RunFolder", "check_params", "head_list"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    value = module if name == "head_list" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
