"""Training losses, one per file: denoising, ode, dmd, sid, gan."""
