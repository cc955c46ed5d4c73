"""pfm: pyramidal flow matching and temporal pyramid diffusion for video, in JAX."""

__version__ = "0.1.0"
