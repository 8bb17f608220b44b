"""The plumbing every method shares: the glue into the host's ModelPatcher (sigma window, the batched perturbed
pass, attention replacement and override, displacement checks, UNet layout, the DiT call path), each method's
install function, and the model family registry (``families``). Imports only the cores below it."""
