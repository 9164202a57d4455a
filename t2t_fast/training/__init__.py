"""Training behind ``t2t-fast train`` / ``finetune`` / ``eval`` (needs the ``train`` extra: timm, torchvision,
tqdm, scikit-learn; ``import t2t_fast`` never imports this package).

* :mod:`~t2t_fast.training.recipes`: the hyper-parameter tables and the builders of transforms, datasets,
  model, optimizer and loss;
* :mod:`~t2t_fast.training.data`: the digits demo, ImageFolder and CIFAR datasets;
* :mod:`~t2t_fast.training.run`: one run, setup and epochs (:func:`~t2t_fast.training.run.train`);
* :mod:`~t2t_fast.training.loop`: the training step and epoch, validation, callbacks;
* :mod:`~t2t_fast.training.state`: seeds and RNG states, atomic checkpoints, summary, resume;
* :mod:`~t2t_fast.training.distributed`: torchrun / DDP setup; :mod:`~t2t_fast.training.logs`: logging.
"""
