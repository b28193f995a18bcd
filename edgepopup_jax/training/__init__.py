"""The trainer and what it runs on: the input pipelines (tf.data, and the in-memory device data),
device meshes and sharding, optimizers and schedules, checkpoints, evaluation, one run
(loop.train_and_evaluate) or many runs in one program (parallel), preemption and metric
writing. Needs the [train] extra; it builds on core, models and configs."""
