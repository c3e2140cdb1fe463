"""Finalists re-timed together: one worker, interleaved rounds, per-round ratios (here and on a board over a
real loopback sshd)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepipe.errors import BenchmarkError
from edgepipe.harness import BenchSettings
from edgepipe.harness.rounds import Retiming, _reply, retime_here
from edgepipe.types import Artifact


def _onnx(path, width: int, depth: int):
    """A chain of ``depth`` MatMuls of ``width`` x ``width`` (seeded): its cost grows with width² x depth."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return Artifact("onnxruntime", "fp32", path, [path])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("rounds")
    (d / "fast").mkdir()
    (d / "slow").mkdir()
    # the same file name in both: the board copies each artifact into its own directory
    return _onnx(d / "fast" / "model.onnx", 16, 2), _onnx(d / "slow" / "model.onnx", 512, 24)


SETTINGS = BenchSettings(threads=1, warmup=3, iterations=60)


def _check(r: Retiming) -> None:
    assert r.ids == ["fast", "slow"] and r.rounds == 5 and r.iterations == 20  # 60 // 5 = 12, at least 20
    assert len(r.p50_ms) == 2 and all(len(row) == 5 and all(v > 0 for v in row) for row in r.p50_ms)
    score, spread = r.score(), r.spread()
    # 24 MatMuls of 512x512 against 2 of 16x16: far more than any load can hide, in every round
    assert score["fast"] == pytest.approx(1.0) and score["slow"] > 5, r.p50_ms
    assert spread["slow"][0] > 5 and spread["slow"][0] <= score["slow"] <= spread["slow"][1]
    d = json.loads(json.dumps(r.to_dict()))
    assert Retiming.from_dict(d) == Retiming(r.ids, [[round(v, 6) for v in row] for row in r.p50_ms], 5, 20, r.where)


@pytest.mark.timing
def test_finalists_are_timed_together_here_round_by_round(pair):
    r = retime_here(["fast", "slow"], list(pair), SETTINGS, rounds=5)
    _check(r)


@pytest.mark.timing
def test_finalists_are_timed_together_on_a_board(pair, loopback_board):
    from edgepipe.harness.remote import retime_remote

    r = retime_remote(["fast", "slow"], list(pair), loopback_board, SETTINGS, rounds=5)
    _check(r)
    assert r.where.startswith("board root@127.0.0.1")


@pytest.mark.parametrize("reply, why", [
    ('{"ok": true, "p50_ms": [[1.0, 1.0, 1.0]]}', "not 2 artifacts x 3 rounds"),
    ('{"ok": true, "p50_ms": [[1.0, 1.0, 1.0], [1.0, NaN, 1.0]]}', "not 2 artifacts x 3 rounds"),
    ('{"ok": true, "p50_ms": [[1.0, 1.0, 1.0], [1.0, -2, 1.0]]}', "not 2 artifacts x 3 rounds"),
    ('{"ok": true, "p50_ms": [[1.0, 1.0, 1.0], [1.0, "1", 1.0]]}', "not 2 artifacts x 3 rounds"),
    ('{"ok": false, "error": "RuntimeError: no"}', "failed in the worker: RuntimeError: no"),
    ("nothing", "not 2 artifacts x 3 rounds"),
])
def test_a_reply_that_is_not_the_rounds_is_refused(reply, why):
    with pytest.raises(BenchmarkError, match=why):
        _reply("noise\n" + reply + "\n", "a, b", 2, 3)


def test_a_broken_finalist_is_a_benchmark_error(pair, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(BenchmarkError, match="failed in the worker"):
        retime_here(["fast", "bad"], [pair[0], Artifact("onnxruntime", "fp32", bad, [bad])], SETTINGS, rounds=3)
