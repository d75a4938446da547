"""The models sd3tune uses when the user names none. Kept free of imports: the CLI shows them in its help."""

SD3M = "stabilityai/stable-diffusion-3-medium-diffusers"  # the base model trained and sampled by default
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # the CLIP behind `sd3tune evaluate`'s metrics
