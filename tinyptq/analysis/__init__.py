"""``tinyptq analyze``: which layer hurts a quantized model, and what to keep at higher precision.

One pipeline run, its state kept after every stage, then:

- the split of the loss (weights only, activations only, both) — :mod:`.layers`;
- per unit (a layer with its output, or a loose activation point), in network
  order, the metric and output SQNR with only it quantized and with all but it
  quantized, weights and activations separately — :mod:`.layers`, :mod:`.probe`;
- per activation point and kernel: SQNR, range used against observed,
  clipping, histograms with the grid for the worst few — :mod:`.tensors`;
- per layer, its reconstruction error through the stages — :mod:`.stages`;
- the suggested fix, a ``quant.overrides`` block ready to paste, and
  optionally its result from a rerun — :mod:`.fix`;

written as analysis.json, analysis.md and a self-contained analysis.html
(:mod:`.render`, :mod:`.plots`). Entry point: :func:`tinyptq.api.analyze`.
This module holds only the options' constraints (light to import for the CLI).
"""

from tinyptq.params import Integer, Options, Real

SHARE = Real(0.0, 1.0, lo_open=True)  # the part of the loss the fix must recover
SAMPLES = Integer(1, None)  # calibration samples of the label-free measures
FIX_BITS = Options("8", "next")  # raise to 8 bits, or to the next candidate bit-width
SELECT_BY = Options("noise", "metric")  # label-free output noise, or the metric on the evaluation set
