"""The batched mask selection (core/selection.py): exact against a sort for every model's layers,
ties and bf16 included; the global scope; split over 8 devices; one loop on accelerators."""
import functools
import pathlib
import re
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepopup_jax.core import masking, selection  # noqa: E402
from edgepopup_jax.models import MODEL_NAMES, get_model  # noqa: E402
from edgepopup_jax.training import evaluation, sharding, train  # noqa: E402
from edgepopup_jax.training import loop


def sort_reference(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Top kept_count(n, k) of |scores| by a stable sort (ties to the lower flat index)."""
    flat = np.abs(np.asarray(scores, np.float32)).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, bool)
    mask[order[:masking.kept_count(flat.size, keep_fraction)]] = True
    return mask.reshape(np.shape(scores))


def model_score_shapes(name: str) -> dict:
    """{path: shape} of every scores leaf; ResNets at width 1/8 (the same 20-54 layers, smaller)."""
    options = {"width": 0.125} if "resnet" in name else {}
    size = 224 if name.startswith(("resnet", "wide")) else 32
    model = get_model(name, num_classes=10, **options)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                               jnp.zeros((1, size, size, 3)), train=False))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes["params"]))
    return {p: s.shape for p, s in flat.items() if p[-1] == "scores"}


KINDS = ("normal", "ties", "bf16")


def random_scores(shapes: dict, kind: str | None, seed: int = 0) -> dict:
    """Random scores; kind None: the kinds in turn, layer by layer (one compile covers all)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (path, shape) in enumerate(shapes.items()):
        layer_kind = kind or KINDS[i % len(KINDS)]
        x = rng.standard_normal(shape).astype(np.float32)
        if layer_kind != "normal":
            x = np.round(x * 2)  # a handful of distinct values: ties at every threshold
        out[path] = jnp.asarray(x, jnp.bfloat16 if layer_kind == "bf16" else jnp.float32)
    return out


# resnet101/152 and wide_resnet101_2 repeat the blocks (the same layer shapes) of resnet50 and
# wide_resnet50_2 more times: selecting over more layers is tested by those, at less compile time.
DEEPER_REPEATS = {"resnet101", "resnet152", "wide_resnet101_2"}


@pytest.mark.parametrize("name", [m for m in MODEL_NAMES if m not in DEEPER_REPEATS])
def test_batched_selection_equals_the_sort_for_every_layer_of_every_model(name):
    """Random, tied (a handful of values) and bf16 scores, in turn layer by layer."""
    shapes = model_score_shapes(name)
    select = jax.jit(lambda s, k: selection.masks_by_path(s, k, method="batched"), static_argnums=1)
    scores = random_scores(shapes, None)
    for k in ((0.05, 0.3, 0.5) if name == "conv4" else (0.3,)):
        masks = select(scores, k)
        for path, s in scores.items():
            expect = sort_reference(np.asarray(s.astype(jnp.float32)), k)
            got = np.asarray(masks[path]) != 0
            np.testing.assert_array_equal(got, expect, err_msg=f"{name} {path} k={k}")
            assert got.sum() == masking.kept_count(expect.size, k)


def test_global_scope_equals_a_sort_over_the_concatenated_scores():
    shapes = model_score_shapes("conv4")
    for kind in ("normal", "ties", "bf16"):
        scores = random_scores(shapes, kind, seed=1)
        masks = jax.jit(lambda s: selection.masks_by_path(s, 0.2, "global"))(scores)
        paths = sorted(scores)  # the documented tie order: layers in sorted path order
        concat = np.concatenate([np.asarray(scores[p].astype(jnp.float32)).reshape(-1) for p in paths])
        expect = sort_reference(concat, 0.2)
        got = np.concatenate([np.asarray(masks[p]).reshape(-1) != 0 for p in paths])
        np.testing.assert_array_equal(got, expect, err_msg=kind)
        per_layer = [int(np.asarray(masks[p]).sum()) for p in paths]
        assert len(set(np.round(np.array(per_layer) / [np.prod(shapes[p]) for p in paths], 3))) > 1


@pytest.mark.parametrize("scope", selection.MASK_SCOPES)
def test_selection_split_over_8_devices_equals_one_device(scope):
    assert len(jax.devices()) == 8
    scores = random_scores(model_score_shapes("cifar_resnet18"), "ties", seed=2)
    one = jax.jit(lambda s: selection.masks_by_path(s, 0.4, scope, method="batched"))(scores)
    for n in (8, 3):
        mesh = sharding.make_mesh(jax.devices()[:n])
        split = jax.jit(lambda s: selection.masks_by_path(s, 0.4, scope, mesh, method="batched"),
                        in_shardings=sharding.replicated(mesh))(scores)
        for path in scores:
            np.testing.assert_array_equal(np.asarray(split[path]), np.asarray(one[path]))


@pytest.mark.parametrize("scope,n", [("layer", 8), ("global", 3)])
def test_selection_on_split_scores_counts_each_block_where_it_lives(scope, n):
    """state_sharding="fsdp" places scores split over the devices (some split, some whole):
    the masks equal one device's, come out split as the scores are, and no score is gathered
    (the only all-gathers are in the rarely taken branch that breaks ties inside a layer)."""
    scores = random_scores(model_score_shapes("conv4"), "ties", seed=3)
    paths = sorted(scores)
    arrays = [jnp.asarray(scores[p]) for p in paths]
    one = jax.jit(lambda s: selection.select_masks(s, 0.4, scope, method="batched"))(arrays)
    mesh = sharding.make_mesh(jax.devices()[:n])
    where = sharding.state_shardings([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
                                     mesh, "fsdp")
    assert PartitionSpec() in {w.spec for w in where} != {PartitionSpec()}  # split and whole
    gathers = {}
    for specs in (None, tuple(w.spec for w in where)):
        fn = jax.jit(lambda s, specs=specs: selection.select_masks(
            s, 0.4, scope, mesh, method="batched", specs=specs), in_shardings=(where,))
        compiled = fn.lower(arrays).compile()
        gathers[specs is None] = [line for line in compiled.as_text().splitlines()
                                  if re.search(r" all-gather(-start)?\(", line)]
        split = compiled(arrays)
        for a, b in zip(split, one):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(m.sharding.is_equivalent_to(w, m.ndim) for m, w in zip(split, where))
    assert all("cond/branch" in line for line in gathers[False]), gathers[False][:2]
    # Without the specs the scores are gathered (replicated) before counting.
    assert any("cond/branch" not in line for line in gathers[True])


def test_accelerator_step_has_one_selection_loop_and_one_all_reduce_per_pass():
    """Lowered for a GPU: one while loop for all 7 masked layers of conv4 (8 passes) over each
    device's 1/8 of every layer, with one all-reduce of the 7 x 15 per-layer counts per pass
    (plus two after the loop); on CPU, the per-layer radix select (no loop)."""
    params = flax.traverse_util.unflatten_dict(random_scores(model_score_shapes("conv4"), "normal"))
    mesh = sharding.make_mesh(jax.devices()[:8])
    fn = jax.jit(lambda p: selection.edge_popup_masks(p, 0.5, "layer", mesh),
                 in_shardings=sharding.replicated(mesh))
    gpu = fn.trace(params).lower(lowering_platforms=("cuda",)).as_text()
    assert gpu.count("stablehlo.while") == 1
    loop = gpu[gpu.index("stablehlo.while"):].splitlines()[0]
    assert "tensor<7xi32>" in loop and "tensor<216xi32>" in loop  # conv0: 1,728 scores / 8
    assert gpu.count('"stablehlo.all_reduce"') == 3
    assert f"tensor<7x{selection.ACCELERATOR_CANDIDATES}xi32>" in gpu  # 15 counts per layer
    cpu = fn.trace(params).lower(lowering_platforms=("cpu",)).as_text()
    assert "\"stablehlo.all_reduce\"" not in cpu and "scatter" in cpu


def test_masks_collection_gives_the_layers_own_masks_and_gradients():
    model = get_model("conv2", num_classes=10, keep_fraction=0.3, width=0.25)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, x)

    def loss(params, masks):
        v = {**variables, "params": params}
        if masks:
            v = {**v, selection.MASKS: selection.edge_popup_masks(params, 0.3)}
        return jnp.sum(model.apply(v, x) ** 2)

    # Jitted (one compile each) rather than op by op: the same values, a fraction of the time.
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    own, batched = (value_and_grad(variables["params"], m) for m in (False, True))
    np.testing.assert_allclose(own[0], batched[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(own[1]), jax.tree.leaves(batched[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_global_scope_needs_the_masks_collection():
    model = get_model("conv2", num_classes=10, mask_scope="global")
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, x)
    with pytest.raises(ValueError, match="mask_scope='global'"):
        model.apply(variables, x)
    masks = jax.jit(lambda p: selection.edge_popup_masks(p, 0.5, "global"))(variables["params"])
    assert jax.jit(model.apply)({**variables, selection.MASKS: masks}, x).shape == (1, 10)
    with pytest.raises(ValueError, match="mask_scope"):
        get_model("conv2", mask_scope="everywhere")


def test_trainer_runs_the_global_scope(tmp_path):
    from edgepopup_jax.configs import default
    c = default.get_config()
    c.num_train_steps, c.log_every_steps, c.batch_size = 3, 1, 32
    c.model.mask_scope = "global"
    c.model.keep_fraction = 0.1
    results = loop.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:2])
    assert results["weights_kept"] == masking.kept_count(results["weights_total"], 0.1)
    kept = [r["kept"] / r["total"] for r in results["layers"]]
    assert max(kept) - min(kept) > 0.01  # layers keep different fractions: one global threshold
    assert results["eval"]["count"] == 1000


def test_evaluation_folds_the_masks_into_the_kernels_once():
    """Steps.masks (once per evaluation) gives W * mask per layer; eval logits are unchanged."""
    model = get_model("conv2", num_classes=10, keep_fraction=0.3, width=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, x)
    mesh = sharding.make_mesh(jax.devices()[:2])
    folded = evaluation.make_masks_fn(model, mesh)(variables)
    for layer, entry in folded[selection.MASKS].items():
        w = variables["frozen"][layer]["kernel"]
        expect = w * masking.topk_mask_reference(variables["params"][layer]["scores"], 0.3)
        np.testing.assert_array_equal(np.asarray(entry["kernel"]), np.asarray(expect))
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(folded, x), apply(variables, x), rtol=1e-6)
    # The folded program multiplies no kernel by a mask: no selection, no scores read.
    hlo = apply.lower(folded, x).as_text()
    assert "stablehlo.while" not in hlo and "scatter" not in hlo


@pytest.mark.parametrize("candidates", [1, 3, 15])
def test_search_is_exact_at_the_ends_of_the_key_range(candidates):
    """The search narrows [0, 2**31 - 1] to one key value in selection.passes(candidates) passes
    (31 bisecting on CPU, 8 with the accelerators' 15): exact for keys at the top (inf, the
    largest float), at the bottom (zeros, -0.0), for one value repeated, for exponents across 60
    orders of magnitude, and for keeping 1 or all."""
    rng = np.random.default_rng(0)
    wide = rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)
    layers = {
        "extremes": [np.inf, -np.inf, np.finfo(np.float32).max, 0.0, -0.0, 3.0, -3.0, 1e-30],
        "all_equal": np.full(100, 0.5), "zeros": np.zeros(50), "wide": wide}
    scores = [jnp.asarray(np.asarray(v, np.float32)) for v in layers.values()]
    flat = np.concatenate([np.asarray(s) for s in scores])
    assert [selection.passes(c) for c in (1, 3, 15)] == [31, 16, 8]
    select = jax.jit(functools.partial(selection.select_masks, method="batched", candidates=candidates),
                     static_argnames=("keep_fraction", "scope"))
    for k in (1e-4, 0.1, 0.5, 0.999, 1.0):
        for s, m in zip(scores, select(scores, keep_fraction=k, scope="layer")):
            np.testing.assert_array_equal(np.asarray(m, bool), sort_reference(s, k))
        whole = np.concatenate([np.asarray(m, bool) for m in select(scores, keep_fraction=k, scope="global")])
        np.testing.assert_array_equal(whole, sort_reference(flat, k))


