"""The fields every config has, with the paper's CIFAR-10 recipe as defaults.

Experiment files call get_base() and override what differs; every field can be overridden on
the command line: --config.model.keep_fraction=0.3, --config.optim.learning_rate=0.05, ...
"""
import ml_collections

from edgepopup_jax.core import options

CIFAR_MEAN = (0.491, 0.482, 0.447)  # the reference's (its data/cifar.py)
CIFAR_STD = (0.247, 0.243, 0.262)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "conv4"
    # keep_fraction, weight_init, mask, ...: their defaults, allowed values and docs are in
    # core/options.py (the options whose default is None: keep fractions, typed placeholders
    # so that --config.model.first_last_keep_fraction=0.9 parses)
    c.model.update({k: ml_collections.config_dict.placeholder(float) if v is None else v
                    for k, v in options.DEFAULTS.items()})
    # A sparsity schedule (training/sparsity.py): k from keep_fraction_start down to
    # keep_fraction over the first keep_fraction_anneal_epochs epochs (0: off), linear | cosine
    c.model.keep_fraction_start = 1.0
    c.model.keep_fraction_anneal_epochs = 0.0
    c.model.keep_fraction_anneal = "linear"
    # IteRand (training/iterand.py): every rerand_every steps (0: off) the pruned weights are
    # redrawn, each with probability rerand_rate (bernoulli), or w <- rerand_lambda w +
    # rerand_mu w_fresh (manual)
    c.model.rerand_every = 0
    c.model.rerand_rate = 0.1
    c.model.rerand_mode = "bernoulli"
    c.model.rerand_lambda = 1.0
    c.model.rerand_mu = 0.0
    c.model.dense_first = False
    c.model.dense_last = False
    c.model.compute_dtype = "float32"  # "bfloat16" on accelerators

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # a tfds name, "folder" (data_dir/split/label/image) or "mnist5k"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.augment = "cifar"  # none | cifar | imagenet
    c.data.image_size = 32
    c.data.mean = CIFAR_MEAN
    c.data.std = CIFAR_STD
    c.data.shuffle_buffer = 50_000
    c.data.cache = True
    # device: the whole split as uint8 arrays on the device (in-memory sources: mnist5k, npz, a
    # folder of small images, small tfds sets), shuffled and augmented there, no TensorFlow for
    # mnist5k/npz/folder; tf_data: the host pipeline (ImageNet, multi-host, fsdp); auto: device
    # when the data fits in device_memory_fraction of a device's memory and nothing needs tf_data
    c.data.pipeline = "auto"
    c.data.device_memory_fraction = 0.25
    # An image that does not decode (truncated, empty, not an image): error stops the run naming
    # it (the state before it saved); skip drops and counts it (results.json: skipped_examples)
    # and stops only when more than max_bad_fraction of a split is bad. Find them all first with
    # `python -m edgepopup_jax.check_data --config=...`.
    c.data.bad_images = "error"  # error | skip
    c.data.max_bad_fraction = 0.001

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # sgd | adam
    c.optim.learning_rate = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4  # L2 on what trains: the scores
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.schedule_unit = "epoch"  # epoch (the reference's: lr set once per epoch) | step
    c.optim.warmup_epochs = 0.0  # a whole number with schedule_unit "epoch"
    c.optim.warmup_style = "reference"  # reference: lr * (i + 1) / W | from_zero: lr * i / W
    c.optim.label_smoothing = 0.0

    c.batch_size = 128  # global, over all devices and processes
    # main.py: train seeds seed, seed + 1, ... as one program (device data path) into
    # workdir/seed_<s>; a sweep groups its grid points with its own --parallel_runs instead.
    c.parallel_runs = 1
    c.parallel_split = "runs"  # what the devices split: runs (each device its own runs) | data
    c.state_sharding = "replicated"  # replicated | fsdp: large arrays of the train state split over the devices
    c.eval_batch_size = 500
    c.num_epochs = 100.0  # float: fractions of an epoch are fine
    c.num_train_steps = -1  # > 0 overrides num_epochs
    # Prune, then fine-tune (training/finetune.py): after the run, this many epochs train the
    # weights its final mask keeps, the mask fixed (0: off)
    c.finetune_epochs = 0.0
    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0: once per epoch
    c.checkpoint_every_steps = 0  # 0: once per epoch
    c.keep_checkpoints = 3
    c.checkpoint = ml_collections.ConfigDict()
    # A latest checkpoint that is corrupt (unreadable, or its checksum no longer matches):
    # fall_back moves it aside to <step>.corrupt and resumes from the newest intact one, so an
    # unattended restart (a preemptible pod, a SLURM requeue) goes on; refuse stops with an error.
    c.checkpoint.on_corrupt = "fall_back"
    return c
