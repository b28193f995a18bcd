"""Tests of edgepopup_jax.core.summary: per-layer kept counts and the printed table."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from edgepopup_jax.core.masking import kept_count
from edgepopup_jax.core.summary import LayerStats, format_table, layer_stats
from edgepopup_jax.models import get_model

CONV4_LAYERS = {  # name: kernel shape
    "conv0": (3, 3, 3, 64), "conv1": (3, 3, 64, 64), "conv2": (3, 3, 64, 128), "conv3": (3, 3, 128, 128),
    "fc0": (8192, 256), "fc1": (256, 256), "head": (256, 10),
}


def conv4_variables(**options):
    model = get_model("conv4", **options)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda l: jnp.asarray(rng.standard_normal(l.shape, np.float32)), abstract)


@pytest.fixture(scope="module")
def conv4_rows():
    return layer_stats(conv4_variables(), 0.3)


def test_layer_stats_conv4(conv4_rows):
    rows = conv4_rows
    assert [r.name for r in rows] == list(CONV4_LAYERS)  # model order
    for r in rows:
        assert isinstance(r, LayerStats)
        assert r.shape == CONV4_LAYERS[r.name]
        assert r.total == int(np.prod(r.shape))
        assert r.kept == kept_count(r.total, 0.3)
        assert r.mode == "edge_popup"
    assert sum(r.total for r in rows) == 2_425_024
    assert sum(r.kept for r in rows) == sum(kept_count(int(np.prod(s)), 0.3) for s in CONV4_LAYERS.values())


def test_layer_stats_dense_first_last():
    model = get_model("fc", dense_first=True, dense_last=True)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    rng = np.random.default_rng(2)
    v = jax.tree.map(lambda l: jnp.asarray(rng.standard_normal(l.shape, np.float32)), abstract)
    rows = layer_stats(v, 0.3)
    assert [r.name for r in rows] == ["fc0", "fc1", "head"]  # model order
    assert [r.mode for r in rows] == ["dense", "edge_popup", "dense"]
    assert [r.total for r in rows] == [784 * 300, 300 * 100, 100 * 10]
    assert [r.kept for r in rows] == [784 * 300, kept_count(30000, 0.3), 1000]


def test_layer_stats_supermask():
    v = conv4_variables(mask="supermask")
    rows = layer_stats(v, 0.3, mask="supermask")
    for r in rows:
        scores = v["params"][r.name]["scores"]
        assert r.kept == int(np.sum(np.asarray(scores) > 0))
        assert r.mode == "supermask"


def test_format_table(conv4_rows):
    rows = conv4_rows
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 1 + len(rows) + 1  # header, one per layer, total
    for r, line in zip(rows, lines[1:-1]):
        assert line.startswith(r.name)
        assert f"{r.total:,}" in line and f"{r.kept:,}" in line
    total_line = lines[-1]
    assert total_line.startswith("total")
    total, kept = sum(r.total for r in rows), sum(r.kept for r in rows)
    assert f"{total:,}" in total_line and f"{kept:,}" in total_line
    assert "2,425,024" in total_line
    assert f"{100 * kept / total:.2f}%" in total_line
