"""Weight rounding by output reconstruction: the machinery shared by ``adaround`` and ``brecq``.

AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding") chooses, per
weight, whether to round down or up so that a layer's output matches the float
one, instead of rounding each weight to its nearest grid value. The choice is
relaxed to a soft variable h(V) in [0, 1] (a rectified sigmoid), the kernel
becomes ``s * (clip(floor(W / s) + h(V) + zp, qmin, qmax) - zp)``, and V is
learned with Adam on the calibration data against

    ||f(W_soft; x) - y||^2 / E_nearest  +  lambda * mean(1 - |2 h(V) - 1|^beta)

where the regularizer, off during a warm-up and then with beta annealed from
20 to 2, drives every h(V) to 0 or 1. Dividing the reconstruction term by the
error of nearest rounding (and averaging the regularizer over the weights)
makes one ``reg_weight`` fit layers of any size and output scale. BRECQ (Li et
al. 2021) does the same per block (a residual or a depthwise-separable pair),
optionally with the squared gradient of the task loss as per-output weights
(Fisher diagonal) and with the block's activation steps learned too (LSQ).
QDrop (Wei et al. 2022) keeps a random part of the activations in float
during the optimization.

A :class:`Unit` is what is reconstructed at once: its layers, the nodes it is
fed (raw values: their own quantizers apply inside), the node whose raw value
is compared with the float model's, and the activation quantizers in between.
Units run in network order; each one's input comes from the network already
rounded upstream (or, on request, from the float network). A unit whose
learned rounding does not lower its error on the calibration data keeps
nearest rounding (and its activation steps), and the log says so.
"""

from tinyptq.rounding.reconstruct import Settings, UnitResult, reconstruct_unit
from tinyptq.rounding.run import run_reconstruction
from tinyptq.rounding.soft import (
    FLOAT,
    HARD,
    NEAREST,
    SOFT,
    SoftRounding,
    annealed_beta,
    rounding_regularizer,
)
from tinyptq.rounding.units import Unit, block_units, layer_units

__all__ = [
    "FLOAT",
    "HARD",
    "NEAREST",
    "SOFT",
    "Settings",
    "SoftRounding",
    "Unit",
    "UnitResult",
    "annealed_beta",
    "block_units",
    "layer_units",
    "reconstruct_unit",
    "rounding_regularizer",
    "run_reconstruction",
]
