"""Check a run on a TPU or GPU before booking it, from a CPU-only machine.

  python -m edgepopup_jax.planning.preflight --config=configs/imagenet_wrn50.py --target=tpu:v5e:2x4
  python -m edgepopup_jax.planning.preflight --config=configs/imagenet_resnet50.py --target=gpu:h100:8
  python -m edgepopup_jax.planning.preflight --config=configs/cifar10.py:conv4 --target=gpu:h100:1 \\
      --parallel_runs=50        # a group of 50 runs in one program (loop.train_group)

Compiles the trainer's own train and eval steps (step.make_steps: the same functions, shardings,
dtypes and donation as a run) ahead of time for the target's devices, and prints per device:
memory against the device's HBM, model FLOPs, the collectives in the step, and the largest
per-device batch that still fits. Takes the same --config.* overrides as main.py.
Exit code 0: compiles and fits; 1: does not fit; 2: bad target or config.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import sys
import time
import warnings

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from edgepopup_jax.training import command, input_pipeline, sharding, train
from edgepopup_jax.planning import targets

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of one compiled step (XLA's buffer assignment)."""
    argument: int
    output: int
    alias: int  # outputs that reuse donated argument buffers
    temp: int
    code: int

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                   m.temp_size_in_bytes, m.generated_code_size_in_bytes)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast")
_INSTRUCTION = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


def _shape_bytes(shape: str) -> int:
    return sum(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dtype, dims in _ARRAY.findall(shape))


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in compiled HLO, per device and as written
    in the program (an op inside a loop counts once). Bytes are each op's result; an async op
    counts at its -start and its bytes are taken from its -done."""
    out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        shape, op, phase = m.groups()
        if phase != "-done":
            out[op]["count"] += 1
        if phase != "-start":
            out[op]["bytes"] += _shape_bytes(shape)
    return dict(out)


class _Fits:
    """What a report with train and eval Memory, an error and usable_bytes says of itself."""

    @property
    def fits(self) -> bool:
        return self.error is None and max(self.train.peak, self.eval.peak) <= self.usable_bytes

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, train_peak_bytes=self.train.peak if self.train else None,
                 eval_peak_bytes=self.eval.peak if self.eval else None)
        return d


@dataclasses.dataclass
class Report(_Fits):
    target: str
    device_kind: str
    num_devices: int
    num_hosts: int
    model: str
    batch_size: int  # global
    eval_batch_size: int  # global, as run on this mesh
    hbm_bytes: int
    usable_bytes: int
    train: Memory | None  # None: did not compile (see error)
    eval: Memory | None
    flops_per_step: float  # global, forward + backward + update
    collectives: dict
    compile_seconds: float
    max_batch_per_device: int | None = None  # the largest seen to fit
    max_batch_exact: bool = True  # False: the search stopped at its compile limit
    no_fit_batch_per_device: int | None = None  # the smallest seen not to fit
    error: str | None = None  # the compiler's own refusal (TPU: out of HBM at compile time)


class DoesNotCompile(RuntimeError):
    """The compiler itself refused the step, e.g. TPU's out-of-memory at compile time."""


def _prepare(config: ml_collections.ConfigDict, target: targets.Target):
    info = input_pipeline.get_info(config.data, prepared=False)
    if not info.num_train:  # split sizes unknown without the data: they only set LR constants
        info = dataclasses.replace(info, num_train=config.batch_size)
    sharding.local_batch_size(config.batch_size, target.mesh)  # the trainer's own batch check
    return info, train.make_plan(config, info)


def _abstract_batch(info, batch_size: int, mesh, eval: bool = False):
    data = NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS))
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=data)
            for k, s in input_pipeline.batch_shapes(info, batch_size, eval=eval).items()}


