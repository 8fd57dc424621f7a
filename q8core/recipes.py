"""Named quantization recipes (``q8 run --recipe``): the quantizer-spec fields a run starts from.

``paper`` is Q8BERT exactly as METHOD.md states it (the spec's defaults). ``full-int8`` is the best
combination measured here with every fully connected input 8-bit (no ``float_inputs``); its measurements
are in ``docs/quantizer-options.md``. A ``--spec`` file replaces the recipe; options on the command line
(``--ema-decay``, ``--asymmetric-inputs``, ...) override single fields of either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import Q8Error
from .spec import QuantSpec

#: The FFN output layers, whose input is GELU's output (Hugging Face module names: BERT, RoBERTa, ELECTRA;
#: DistilBERT's ``ffn.lin2``)
FFN_OUTPUT = r"(layer\.\d+\.output\.dense|ffn\.lin2)$"


@dataclass(frozen=True)
class Recipe:
    name: str
    help: str
    fields: dict = field(default_factory=dict)  # QuantSpec fields over its defaults
    #: QAT starts after this fraction of the run's steps (``--quant-delay`` overrides); None: from the first
    quant_delay_ratio: float | None = None

    def spec(self, **overrides) -> QuantSpec:
        return dataclasses.replace(QuantSpec(**self.fields), **overrides)


RECIPES = {r.name: r for r in (
    Recipe("paper", "Q8BERT as the paper states it: symmetric per-tensor int8 inputs over the EMA of max|x| "
                    "from the first step"),
    Recipe("full-int8", "every fully connected input 8-bit, with the classifier's input over tanh's [-1, 1], "
                        "the FFN output layers' (GELU's) on the asymmetric uint8 grid, per-channel weight scales, "
                        "and QAT after the first third of the run",
           {"tanh_range": True, "asymmetric_inputs": (FFN_OUTPUT,), "per_channel_weights": True},
           quant_delay_ratio=1 / 3),
)}

#: What ``q8 run`` uses without ``--recipe`` or ``--spec``
DEFAULT_RECIPE = "full-int8"


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise Q8Error(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]
