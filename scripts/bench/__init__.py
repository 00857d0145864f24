"""The memory benchmark's parts (scripts/bench_memory.py is its command line and report): `presets` (model shapes,
the benchmark's settings and modes, the random pair and tokens), `peers` (one training step of naive KD, TRL, Liger
and tip), `flops` (the FLOP model of a step) and `measure` (one process per mode, its memory and time)."""
