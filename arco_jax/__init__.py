"""arco_jax: ARCO semi-supervised medical image segmentation in JAX/Flax."""
