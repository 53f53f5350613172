"""A seconds-long configuration for tests: sklearn digits (8x8), tiny models, two short epochs."""

from mmard_jax.config import base_config, model_config


def get_config():
    config = base_config()
    config.data.source = "digits"
    config.data.name = "digits"
    config.data.mnist5k_test_size = 200
    config.data.crop_padding = 0
    config.data.flip = False
    config.teacher.model = model_config("cnn", widths=(8,), hidden=0)
    config.teacher.attack.eps = 0.1
    config.teacher.attack.step_size = 0.05
    config.teacher.attack.steps = 2
    config.teacher.attack.unroll = 2
    config.teacher.optim.epochs = 1
    config.teacher.optim.batch_size = 64
    config.teacher.optim.lr = 0.05
    config.teacher.optim.decay_epochs = ()
    config.student.model = model_config("cnn", widths=(8,), hidden=0)
    config.baselines = "rslad"
    config.method.kl_reduction = "batchmean"
    config.method.iad_warmup_epochs = 1
    config.attack.eps = 0.1
    config.attack.step_size = 0.05
    config.attack.steps = 2
    config.attack.unroll = 2
    config.optim.epochs = 2
    config.optim.batch_size = 64
    config.optim.lr = 0.05
    config.optim.decay_epochs = (1,)
    config.eval.eps = 0.1
    config.eval.batch_size = 64
    config.eval.num_examples = 128
    config.eval.pgd_steps = 3
    config.eval.pgd_step_size = 0.05
    config.eval.cw_steps = 3
    config.eval.cw_step_size = 0.05
    config.eval.periodic_pgd_steps = 2
    config.eval.periodic_pgd_step_size = 0.05
    config.eval.autoattack = False
    config.checkpoint.every_steps = 10
    config.checkpoint.async_save = False
    config.log.every_steps = 5
    config.log.progress = False
    return config
