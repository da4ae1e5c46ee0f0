"""Integer-exact simulations of int8 inference runtimes."""
