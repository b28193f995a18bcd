"""Step-by-step training parity with the PyTorch reference (github.com/allenai/hidden-networks).

    PYTHONPATH=. python benchmarks/reference_parity.py --reference_src=/tmp/hidden-networks \\
        [--cases all|conv4_sc_k0.5,...] [--steps N] [--cifar10 ../shared/data/cifar10_png.zip] \\
        [--plants [--only_plants]] [--baseline] [--torch_threads 1] [--json F] [--list]
    python benchmarks/reference_parity.py --table F.json ...   # the summary of saved runs

For each case the reference's model is built by the reference's own code, from DIR: its args.py
parses the YAML config it ships plus --prune-rate / --epochs / --batch-size / --seed (set through
sys.argv, as its command line would), main.get_model and main.get_optimizer build the model and
SGD, utils/schedulers.py gives its lr policy and utils/net_utils.LabelSmoothing its loss. Its
initial weights and scores are imported into ours (interop.hidden_networks.convert_state_dict)
and both train N steps on identical batches. The reference's step is the body of its
trainers/default.py loop (that file itself needs CUDA: `target.cuda`): model.train(); loss =
criterion(model(x), y); zero_grad; backward; optimizer.step(); its lr policy called with the epoch
at each epoch's start. Ours is built here from the library (selection.with_masks, the model's
apply with train=True, evaluation.cross_entropy, training/optim.py), as training/train.py's step.

Batches: a fixed set of steps_per_epoch batches (steps_per_epoch = max(1, N // 10), so every run
is 10 epochs and the per-epoch cosine decays to 0 at its end; ResNet-50 warms up over the first 5
epochs, the reference's warmup_length), the same batches every epoch: normal(0, 1) images, or the
first CIFAR-10 training images of a seeded permutation, normalised with the reference's
mean/std (no augmentation: both must see the same pixels).

Every step compares: the two losses; per masked layer the masks used in that step's forward
(the reference's own GetSubnet), the scores after the update and the update itself; per
BatchNorm the running statistics. The twin (--baseline; always for the ResNets) is a second
reference, weights moved by one ulp, trained alongside: how far rounding noise alone carries the
reference from itself, the envelope of the criterion (below). --plants reruns the first Conv case once per planted difference (PLANTS, in our step
only; bn_eval on the first ResNet case) and checks that each is caught, naming the first step
and layer where the runs part.
Exit status 0: every case agrees (and with --plants, every plant is caught); 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import time
import types

import numpy as np

# ----------------------------------------------------------------------------- the criterion
# From measurement (docs/results/reference_parity.md). Two runs of the reference's own code whose
# frozen weights differ by one float32 ulp (the twin, --baseline) follow each other to ~1e-5 in
# the scores' updates for a few steps, then part as float32 noise flips a ReLU, a max-pool or a
# top-k threshold (Conv nets: updates 1e-4..2e-3 apart within 5 steps, 1e-1 by step 12; masks
# 99% equal by step 40). cResNet18 at batch 8 parts from itself at once (2e-3 at step 0, 0.2 at
# step 1). Ours against the reference parts the same way, no faster. So: exact where the code
# must be exact, the twin's envelope where float32 noise is free to act.
STRICT_STEPS = 5        # steps 0..4: before float32 noise has acted
FIRST_LOSS_RTOL = 1e-5  # |loss_ours - loss_ref| / |loss_ref| in those steps (seen: <= 2e-7)
UPDATE_TOL = 5e-3       # per layer ||dS_ours - dS_ref|| / ||dS_ref|| of a step's score update
                        # in those steps (seen: <= 1.9e-3), or ENVELOPE x the twin's so far
BN_TOL = 1e-4           # per BatchNorm max |stat_ours - stat_ref| / max |stat_ref|, step 0
LOSS_RTOL = 5e-2        # loss rel diff at any step (the Conv twin: 1.4e-2 by step 40), or ENVELOPE x the twin's
MASK_AGREE = 0.95       # per layer fraction of equal mask entries at any step (the Conv twin:
                        # 0.99 by step 40), or 1 - ENVELOPE x the twin's disagreement; step 0: all equal
ENVELOPE = 10           # how much further than the twin ours may be from the reference

PLANTS = {
    "no_score_decay": "no weight decay on the scores",
    "signed_scores": "the mask on the signed scores S instead of |S|",
    "lr_per_step": "the learning rate updated every step instead of every epoch",
    "bn_eval": "BatchNorm in eval mode (running statistics) during training",
    "count_rounding": "the kept count rounded the other way: int(k * n) instead of n - int((1 - k) * n)",
}


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str          # the reference's architecture
    config: str        # its YAML config, relative to the reference's directory
    keep_fraction: float
    batch: int
    side: int = 32     # image side
    steps: int = 100   # default length (--steps overrides)


_CONV = "configs/smallscale/{}/{}_u{}_unsigned.yml"  # "u": unscaled fan (its scale_fan uses 1 - k)
CASES = {
    f"{arch.lower()}_{init}_k{k}": Case(arch, _CONV.format(arch.lower(), arch.lower(), init), k, 16)
    for arch in ("Conv4", "Conv6") for init in ("sc", "kn") for k in (0.5, 0.3)
}
CASES["cresnet18_kn_k0.3"] = Case("cResNet18", "configs/smallscale/resnet18/resnet18-ukn-unsigned.yaml",
                                  0.3, 8, steps=30)
CASES["resnet50_sc_k0.3"] = Case("ResNet50", "configs/largescale/subnetonly/resnet50-usc-unsigned.yaml",
                                 0.3, 8, side=64, steps=20)
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)  # the reference's data/cifar.py


# ----------------------------------------------------------------------------- the torch side
class TorchSide:
    """A torch model trained as the reference's trainers/default.py trains it, one step a call.

    mask_of(module) -> its 0/1 mask from its current scores (the reference's GetSubnet);
    lr_policy(epoch) sets the optimizer's lr (the reference's utils/schedulers.py policy)."""

    def __init__(self, model, optimizer, lr_policy, criterion, mask_of, arch, keep_fraction,
                 width=1.0):
        self.model, self.optimizer, self.lr_policy, self.criterion = model, optimizer, lr_policy, criterion
        self.mask_of, self.arch, self.keep_fraction, self.width = mask_of, arch, keep_fraction, width
        self.masked = {n: m for n, m in model.named_modules() if hasattr(m, "scores")}
        self.epoch = None

    def masks(self):
        import torch

        with torch.no_grad():
            return {n: self.mask_of(m).numpy() for n, m in self.masked.items()}

    def step(self, x, y, epoch):
        import torch

        if epoch != self.epoch:
            self.lr_policy(epoch)
            self.epoch = epoch
        start = time.perf_counter()
        self.model.train()
        output = self.model(torch.from_numpy(x))
        loss = self.criterion(output, torch.from_numpy(y))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.item()), time.perf_counter() - start

    def state(self):
        return {k: v.detach().numpy() for k, v in self.model.state_dict().items()}

    def as_ours(self, state, masks=None):
        """The state (masks: as the scores) in our layout: {"/"-joined path: {leaf: array}}."""
        from edgepopup_jax.subnet.interop import hidden_networks as hn

        if masks is not None:
            state = {**state, **{n + ".scores": m for n, m in masks.items()}}
        _, _, variables = hn.convert_state_dict(state, self.arch, keep_fraction=self.keep_fraction,
                                                width=self.width, check=False)
        return _by_layer(variables)


class TorchTwin:
    """The reference against itself (--baseline): a second reference, its frozen weights moved
    by one float32 ulp (rounding-sized noise in the forward, as another order of float32 sums
    gives; the scores act only through their ranking), trained in our place and seen through our
    layout. How far float32 noise alone carries two runs of the same code apart."""

    def __init__(self, side: TorchSide, steps_per_epoch: int):
        import torch

        self.side, self.steps_per_epoch, self.steps_done = side, steps_per_epoch, 0
        with torch.no_grad():
            for m in side.masked.values():
                w = m.weight.detach().numpy()
                away = np.where(w < 0, np.float32(-np.inf), np.float32(np.inf))  # |w| one ulp up
                m.weight.copy_(torch.from_numpy(np.nextafter(w, away)))

    def step(self, x, y):
        masks = self.side.as_ours(self.side.state(), self.side.masks())["params"]
        loss, sec = self.side.step(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y,
                                   self.steps_done // self.steps_per_epoch)
        self.steps_done += 1
        return loss, {p: {"scores": v["scores"] != 0} for p, v in masks.items()}, sec

    def state(self):
        state = self.side.as_ours(self.side.state())
        return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


def _by_layer(variables) -> dict:
    """{collection: {"/"-joined layer path: {leaf: array}}}."""
    import flax

    out = {}
    for path, v in flax.traverse_util.flatten_dict(dict(variables)).items():
        out.setdefault(path[0], {}).setdefault("/".join(path[1:-1]), {})[path[-1]] = np.asarray(v)
    return out


# ----------------------------------------------------------------------------- the reference's own code
_REFERENCE_MODULES = ("args", "configs", "models", "utils", "data", "trainers", "main")


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def load_reference(src: str):
    """Imports the reference's main module from src (its modules are top-level: args, models,
    utils, ...). Never used here, hence stubbed: its data package (needs torchvision) and
    torch.utils.tensorboard (imports TensorFlow where installed)."""
    if not os.path.isfile(os.path.join(src, "utils", "conv_type.py")):
        raise SystemExit(f"--reference_src={src}: not a checkout of allenai/hidden-networks "
                         "(no utils/conv_type.py)")
    for name in list(sys.modules):
        if name.split(".")[0] in _REFERENCE_MODULES:
            del sys.modules[name]
    sys.path.insert(0, os.path.abspath(src))
    sys.modules["data"] = types.ModuleType("data")
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = None
    sys.modules["torch.utils.tensorboard"] = tensorboard
    # its configs/ has no __init__.py: a namespace package, which any regular `configs` package
    # on the path (this repository's) would shadow
    configs = types.ModuleType("configs")
    configs.__path__ = [os.path.join(os.path.abspath(src), "configs")]
    sys.modules["configs"] = configs
    argv = sys.argv
    sys.argv = ["main.py"]  # its args.py parses sys.argv when first imported
    try:
        with _quiet():
            import main as ref_main
    finally:
        sys.argv = argv
    return ref_main


def reference_side(ref_main, src: str, case: Case, *, epochs: int, seed: int) -> TorchSide:
    """The case's model, optimizer, lr policy and loss, each from the reference's own code."""
    import torch
    import args as ref_args_module
    import utils.conv_type as conv_type
    from utils.net_utils import LabelSmoothing
    from utils.schedulers import get_policy

    argv = ["main.py", "--config", os.path.join(src, case.config), "--prune-rate",
            str(case.keep_fraction), "--epochs", str(epochs), "--batch-size", str(case.batch),
            "--seed", str(seed)]
    saved, sys.argv = sys.argv, argv
    try:
        with _quiet():
            parsed = ref_args_module.parse_arguments()  # its YAML + these overrides
    finally:
        sys.argv = saved
    args = ref_args_module.args  # the Namespace its modules imported: updated in place
    args.__dict__.clear()
    args.__dict__.update(parsed.__dict__)
    torch.manual_seed(seed)
    with _quiet():
        model = ref_main.get_model(args)
        optimizer = ref_main.get_optimizer(args, model)
    policy = get_policy(args.lr_policy)(optimizer, args)
    criterion = (torch.nn.CrossEntropyLoss() if args.label_smoothing is None
                 else LabelSmoothing(smoothing=args.label_smoothing))
    return TorchSide(model, optimizer, lambda epoch: policy(epoch, iteration=None), criterion,
                     lambda m: conv_type.GetSubnet.apply(m.clamped_scores, m.prune_rate),
                     case.arch, case.keep_fraction)


def recipe(optimizer, args_like) -> dict:
    """The hyper-parameters our optimizer needs, read from the torch side's."""
    group = optimizer.param_groups[-1]
    return dict(lr=args_like.lr, momentum=group["momentum"], weight_decay=group["weight_decay"],
                nesterov=group["nesterov"], warmup=int(getattr(args_like, "warmup_length", 0) or 0),
                label_smoothing=float(getattr(args_like, "label_smoothing", None) or 0.0))


