"""The math of generating, on any network: the samplers (DDPM, DDIM, DPM-Solver++), classifier-free guidance, nucleus
decoding and the reference beam search."""