# XLA's GPU compiler, without a device, sometimes finds no tiling for a Triton GEMM fusion
# ("Couldn't find output tile sizes that satisfy hlo": the ViT's attention out-projection,
# f32[8320,192] at batch 128). Such a step is compiled again with XLA's own GEMMs (cuBLAS, which
# needs no tiling), the compile a run would get if its autotuner rejected the Triton tiling.
TILING_ERROR = "Couldn't find output tile sizes"
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def _compile_lowered(lowered, compiler_options=None):
    try:
        with warnings.catch_warnings():
            # With a persistent compilation cache (JAX_COMPILATION_CACHE_DIR), JAX stores a
            # deviceless executable, and a later deviceless compile of the same program finds it
            # but cannot load it ("PjRtCompiler must be constructed with a Client"), warns, and
            # compiles again, which is all preflight needs. Only that warning is silenced.
            warnings.filterwarnings("ignore", message="Error reading persistent compilation cache")
            return lowered.compile(compiler_options=compiler_options)
    except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED from the TPU compiler
        raise DoesNotCompile(str(e).splitlines()[0][:500]) from e


def _stream_steps(config, target: targets.Target):
    """A run of config as the trainer runs it from a stream (a group of one, the batch split over
    the target's devices): (steps, train arguments, eval arguments, global eval batch)."""
    from edgepopup_jax.training import parallel, sources
    info, _ = _prepare(config, target)
    group = parallel.make_group([config], info)
    mesh = sharding.make_mesh(target.mesh.devices.flat, 1, config.batch_size)
    _, eval_global = sharding.eval_batch_sizes(config.eval_batch_size or config.batch_size, mesh)
    source = sources.StreamSource(None, None, mesh)
    steps, train_args, (folded, _) = _group_arguments(group, mesh, source=(source, _abstract_batch(
        info, config.batch_size, mesh)))
    where = NamedSharding(mesh, PartitionSpec(None, sharding.DATA_AXIS))
    chunk = {k: _spec((1,) + s.shape, s.dtype, where)
             for k, s in input_pipeline.batch_shapes(info, eval_global, eval=True).items()}
    return steps, train_args, (folded, chunk), eval_global


def _compile(jitted, *args):
    lowered = jitted.lower(*args)
    try:
        return _compile_lowered(lowered)
    except DoesNotCompile as e:
        if TILING_ERROR not in str(e):
            raise
        print(f"  XLA found no Triton GEMM tiling ({str(e)[:120]}...): compiling with "
              "xla_gpu_enable_triton_gemm=false", file=sys.stderr)
        return _compile_lowered(lowered, NO_TRITON_GEMM)


def compile_train_step(config, target: targets.Target):
    """The compiled train step of `config` for `target` (config.batch_size is global)."""
    steps, train_args, _, _ = _stream_steps(config, target)
    return _compile(steps.train, *train_args)


def _with_batch(config, batch_size: int):
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = batch_size
    return config


def train_flops(config, target: targets.Target) -> float:
    """Global FLOPs of one train step, from XLA's cost analysis of the same step lowered for the
    CPU (the TPU and GPU compilers give no usable count)."""
    from edgepopup_jax.training import parallel
    return group_flops(parallel.make_group([config], _prepare(config, target)[0]))


def analyse(config, target: targets.Target, log=print) -> Report:
    """Compiles config's train and eval steps for target and measures them."""
    t = time.time()
    log(f"compiling the train step of {config.model.name}, batch {config.batch_size}, for "
        f"{target.num_devices} x {target.device_kind} ...")
    steps, train_args, eval_args, eval_global = _stream_steps(config, target)
    memory, error = {}, None
    try:
        compiled_train = _compile(steps.train, *train_args)
        memory["train"] = Memory.of(compiled_train)
        log(f"  {time.time() - t:.0f} s; compiling the eval step, batch {eval_global} ...")
        # As the trainer evaluates: the masks selected and folded once (steps.fold), then
        # every batch.
        memory["eval"] = Memory.of(_compile(steps.eval, *eval_args))
    except DoesNotCompile as e:
        if not _out_of_memory(str(e)):
            raise
        error = str(e)
    return Report(
        target=target.spec, device_kind=target.device_kind, num_devices=target.num_devices,
        num_hosts=target.num_hosts, model=config.model.name, batch_size=config.batch_size,
        eval_batch_size=eval_global, hbm_bytes=target.hbm_bytes, usable_bytes=target.usable_bytes,
        train=memory.get("train"), eval=memory.get("eval"),
        flops_per_step=train_flops(config, target),
        collectives=collectives(compiled_train.as_text()) if "train" in memory else {},
        compile_seconds=time.time() - t, error=error)