# ----------------------------------------------------------------------------- our side
class JaxSide:
    """Our model trained by a jitted step built from the library; `plant` one of PLANTS or None
    (a planted difference, in this step only)."""

    def __init__(self, state, *, arch, keep_fraction, width=1.0, hyper, steps, steps_per_epoch,
                 num_classes, plant=None):
        import flax
        import jax
        import jax.numpy as jnp
        import ml_collections
        import optax

        from edgepopup_jax.core import masking, selection
        from edgepopup_jax.models import get_model
        from edgepopup_jax.subnet.interop import hidden_networks as hn
        from edgepopup_jax.training import evaluation, optim

        if plant not in (None, *PLANTS):
            raise ValueError(f"unknown plant {plant!r}; allowed: {', '.join(PLANTS)}")
        name, options, variables = hn.convert_state_dict(state, arch, keep_fraction=keep_fraction,
                                                         width=width)
        if "resnet" in name:
            options["bn_running_var"] = "unbiased"  # torch's BatchNorm2d (our default: biased)
        self.model = model = get_model(name, **options)
        self.params = variables["params"]
        frozen, self.batch_stats = variables["frozen"], variables.get("batch_stats", {})
        cfg = ml_collections.ConfigDict(dict(
            name="sgd", learning_rate=hyper["lr"], momentum=hyper["momentum"],
            nesterov=hyper["nesterov"], weight_decay=hyper["weight_decay"], schedule="cosine",
            schedule_unit="step" if plant == "lr_per_step" else "epoch",
            warmup_epochs=hyper["warmup"], warmup_style="reference"))
        if plant == "no_score_decay":
            cfg.weight_decay = 0.0
        tx = optim.make_optimizer(cfg, optim.learning_rate_schedule(cfg, steps, steps_per_epoch))
        self.opt_state = tx.init(self.params)
        paths = selection.score_paths(self.params)
        flat = flax.traverse_util.flatten_dict(dict(self.params))
        sizes = [flat[p].size for p in paths]
        counts = selection.kept_counts(sizes, keep_fraction)
        if plant == "count_rounding":
            counts = np.array([int(keep_fraction * n) for n in sizes], np.int32)

        def masks_of(params):
            if plant == "signed_scores":  # the top count of S itself, straight-through into S
                f = flax.traverse_util.flatten_dict(dict(params))
                out = {}
                for p, c in zip(paths, counts):
                    s = f[p]
                    m = masking.topk_mask_for_count(s - jnp.min(s), c)
                    out[p] = s + jax.lax.stop_gradient(m - s)
                return flax.traverse_util.unflatten_dict(out)
            if plant == "count_rounding":
                return selection.edge_popup_masks_for_counts(params, jnp.asarray(counts))
            return selection.with_masks({"params": params}, model)[selection.MASKS]

        train = plant != "bn_eval"

        def step(params, opt_state, batch_stats, x, y):
            def loss_fn(params):
                masks = masks_of(params)
                variables = {"params": params, "frozen": frozen, "batch_stats": batch_stats,
                             selection.MASKS: masks}
                logits, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
                loss = evaluation.cross_entropy(logits, y, num_classes,
                                                hyper["label_smoothing"]).mean()
                return loss, (updates.get("batch_stats", batch_stats), masks)

            (loss, (batch_stats, masks)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            masks = jax.tree.map(lambda m: jax.lax.stop_gradient(m) != 0, masks)
            return optax.apply_updates(params, updates), opt_state, batch_stats, loss, masks

        self._step = jax.jit(step)
        self.steps_done = 0

    def step(self, x, y):
        import jax

        start = time.perf_counter()
        self.params, self.opt_state, self.batch_stats, loss, masks = jax.block_until_ready(
            self._step(self.params, self.opt_state, self.batch_stats, x, y))
        self.steps_done += 1
        return float(loss), _by_layer({"masks": masks})["masks"], time.perf_counter() - start

    def state(self):
        return _by_layer({"params": self.params, "batch_stats": self.batch_stats})


# ----------------------------------------------------------------------------- comparing
def _rel(a, b):
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    return diff / scale if scale else diff


def compare(step, loss_ref, loss_ours, masks_ref, masks_ours, ref_state, ours_state, ref_before,
            ours_before):
    """One step's record: losses; per layer the masks' agreement, the scores' difference after
    the update and the update's own (rms) difference; per BN the statistics' difference (layers
    named by our path). *_before: the scores before the step."""
    layers = {}
    for path, leaves in ref_state["params"].items():
        m_ref = masks_ref["params"][path]["scores"] != 0
        m_ours = masks_ours[path]["scores"]
        s_ours, s_ref = ours_state["params"][path]["scores"], leaves["scores"]
        u_ours = s_ours - ours_before["params"][path]["scores"]
        u_ref = s_ref - ref_before["params"][path]["scores"]
        differ = m_ref != m_ours
        tied = np.abs(ref_before["params"][path]["scores"])[differ]  # |S| where they differ
        layers[path] = dict(mask_agree=float(np.mean(m_ref == m_ours)),
                            mask_differ=int(np.sum(differ)),
                            # only a tie at the threshold swapped: equal counts, one |S| value
                            mask_tie_swap=bool(differ.any() and np.unique(tied).size == 1
                                               and m_ref.sum() == m_ours.sum()),
                            score_diff=_rel(s_ours, s_ref),
                            update_diff=float(np.linalg.norm(u_ours - u_ref) / max(np.linalg.norm(u_ref), 1e-30)))
    bn = {path: max(_rel(ours_state["batch_stats"][path][k], v[k]) for k in v)
          for path, v in ref_state.get("batch_stats", {}).items()}
    rel = abs(loss_ours - loss_ref) / max(abs(loss_ref), 1e-12)
    return dict(step=step, loss_ref=loss_ref, loss_ours=loss_ours, loss_rel=rel, layers=layers, bn=bn)


def violations(rec, twin=None) -> list[str]:
    """What in a step's record breaks the agreement criterion, most telling first: masks (the
    step's forward), BatchNorm statistics (its forward), score updates, each in model order,
    then the loss. twin: the twin's running extremes (envelope()), None without a twin."""
    step, strict = rec["step"], rec["step"] < STRICT_STEPS and not rec.get("tie_swapped")
    agree_min = MASK_AGREE if twin is None else min(MASK_AGREE, 1 - ENVELOPE * (1 - twin["agree"]))
    update_tol = UPDATE_TOL if twin is None else max(UPDATE_TOL, ENVELOPE * twin["update"])
    loss_tol = FIRST_LOSS_RTOL if strict else LOSS_RTOL
    if twin is not None:
        loss_tol = max(loss_tol, ENVELOPE * twin["loss"])
    masks = [f"{p}: mask ({v['mask_differ']} entries differ, {v['mask_agree']:.5f} agree)"
             for p, v in rec["layers"].items()
             if (v["mask_differ"] and not v.get("mask_tie_swap") if step == 0
                 else not v["mask_agree"] >= agree_min)]
    bn = [f"{p}: BN running stats (max rel diff {d:.2e} > {BN_TOL:g})"
          for p, d in rec["bn"].items() if step == 0 and strict and not d <= BN_TOL]
    updates = [f"{p}: score update (rel diff {v['update_diff']:.2e} > {update_tol:.2g})"
               for p, v in rec["layers"].items() if strict and not v["update_diff"] <= update_tol]
    loss = [f"loss (rel diff {rec['loss_rel']:.2e} > {loss_tol:.2g})"] if not rec["loss_rel"] <= loss_tol else []
    return masks + bn + updates + loss


def envelope(records) -> dict | None:
    """The twin's running extremes over records (None if they hold no twin): max loss rel diff,
    max update diff, min mask agreement."""
    twins = [r["twin"] for r in records if r.get("twin")]
    if not twins:
        return None
    return dict(loss=max(t["loss"] for t in twins), update=max(t["update"] for t in twins),
                agree=min(t["agree"] for t in twins))


def first_parting(records):
    """(step, what) of the first violation, or None: the verdict, from the records alone. A
    tie at a layer's threshold broken the other way (equal |S|, so no order is wrong) ends the
    exact phase, as float32 noise does: from that step on the forwards may differ."""
    swapped = False
    for i, rec in enumerate(records):
        swapped |= any(v.get("mask_tie_swap") for v in rec["layers"].values())
        rec = {**rec, "tie_swapped": swapped}
        bad = violations(rec, envelope(records[:i + 1]))
        if bad:
            return rec["step"], bad[0]
    return None


def batches(case: Case, steps_per_epoch: int, num_classes: int, seed: int, cifar10: str | None):
    """steps_per_epoch (x NCHW float32, y int64) batches, the same every epoch."""
    n = steps_per_epoch * case.batch
    rng = np.random.default_rng(seed)
    if cifar10 and case.side == 32:
        x, y = _cifar10(cifar10, n, rng)
    else:
        x = rng.standard_normal((n, 3, case.side, case.side), dtype=np.float32)
        y = rng.integers(0, num_classes, n)
    return [(x[i:i + case.batch], y[i:i + case.batch].astype(np.int64))
            for i in range(0, n, case.batch)]


def _cifar10(path: str, n: int, rng):
    import zipfile

    from PIL import Image

    if not os.path.isfile(path):
        raise SystemExit(f"--cifar10={path}: no such file (CIFAR-10 as a zip of train/<class>/*.png)")
    with zipfile.ZipFile(path) as z:
        names = sorted(f for f in z.namelist() if f.startswith("train/") and f.endswith(".png"))
        classes = sorted({f.split("/")[1] for f in names})
        if len(classes) != 10:
            raise SystemExit(f"--cifar10={path}: expected train/<10 classes>/*.png, found {len(classes)} classes")
        pick = [names[i] for i in rng.permutation(len(names))[:n]]
        x = np.stack([np.asarray(Image.open(io.BytesIO(z.read(f))).convert("RGB"), np.float32)
                      for f in pick]) / 255.0
    x = (x - np.array(CIFAR_MEAN, np.float32)) / np.array(CIFAR_STD, np.float32)
    y = np.array([classes.index(f.split("/")[1]) for f in pick])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


@dataclasses.dataclass
class Result:
    records: list
    final: dict           # per layer at the last step: mask agreement, score difference
    parted: tuple | None  # (step, what) of the first violation, None if none
    sec_ref: float        # median seconds per step
    sec_ours: float

    @property
    def agrees(self) -> bool:
        return self.parted is None


def run(ref: TorchSide, make_ours, data, steps: int, steps_per_epoch: int, *, log=print,
        stop_at_parting=False, twin: TorchTwin | None = None) -> Result:
    """Trains both sides `steps` steps in lockstep on data[step % steps_per_epoch], comparing
    every step. make_ours(reference state) -> JaxSide (built from the reference's initial state).
    twin: also trained in lockstep, its distance to the reference recorded (rec["twin"])."""
    ours = make_ours(ref.state())
    twin_before = twin.state() if twin else None
    records, t_ref, t_ours, parted = [], [], [], None
    log(f"{'step':>5} {'loss ref':>10} {'loss ours':>10} {'rel diff':>9}  min mask agree  "
        "max score diff  max update diff")
    ref_before, ours_before = ref.as_ours(ref.state()), ours.state()
    for step in range(steps):
        x, y = data[step % steps_per_epoch]
        masks_ref = ref.as_ours(ref.state(), ref.masks())
        loss_ref, sec = ref.step(x, y, step // steps_per_epoch)
        t_ref.append(sec)
        loss_ours, masks_ours, sec = ours.step(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y)
        t_ours.append(sec)
        ref_after, ours_after = ref.as_ours(ref.state()), ours.state()
        rec = compare(step, loss_ref, loss_ours, masks_ref, masks_ours, ref_after, ours_after,
                      ref_before, ours_before)
        if twin is not None:
            loss_twin, masks_twin, _ = twin.step(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y)
            twin_after = twin.state()
            t = compare(step, loss_ref, loss_twin, masks_ref, masks_twin, ref_after, twin_after,
                        ref_before, twin_before)
            rec["twin"] = dict(loss=t["loss_rel"], update=max(v["update_diff"] for v in t["layers"].values()),
                               agree=min(v["mask_agree"] for v in t["layers"].values()))
            twin_before = twin_after
        ref_before, ours_before = ref_after, ours_after
        records.append(rec)
        agree = min(v["mask_agree"] for v in rec["layers"].values())
        diff = max(v["score_diff"] for v in rec["layers"].values())
        udiff = max(v["update_diff"] for v in rec["layers"].values())
        log(f"{step:5d} {loss_ref:10.6f} {loss_ours:10.6f} {rec['loss_rel']:9.2e}  {agree:14.6f}  "
            f"{diff:14.2e}  {udiff:15.2e}")
        if rec.get("twin"):
            log(f"      twin: loss rel diff {rec['twin']['loss']:.2e}, min mask agree "
                f"{rec['twin']['agree']:.6f}, max update diff {rec['twin']['update']:.2e}")
        swapped = any(v.get("mask_tie_swap") for r in records for v in r["layers"].values())
        bad = violations({**rec, "tie_swapped": swapped}, envelope(records))
        if bad and parted is None:
            parted = (step, bad[0])
            log(f"      the runs part at step {step}, first at {'; '.join(bad[:3])}"
                + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
            if stop_at_parting:
                break
    final = records[-1]["layers"]  # the masks of the last step's forward, the scores after it
    med = lambda t: float(np.median(t[1:] if len(t) > 1 else t))  # noqa: E731 - the first compiles
    return Result(records, final, parted, med(t_ref), med(t_ours))


TABLE_HEAD = ("| case | steps | loss rel diff, step 0 / max | first mask entry differing | "
              f"max update diff, steps < {STRICT_STEPS} | min mask agree (end) | "
              "max score rel diff (end) | s/step ref / ours | verdict |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def summary_line(records, sec_ref, sec_ours) -> str:
    """A row of TABLE_HEAD from a run's records (Result fields, or its --json entry); the
    verdict by the criterion as it is now."""
    parted = first_parting(records)
    layers = records[-1]["layers"]
    first_flip = next((f"step {r['step']}" for r in records
                       if any(v["mask_differ"] for v in r["layers"].values())), "none")
    early = max(v["update_diff"] for r in records[:STRICT_STEPS] for v in r["layers"].values())
    verdict = "agree" if parted is None else f"part at step {parted[0]}, {parted[1]}"
    return (f"{len(records)} | {records[0]['loss_rel']:.1e} / {max(r['loss_rel'] for r in records):.1e} | "
            f"{first_flip} | {early:.1e} | {min(v['mask_agree'] for v in layers.values()):.4f} | "
            f"{max(v['score_diff'] for v in layers.values()):.1e} | {sec_ref:.3f} / {sec_ours:.3f} | "
            f"{verdict}")


def print_final(result: Result, log=print):
    log(f"{'layer':<28} {'mask agree':>11} {'score max rel diff':>19}")
    for path, v in result.final.items():
        log(f"{path:<28} {v['mask_agree']:11.6f} {v['score_diff']:19.2e}")


# ----------------------------------------------------------------------------- the command
def _case_names(spec: str) -> list[str]:
    names = list(CASES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise SystemExit(f"--cases: unknown {unknown or spec!r}; known: all, {', '.join(CASES)}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference_src", help="a checkout of allenai/hidden-networks")
    ap.add_argument("--table", nargs="*", default=None, metavar="JSON",
                    help="print the summary table of earlier --json files and exit")
    ap.add_argument("--cases", default="all", help="comma-separated case names, or all (--list)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per case (default: 100; cResNet18 30, ResNet-50 20, for the CPU)")
    ap.add_argument("--cifar10", default=None, help="CIFAR-10 zip (train/<class>/*.png); default synthetic")
    ap.add_argument("--plants", action="store_true",
                    help="also run the planted differences (on the first Conv case; bn_eval on the "
                    "first ResNet case); each must be caught")
    ap.add_argument("--only_plants", action="store_true", help="with --plants: skip the plain runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch_threads", type=int, default=0, help="torch's threads (0: its default)")
    ap.add_argument("--json", default=None, help="write every step's record here")
    ap.add_argument("--baseline", action="store_true",
                    help="also train the twin (the reference, weights +1 ulp) on every case, for the "
                    "envelope (the ResNet cases always do)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, c in CASES.items():
            print(f"{name}: {c.arch} k={c.keep_fraction} batch {c.batch} {c.side}x{c.side} ({c.config})")
        return 0
    if args.table is not None:
        import json

        print(TABLE_HEAD)
        for path in args.table:
            for e in json.load(open(path)):
                print(f"| {e['case']} | {summary_line(e['records'], e['sec_ref'], e['sec_ours'])} |")
        return 0
    if not args.reference_src:
        raise SystemExit("--reference_src is required (a checkout of allenai/hidden-networks)")
    names = _case_names(args.cases)
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    try:
        import torch
    except ImportError:
        raise SystemExit("the reference needs torch (CPU is enough): pip install torch") from None
    import jax

    torch.manual_seed(args.seed)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    ref_main = load_reference(args.reference_src)
    summary, ok = [], True
    first_conv = next((n for n in names if CASES[n].arch.startswith("Conv")), None)
    first_resnet = next((n for n in names if "ResNet" in CASES[n].arch), None)
    for name in names:
        plants = []
        if args.plants and name == first_conv:
            plants = [p for p in PLANTS if p != "bn_eval"]  # no BatchNorm in the Conv nets
        if args.plants and name == first_resnet:
            plants = ["bn_eval"]
        for plant in ([] if args.only_plants else [None]) + plants:
            case = CASES[name]
            steps = args.steps or case.steps
            spe = max(1, steps // 10)
            epochs = -(-steps // spe)
            ref = reference_side(ref_main, args.reference_src, case, epochs=epochs, seed=args.seed)
            num_classes = 1000 if case.arch == "ResNet50" else 10
            hyper = recipe(ref.optimizer, sys.modules["args"].args)
            data = batches(case, spe, num_classes, args.seed, args.cifar10)
            title = f"{name}" + (f" + plant {plant} ({PLANTS[plant]})" if plant else "")
            print(f"\n== {title}: {steps} steps, batch {case.batch}, {spe} steps/epoch, {hyper}")
            twin = None
            if (args.baseline or "ResNet" in case.arch) and plant is None:
                twin = TorchTwin(reference_side(ref_main, args.reference_src, case, epochs=epochs,
                                                seed=args.seed), spe)
            make_ours = lambda state: JaxSide(  # noqa: E731
                state, arch=case.arch, keep_fraction=case.keep_fraction, hyper=hyper,
                steps=epochs * spe, steps_per_epoch=spe, num_classes=num_classes, plant=plant)
            res = run(ref, make_ours, data, steps, spe, stop_at_parting=plant is not None, twin=twin)
            if plant is None:
                print_final(res)
            caught = plant is not None and not res.agrees
            ok &= res.agrees if plant is None else caught
            summary.append((title, res))
            if args.json:
                import json

                with open(args.json, "w") as f:
                    json.dump([dict(case=t, records=r.records, final=r.final, parted=r.parted,
                                    sec_ref=r.sec_ref, sec_ours=r.sec_ours) for t, r in summary], f)
    print(f"\n== summary ({jax.devices()[0].platform}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads)")
    print(TABLE_HEAD)
    for title, res in summary:
        print(f"| {title} | {summary_line(res.records, res.sec_ref, res.sec_ours)} |")
    print("agreement" if ok else "NO AGREEMENT (or a plant not caught)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
