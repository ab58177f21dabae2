"""The Mean Teacher term (SSL4MIS): the student's softmax on unlabeled images against the EMA
teacher's on the same images plus clipped Gaussian noise, weighted by a sigmoid ramp. The
'mean_teacher' method trains on it (methods/mean_teacher.py); a 'custom' ARCO mix may add it
(objective.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from arco_jax import losses
from arco_jax.core import Networks, teacher_pass


def consistency_weight(config: ml_collections.ConfigDict, progress: jax.Array) -> jax.Array:
    """loss_weights.consistency ramped up as SSL4MIS's Mean Teacher: 0 before the delay, then
    w sigmoid_rampup(t/T, rampup) (SSL4MIS steps the ramp every 150 iterations; here it is
    continuous)."""
    a = config.arco
    ramp = config.loss_weights.consistency * losses.sigmoid_rampup(progress, a.consistency_rampup)
    return jnp.where(progress >= a.consistency_delay, ramp, 0.0)


def consistency_term(key: jax.Array, config: ml_collections.ConfigDict, nets: Networks, teacher: dict,
                     student_logits_u: jax.Array, image_u: jax.Array,
                     teacher_batch_stats: dict | None = None) -> tuple[jax.Array, dict]:
    """Softmax MSE of the student's logits on the unlabeled images against the teacher's on the
    same images plus clipped Gaussian noise (SSL4MIS noises the teacher's input); the teacher
    runs as config.arco.teacher_train_mode says, from running statistics `teacher_batch_stats`
    (default the teacher's). Returns (term, the teacher's running statistics after the pass)."""
    noise_key, teacher_key = jax.random.split(key)
    std = config.arco.consistency_noise
    noise = jnp.clip(std * jax.random.normal(noise_key, image_u.shape, jnp.float32), -2.0 * std, 2.0 * std)
    (teacher_logits, _), stats = teacher_pass(nets, teacher, image_u + noise.astype(image_u.dtype), teacher_key,
                                              config.arco.teacher_train_mode, teacher_batch_stats)
    return losses.softmax_mse(student_logits_u, teacher_logits), stats