def _out_of_memory(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def largest_that_fits(peak, known: tuple[int, int | None], limit: int, fixed_bytes: int,
                      max_compiles: int = 8) -> tuple[int | None, int | None]:
    """The largest n whose compiled step fits in `limit` bytes, searched by compiling.

    peak(n): the step's per-device peak bytes at n (per-device batch, or runs in a group), None
    if it does not compile. known: (n0, its peak or None). fixed_bytes: the part of the peak
    that does not grow with n (for a line through one point).

    Keeps a bracket (lo fits, hi does not) and guesses from a straight line through the two
    newest measured peaks (GPU memory grows about linearly with the batch or the number of
    runs, so that usually hits the boundary in 2-3 compiles); when the line misses on the same
    side twice, it bisects (the TPU compiler rematerialises to fit, so its peaks are not
    linear; a step that cannot fit does not compile there). Returns (lo, hi): lo is the largest
    n seen to fit (None: not even 1), hi the smallest seen not to (None: none), hi == lo + 1
    when exact.
    """
    n0, p0 = known
    measured = [(n0, p0)] if p0 is not None else []  # (n, peak) of compiles that worked
    lo, hi = (n0, None) if p0 is not None and p0 <= limit else (0, n0)  # lo fits, hi does not
    moves = []  # which end of the bracket each compile moved
    for _ in range(max_compiles):
        if hi is not None and hi - lo <= 1:
            break
        if len(measured) >= 2:  # secant through the two newest measurements
            (b1, p1), (b2, p2) = measured[-2:]
            slope = (p2 - p1) / (b2 - b1) if b2 != b1 else 0.0
            intercept = p2 - slope * b2
        elif measured:  # one point: the fixed part stays, the rest grows with n
            (b1, p1), = measured
            intercept, slope = fixed_bytes, (p1 - fixed_bytes) / b1
        else:
            intercept, slope = 0.0, 0.0
        guess = int((limit - intercept) // slope) if slope > 0 else 2 * max(lo, 1)
        if hi is not None and len(moves) >= 2 and moves[-1] == moves[-2]:
            guess = (lo + hi) // 2  # the line keeps missing on one side: bisect instead
        guess = max(guess, lo + 1) if hi is None else min(max(guess, lo + 1), hi - 1)
        p = peak(guess)
        if p is not None:
            measured.append((guess, p))
        if p is not None and p <= limit:
            lo = guess
            moves.append("lo")
        else:
            hi = guess
            moves.append("hi")
    return (lo or None), hi


def max_batch_per_device(config, target: targets.Target, known: tuple[int, Memory | None],
                         max_compiles: int = 8, log=print) -> tuple[int | None, int | None]:
    """The largest per-device train batch whose step fits the target (largest_that_fits; the
    state, the step's arguments, is what does not grow with the batch)."""
    n = target.num_devices

    def peak(per_device: int) -> int | None:
        t = time.time()
        try:
            mem = Memory.of(compile_train_step(_with_batch(config, per_device * n), target))
        except DoesNotCompile as e:
            log(f"  batch {per_device}/device: does not compile ({e})")
            return None
        log(f"  batch {per_device}/device: peak {mem.peak / GiB:.2f} GiB ({time.time() - t:.0f} s)")
        return mem.peak

    b0, mem0 = known
    return largest_that_fits(peak, (b0, mem0.peak if mem0 else None), target.usable_bytes,
                             mem0.argument if mem0 else 0, max_compiles)


def _gib(b: int) -> str:
    return f"{b / GiB:.2f}"


def _memory_lines(r, eval_name: str) -> list[str]:
    """The per-device memory table of a report's train and eval steps."""
    lines = ["", "per device, GiB      argument   output  (aliased)     temp     peak   fits"]
    for name, m in (("train step", r.train), (eval_name, r.eval)):
        if m is None:
            lines.append(f"{name:<18} does not compile: {r.error}")
            continue
        lines.append(f"{name:<18} {_gib(m.argument):>10} {_gib(m.output):>8} {_gib(m.alias):>10} "
                     f"{_gib(m.temp):>8} {_gib(m.peak):>8}   "
                     f"{'yes' if m.peak <= r.usable_bytes else 'NO'}")
    return lines


def format_report(r: Report) -> str:
    usable = r.usable_bytes
    note = "" if usable == r.hbm_bytes else f" (XLA may use {_gib(usable)} GiB of {_gib(r.hbm_bytes)})"
    lines = [
        f"target {r.target}: {r.num_devices} x {r.device_kind} on {r.num_hosts} host(s), "
        f"{_gib(r.hbm_bytes)} GiB HBM per device{note}",
        f"model {r.model}: train batch {r.batch_size} ({r.batch_size // r.num_devices} per device), "
        f"eval batch {r.eval_batch_size} ({r.eval_batch_size // r.num_devices} per device)",
    ] + _memory_lines(r, "eval step")
    per_device = r.flops_per_step / r.num_devices
    lines += ["", f"model FLOPs: {r.flops_per_step / 1e12:.2f} TFLOP per step, "
              f"{per_device / 1e12:.3f} TFLOP per device per step, "
              f"{r.flops_per_step / r.batch_size / 1e9:.2f} GFLOP per image (forward + backward)"]
    lines += ["", "collectives in the train step (per device, as written in the program):"]
    if not r.collectives:
        lines.append("  none")
    for op, c in sorted(r.collectives.items()):
        lines.append(f"  {op:<20} {c['count']:>4} ops  {c['bytes'] / 2**20:10.2f} MiB")
    if r.max_batch_per_device is not None or r.no_fit_batch_per_device is not None:
        found = r.max_batch_per_device or 0
        line = f"largest train batch that fits: {found} per device ({found * r.num_devices} global)"
        if not r.max_batch_exact:
            line += (f"; {r.no_fit_batch_per_device} does not fit (the search stopped at its compile "
                     "limit in between)" if r.no_fit_batch_per_device else
                     " or more (the search stopped at its compile limit)")
        lines += ["", line]
    lines += ["", "FITS" if r.fits else "DOES NOT FIT"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- groups of runs

# Split sizes of catalog data sets a preflight may see unprepared (tfds knows them only once
# prepared); a group holds its data on the device, so its size counts.
KNOWN_SPLIT_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000),
                     "mnist": (60_000, 10_000), "fashion_mnist": (60_000, 10_000)}


@dataclasses.dataclass
class GroupReport(_Fits):
    target: str
    device_kind: str
    num_devices: int
    model: str
    runs: int
    batch_size: int  # per run
    mesh: dict
    hbm_bytes: int
    usable_bytes: int
    data_bytes: int  # both splits as uint8, on every device
    train: Memory | None
    eval: Memory | None
    flops_per_step: float  # the whole group's step
    collectives: dict
    compile_seconds: float
    split_sizes: str = ""  # where the split sizes came from
    max_runs: int | None = None
    no_fit_runs: int | None = None
    max_runs_exact: bool = True
    error: str | None = None


def _group_info(config):
    from edgepopup_jax.training import device_data
    device_data.check_device_augment(config.data.augment)
    info = input_pipeline.get_info(config.data, prepared=False)
    if info.num_train:
        return info, "the data set's own"
    if config.data.name not in KNOWN_SPLIT_SIZES:
        raise ValueError(f"the split sizes of {config.data.name!r} are unknown without the data: "
                         "prepare it (tfds build), or use a data set whose sizes preflight knows: "
                         f"{', '.join(KNOWN_SPLIT_SIZES)}")
    num_train, num_eval = KNOWN_SPLIT_SIZES[config.data.name]
    return (dataclasses.replace(info, num_train=num_train, num_eval=num_eval),
            f"{config.data.name}'s published sizes (not prepared here)")


def _group(config, runs: int, info):
    from edgepopup_jax.training import parallel
    from edgepopup_jax.planning import grid
    configs = [grid.with_overrides(config, {"seed": config.seed + i}) for i in range(runs)]
    return parallel.make_group(configs, info)


def _abstract_device_source(group, mesh, with_sharding: bool = True):
    """A device source's step argument (the data set on every device, every run's permutation
    and seed), abstract, placed as loop.train_group places it: (source, item)."""
    from edgepopup_jax.training import sources
    runs = NamedSharding(mesh, PartitionSpec(sources.RUNS_AXIS)) if with_sharding else None
    repl = NamedSharding(mesh, PartitionSpec()) if with_sharding else None
    config, info, r = group.configs[0], group.info, group.size
    n, shape = info.num_train, tuple(info.image_shape)
    batches = functools.partial(sources.gather_batches, steps_per_epoch=group.steps_per_epoch,
                                batch_size=config.batch_size, augment=config.data.augment)
    item = {"image": _spec((n,) + shape, np.uint8, repl), "label": _spec((n,), np.int32, repl),
            "permutations": _spec((r, n), np.int32, runs), "seed": _spec((r,), np.int32, runs)}
    source = sources.DeviceSource(None, None, None, lambda it, step: batches(
        it["image"], it["label"], it["permutations"], it["seed"], step),
        jax.tree.map(lambda x: x.sharding, item), False)
    return source, item


def _spec(shape, dtype, where):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=where)


