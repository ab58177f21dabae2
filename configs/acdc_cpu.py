"""Real ACDC at a schedule a 2-core CPU can finish: configs/acdc.py (the reference's method
settings, the SSL4MIS data and test protocol) with 128 x 128 patches, no stage 1 and 1000
stage-2 steps, validated every 125. The study of results/acdc_cpu128 runs it for every method:

  python -m arco_jax.study --config=configs/acdc_cpu.py --out=results/acdc_cpu128 \
      --budgets=3,7 --seeds=0 --override=data.data_dir=/path/to/ACDC

One run: python -m arco_jax.main --config=configs/acdc_cpu.py:method=arco_sag \
      --config.data.data_dir=/path/to/ACDC --config.data.labeled_patients=3 --workdir=runs/one

Everything tied to the schedule length (the poly learning rate, the entropy percentile's decay,
the Mean Teacher ramp) follows train.steps, as in the full protocol. The config string is
configs/acdc.py's (method=..., variant=...).
"""
from configs import acdc

STEPS = 1000
PATCH = 128


def get_config(config_string: str | None = None):
    config = acdc.get_config(config_string)
    config.data.patch_size = (PATCH, PATCH)  # Slices are zoomed to the patch (SSL4MIS), not cropped.
    config.pretrain.steps = 0
    config.train.steps = STEPS
    config.train.log_every = 25
    config.train.eval_every = STEPS // 8
    config.train.checkpoint_every = STEPS // 8  # An interrupted run loses at most 125 steps.
    config.train.keep_checkpoints = 1
    # The 128 px ARCO step needs 2.8 GB with rematerialisation; without it the step is faster
    # and still fits a laptop's memory.
    config.arco.remat_student = False
    return config
