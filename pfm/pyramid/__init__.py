"""Pure, jit-able pyramid maths: resampling, stage windows, coupled paths, renoising, samplers."""

from pfm.pyramid import paths, renoise, resample, samplers, windows

__all__ = ["paths", "renoise", "resample", "samplers", "windows"]