def test_candidates_must_split_into_whole_bits():
    with pytest.raises(ValueError, match="2\\*\\*b - 1"):
        selection.select_masks([jnp.ones(4)], 0.5, method="batched", candidates=4)
    with pytest.raises(ValueError, match="method='batched'"):
        selection.select_masks([jnp.ones(4)], 0.5, candidates=15)
    with pytest.raises(ValueError, match="2\\*\\*b - 1"):
        with selection.accelerator_candidates(2):
            pass


def test_accelerator_candidates_applies_at_trace_time_and_is_restored():
    scores = [jnp.ones((16, 8)), jnp.ones((5, 3))]

    def lowered_for_gpu():
        fn = jax.jit(lambda s: selection.select_masks(s, 0.5))  # a new function: traced anew
        return fn.trace(scores).lower(lowering_platforms=("cuda",)).as_text()

    with selection.accelerator_candidates(1):
        bisection = lowered_for_gpu()
    search = lowered_for_gpu()
    assert "tensor<2x1xi32>" in bisection and "tensor<2x15xi32>" not in bisection
    assert "tensor<2x15xi32>" in search and selection.ACCELERATOR_CANDIDATES == 15


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_selection_for_traced_counts_equals_the_sort_for_vmapped_keep_fractions(scope):
    """select_masks_for_counts, vmapped over runs of different keep fractions (as a group of
    runs selects): every run's masks equal the sort reference's, ties (many equal |s|), k = 1
    and layers below and above the radix size included; the straight-through gradient is the
    identity into |s|, as edge_popup_masks'."""
    rng = np.random.default_rng(3)
    shapes = [(300, 200), (70, 50, 3), (100,), (400, 100)]
    scores = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes[:3]]
    scores.append(jnp.asarray(np.round(rng.normal(size=shapes[3]) * 3).astype(np.float32)))
    ks = (0.01, 0.3, 0.5, 0.77, 1.0)
    counts = np.stack([selection.kept_counts([s.size for s in scores], k, scope) for k in ks])
    select = jax.jit(jax.vmap(lambda c: selection.select_masks_for_counts(
        [jnp.abs(s) for s in scores], c, scope)))
    got = select(jnp.asarray(counts))
    flat = jnp.concatenate([jnp.abs(s).reshape(-1) for s in scores])
    for i, k in enumerate(ks):
        if scope == "layer":
            want = [masking.topk_mask_reference(s, k) for s in scores]
        else:
            whole = masking.topk_mask_reference(flat, k)
            bounds = np.cumsum([0] + [s.size for s in scores])
            want = [whole[a:b].reshape(s.shape) for a, b, s in zip(bounds, bounds[1:], scores)]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g[i]), np.asarray(w))
    params = {f"l{i}": {"scores": s} for i, s in enumerate(scores)}
    weights = [jnp.asarray(rng.normal(size=s.shape).astype(np.float32)) for s in scores]
    objective = lambda masks: sum(jnp.sum(m * w) for m, w in zip(  # noqa: E731
        jax.tree.leaves(masks), weights))
    g1 = jax.grad(lambda p: objective(selection.edge_popup_masks_for_counts(
        p, jnp.asarray(counts[1]), scope)))(params)
    g2 = jax.grad(lambda p: objective(selection.edge_popup_masks(p, 0.3, scope)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