def _group_arguments(group, mesh, with_sharding: bool = True, source=None):
    """Abstract (states, alive, item, step, hyper) of a group's train step, and the eval
    step's (folded variables, eval chunk), placed as loop.train_group places them. source:
    (a source, its abstract item); default: the device source."""
    from edgepopup_jax.training import parallel, step as step_lib
    runs = NamedSharding(mesh, PartitionSpec(parallel.RUNS_AXIS)) if with_sharding else None
    repl = NamedSharding(mesh, PartitionSpec()) if with_sharding else None
    config, info, r = group.configs[0], group.info, group.size
    source, item = source or _abstract_device_source(group, mesh, with_sharding)
    steps = step_lib.make_steps(group, mesh, source, config.state_sharding)
    one = jax.eval_shape(steps.init[0], 0)
    states = jax.tree.map(lambda x: _spec((r,) + x.shape, x.dtype, runs), one)
    shape = tuple(info.image_shape)
    hyper = {"learning_rate": _spec((r,), np.float32, runs),
             "weight_decay": _spec((r,), np.float32, runs),
             "counts": {scope: _spec(c.shape, np.int32, runs)
                        for scope, c in group.hyper["counts"].items()},
             "global": _spec((r,), np.bool_, runs)}
    train_args = (states, _spec((r,), np.bool_, runs), item, _spec((), np.int32, repl), hyper)
    eval_batch = config.get("eval_batch_size") or config.batch_size
    nb = -(-info.num_eval // eval_batch)
    eval_data = {"image": _spec((nb, eval_batch) + shape, np.uint8, repl),
                 "label": _spec((nb, eval_batch), np.int32, repl),
                 "valid": _spec((nb, eval_batch), np.float32, repl)}
    variables = {k: getattr(states, k) for k in ("params", "frozen", "batch_stats")}
    folded = jax.eval_shape(steps.fold, variables, hyper)
    folded = jax.tree.map(lambda x: _spec(x.shape, x.dtype, runs), folded)
    return steps, train_args, (folded, eval_data)


def compile_group(config, runs: int, target: targets.Target, info=None):
    """The compiled train and eval steps of a group of `runs` runs of config (seeds seed,
    seed + 1, ...) for target: (train, eval, group, mesh)."""
    info = info or _group_info(config)[0]
    group = _group(config, runs, info)
    mesh = sharding.make_mesh(target.mesh.devices.flat, runs, config.batch_size,
                              config.get("parallel_split", "runs"))
    steps, train_args, eval_args = _group_arguments(group, mesh)
    return _compile(steps.train, *train_args), _compile(steps.eval, *eval_args), group, mesh


def group_flops(group) -> float:
    """The group step's FLOPs: each run's step (XLA's cost analysis of the step of a group of
    that one run, lowered for the CPU), summed over the runs. Not the whole group lowered at
    once: on the CPU its selection runs the runs one after another in a loop, whose body the
    cost analysis counts once."""
    from edgepopup_jax.training import parallel
    from jax.sharding import Mesh
    cpu = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1),
               (parallel.RUNS_AXIS, parallel.DATA_AXIS))
    total = 0.0
    for config in group.configs:
        one = parallel.make_group([config], group.info)
        steps, train_args, _ = _group_arguments(one, cpu, with_sharding=False)
        fn = steps.train  # (the device source's step: a stream's gathers nothing, so it differs
        # from it by the gather and the augmentation alone)
        key = json.dumps({k: v for k, v in config.to_dict().items() if k != "seed"},
                         sort_keys=True, default=str)
        if key not in _FLOPS:  # runs differing only in seed do the same arithmetic
            lowered = fn.trace(*train_args).lower(lowering_platforms=("cpu",))
            _FLOPS[key] = float(lowered.cost_analysis()["flops"])
        total += _FLOPS[key]
    return total


