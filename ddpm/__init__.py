"""ddpm: the diffusion core of ddpm-serve (schedule, U-Net, sampler, training, evaluation)."""

__version__ = "0.1.0"
