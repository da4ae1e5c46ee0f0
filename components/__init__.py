"""PTQ pipeline stages, one file each; importing this package registers them."""

from tinyptq.components import range_setting  # noqa: F401
