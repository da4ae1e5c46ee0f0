"""PTQ pipeline stages, one file each; importing this package registers them."""

from tinyptq.components import (
    adaround,  # noqa: F401
    bias_correction,  # noqa: F401
    bn_folding,  # noqa: F401
    brecq,  # noqa: F401
    cle,  # noqa: F401
    gptq,  # noqa: F401
    mixed_precision,  # noqa: F401
    output_range_search,  # noqa: F401
    range_setting,  # noqa: F401
)