_FLOPS: dict = {}


def analyse_group(config, runs: int, target: targets.Target, log=print) -> GroupReport:
    """Compiles the train and eval steps of a group of `runs` runs for target and measures them."""
    from edgepopup_jax.training import device_data
    info, sizes = _group_info(config)
    t = time.time()
    log(f"compiling the step of a group of {runs} {config.model.name} runs, batch "
        f"{config.batch_size} each, for {target.num_devices} x {target.device_kind} ...")
    memory, error, text, mesh = {}, None, "", None
    try:
        train_c, eval_c, group, mesh = compile_group(config, runs, target, info)
        memory = {"train": Memory.of(train_c), "eval": Memory.of(eval_c)}
        text = train_c.as_text()
    except DoesNotCompile as e:
        if not _out_of_memory(str(e)):
            raise
        error, group = str(e), _group(config, runs, info)
    return GroupReport(
        target=target.spec, device_kind=target.device_kind, num_devices=target.num_devices,
        model=config.model.name, runs=runs, batch_size=config.batch_size,
        mesh=dict(mesh.shape) if mesh is not None else {}, hbm_bytes=target.hbm_bytes,
        usable_bytes=target.usable_bytes, data_bytes=device_data.nbytes(info),
        train=memory.get("train"), eval=memory.get("eval"), flops_per_step=group_flops(group),
        collectives=collectives(text), compile_seconds=time.time() - t, split_sizes=sizes,
        error=error)


