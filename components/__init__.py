"""PTQ pipeline stages, one file each; importing this package registers them."""
