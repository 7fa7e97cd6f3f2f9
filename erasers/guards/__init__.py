"""Sampling-time guards (no weights touched): SAFREE, Safe Latent Diffusion, concept guidance, token suppression."""