def max_runs(config, target: targets.Target, known: tuple[int, Memory | None], data_bytes: int,
             max_compiles: int = 8, log=print) -> tuple[int | None, int | None]:
    """The largest group of config's runs whose steps fit the target (largest_that_fits; the
    data on the device is what does not grow with the runs)."""
    info = _group_info(config)[0]

    def peak(runs: int) -> int | None:
        t = time.time()
        try:
            train_c, eval_c, _, _ = compile_group(config, runs, target, info)
        except DoesNotCompile as e:
            log(f"  {runs} runs: does not compile ({e})")
            return None
        p = max(Memory.of(train_c).peak, Memory.of(eval_c).peak)
        log(f"  {runs} runs: peak {p / GiB:.2f} GiB ({time.time() - t:.0f} s)")
        return p

    n0, mem0 = known
    return largest_that_fits(peak, (n0, mem0.peak if mem0 else None), target.usable_bytes,
                             data_bytes, max_compiles)


def format_group_report(r: GroupReport) -> str:
    lines = [
        f"target {r.target}: {r.num_devices} x {r.device_kind}, {_gib(r.hbm_bytes)} GiB HBM per "
        f"device (XLA may use {_gib(r.usable_bytes)})",
        f"a group of {r.runs} {r.model} runs, batch {r.batch_size} per run, mesh {r.mesh}; the "
        f"data on every device: {r.data_bytes / 2**20:.1f} MiB (split sizes: {r.split_sizes})",
    ] + _memory_lines(r, "eval (all batches)")
    lines += ["", f"FLOPs (XLA's count): {r.flops_per_step / 1e9:.4g} GFLOP per group step "
              f"({r.flops_per_step / r.num_devices / 1e9:.4g} per device), "
              f"{r.flops_per_step / r.runs / r.batch_size / 1e6:.4g} MFLOP per image "
              "(forward + backward + update)"]
    lines += ["", "collectives in the train step (per device, as written in the program):"]
    lines += [f"  {op:<20} {c['count']:>4} ops  {c['bytes'] / 2**20:10.2f} MiB"
              for op, c in sorted(r.collectives.items())] or ["  none"]
    if r.max_runs is not None or r.no_fit_runs is not None:
        line = f"largest group that fits: {r.max_runs or 0} runs"
        if not r.max_runs_exact:
            line += (f"; {r.no_fit_runs} do not fit (the search stopped at its compile limit in "
                     "between)" if r.no_fit_runs else " or more (the search stopped at its compile "
                     "limit)")
        lines += ["", line]
    lines += ["", "FITS" if r.fits else "DOES NOT FIT"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def main(argv) -> int:
    from absl import flags, logging
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)
    if not os.environ.get("JAX_PLATFORMS"):  # the host only compiles: keep the CUDA/TPU plugins,
        jax.config.update("jax_platforms", "cpu")  # which have no device here, from starting
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if FLAGS.parallel_runs is not None:
        return _main_group(FLAGS, log)
    try:
        target = targets.parse_target(FLAGS.target)
        config = FLAGS.config
        report = analyse(config, target, log=log)
    except (ValueError, DoesNotCompile) as e:  # bad target or config, or a step that cannot exist
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.search_max_batch:
        print("searching for the largest per-device batch that fits ...", file=sys.stderr, flush=True)
        per_device = report.batch_size // report.num_devices
        lo, hi = max_batch_per_device(
            config, target, (per_device, report.train), max_compiles=FLAGS.max_search_compiles,
            log=lambda s: print(s, file=sys.stderr, flush=True))
        report.max_batch_per_device, report.no_fit_batch_per_device = lo, hi
        report.max_batch_exact = hi is not None and hi - (lo or 0) <= 1
    print(format_report(report))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0 if report.fits else 1


