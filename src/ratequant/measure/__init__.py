"""Measuring the model: capture of keys, values and attention on calibration text, the distortion of every
design at every width, and the rank, weight-norm and headroom studies built on them."""
