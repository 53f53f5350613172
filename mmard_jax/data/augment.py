"""On-device augmentation (pure JAX, jittable): random crop with zero padding and horizontal flip.

Matches torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``: the image is
zero-padded by `crop_padding` on each side and an HxW window is taken at an offset drawn
uniformly from [0, 2 * crop_padding]^2; it is then mirrored left-right with probability 1/2.
`crop_padding` and `flip` are Python values (static under jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def to_float(images_uint8: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1] (x / 255)."""
    return jnp.asarray(images_uint8).astype(jnp.float32) / 255.0


def random_crop(key: jax.Array, image: jax.Array, crop_padding: int) -> jax.Array:
    """An HxW window of `image` (HWC) zero-padded by `crop_padding`, at a uniform random offset."""
    if crop_padding == 0:
        return image
    height, width, channels = image.shape
    padded = jnp.pad(image, ((crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0)))
    top, left = jax.random.randint(key, (2,), 0, 2 * crop_padding + 1)
    return lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    """`image` (HWC) mirrored left-right with probability 1/2."""
    return jnp.where(jax.random.bernoulli(key), image[:, ::-1, :], image)


def augment_image(key: jax.Array, image: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
    """Random crop then (optionally) random horizontal flip of one HWC image."""
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0; got {crop_padding}")
    crop_key, flip_key = jax.random.split(key)
    image = random_crop(crop_key, image, crop_padding)
    return random_flip(flip_key, image) if flip else image


def augment_batch(keys: jax.Array, images: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
    """Augments each image of a [B, H, W, C] batch with its own key (``keys``: B keys), as the train step does.

    ``crop_padding=0, flip=False`` returns `images` unchanged (e.g. MNIST).
    """
    if crop_padding == 0 and not flip:
        return images
    return jax.vmap(lambda k, x: augment_image(k, x, crop_padding=crop_padding, flip=flip))(keys, images)