def _main_group(FLAGS, log) -> int:
    try:
        if FLAGS.parallel_runs < 1:
            raise ValueError(f"--parallel_runs must be >= 1, got {FLAGS.parallel_runs}")
        target = targets.parse_target(FLAGS.target)
        report = analyse_group(FLAGS.config, FLAGS.parallel_runs, target, log=log)
        if FLAGS.search_max_runs:
            log("searching for the largest group that fits ...")
            lo, hi = max_runs(FLAGS.config, target, (report.runs, report.train and max(
                report.train, report.eval, key=lambda m: m.peak)), report.data_bytes,
                max_compiles=FLAGS.max_search_compiles, log=log)
            report.max_runs, report.no_fit_runs = lo, hi
            report.max_runs_exact = hi is not None and hi - (lo or 0) <= 1
    except (ValueError, DoesNotCompile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_group_report(report))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0 if report.fits else 1


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("target", None, "tpu:<version>:<topology> or gpu:<kind>:<count>, e.g. "
                        + ", ".join(targets.EXAMPLES[:3]) + ", gpu:h100:8, gpu:a100:8")
    flags.DEFINE_bool("search_max_batch", True, "Also search for the largest per-device batch "
                      "that fits (a few more compiles).")
    flags.DEFINE_integer("max_search_compiles", 8, "At most this many compiles for that search.")
    flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
    flags.DEFINE_integer("parallel_runs", None, "Check a group of this many runs trained as one "
                         "program, the data on the device (seeds seed, seed + 1, ...): memory, "
                         "FLOPs, and the largest group that fits.")
    flags.DEFINE_bool("search_max_runs", True, "With --parallel_runs: also search for the "
                      "largest group that fits (a few more compiles).")
    flags.mark_flags_as_required(["config", "target"])


def cli():
    """`python -m edgepopup_jax.planning.preflight` and the `edgepopup-preflight` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    command.run(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()
