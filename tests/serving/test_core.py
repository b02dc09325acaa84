"""Unit tests of the router's pure logic (no Ray): split, input checks, join store, flips.

The same paths run for real over HTTP in tests/integration/test_serving.py.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from serving.core import (NPY_CONTENT_TYPE, BadRequest, Latencies, TrafficPlan, count_flips, fuse, is_npy,
                          merge_latency, parse_feedback, parse_feedback_batch, parse_inputs, parse_json_object,
                          parse_npy, sticky_unit)
from serving.metric_names import DEFINED, EXPORTED
from serving.refs import ModelRef
from serving.specs import ServingSpec

GENS = ["g0", "g1", "g2"]


def test_sticky_unit_is_stable_and_uniform():
    assert sticky_unit("user-1") == sticky_unit("user-1")
    u = np.array([sticky_unit(f"k{i}") for i in range(20000)])
    assert ((u >= 0) & (u < 1)).all()
    # Uniform: each decile holds 10% +- 1% (binomial sd at n=20000 is 0.2%).
    counts = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
    assert np.all(np.abs(counts - 0.1) < 0.01)


def test_split_follows_weights_and_is_sticky():
    plan = TrafficPlan.build("g0", {"g0": 0.75, "g1": 0.25}, [], GENS)
    picks = [plan.choose(f"user-{i}") for i in range(8000)]
    share = picks.count("g1") / len(picks)
    assert abs(share - 0.25) < 0.02
    assert "g2" not in picks  # weight 0 never serves
    assert [plan.choose(f"user-{i}") for i in range(100)] == picks[:100]


def test_raising_a_candidate_weight_keeps_its_users():
    """Candidates sit first on the unit interval, so users on g1 at 5% stay on g1 at 50%."""
    small = TrafficPlan.build("g0", {"g0": 0.95, "g1": 0.05}, [], GENS)
    big = TrafficPlan.build("g0", {"g0": 0.5, "g1": 0.5}, [], GENS)
    users = [f"u{i}" for i in range(5000)]
    on_small = {u for u in users if small.choose(u) == "g1"}
    assert on_small and all(big.choose(u) == "g1" for u in on_small)


@pytest.mark.parametrize("weights,shadows,prod,msg", [
    ({"g0": 0.5}, [], "g0", "sum to 1"),
    ({"g0": 1.0, "gx": 0.0}, [], "g0", "unknown generation 'gx'"),
    ({"g0": -0.5, "g1": 1.5}, [], "g0", "weights.g0"),
    ({"g0": float("nan")}, [], "g0", "weights.g0"),
    ({"g0": True}, [], "g0", "weights.g0"),
    ({"g0": 1.0}, ["g0"], "g0", "production"),
    ({"g0": 1.0}, ["nope"], "g0", "shadows: unknown"),
    ({"g0": 1.0}, [], "gz", "production: unknown"),
])
def test_bad_plans_name_the_problem(weights, shadows, prod, msg):
    with pytest.raises(BadRequest) as e:
        TrafficPlan.build(prod, weights, shadows, GENS)
    assert msg in str(e.value) and e.value.status == 400


def test_mirrors_include_production_for_candidate_traffic():
    plan = TrafficPlan.build("g0", {"g0": 0.5, "g1": 0.5}, ["g2"], GENS)
    assert plan.mirrors("g0") == ("g2",)
    assert plan.mirrors("g1") == ("g0", "g2")  # production is the flip reference
    assert plan.candidates == ["g1", "g2"]


def test_parse_inputs_accepts_good_rows_and_names_bad_ones():
    """Flat rows, as every client sent them before shapes: unchanged."""
    x = parse_inputs({"inputs": [[1, 2.5], [0, -1]]}, input_shape=(2,), max_rows=4)
    assert x.dtype == np.float32 and x.shape == (2, 2)
    assert parse_inputs({"inputs": [[1, 2]]}, 2, 4).shape == (1, 2)  # an int is the legacy input_dim
    want = "expected shape [N, 2] (rows of shape [2])"
    cases = [
        ({}, "missing key", 400), ({"inputs": []}, "non-empty", 400),
        ({"inputs": [[1, 2]] * 5}, "at most 4", 413), ({"inputs": [[1, 2, 3]]}, f"{want}, got [1, 3]", 400),
        ({"inputs": [[1, 2], [1]]}, "inputs[1] has 1 items, not 2", 400),
        ({"inputs": [["a", 1]]}, "numbers only; inputs[0][0] is str", 400),
        ({"inputs": [[True, 1]]}, "numbers only; inputs[0][0] is a boolean", 400),
        ({"inputs": [[1, None]]}, "numbers only; inputs[0][1] is null", 400),
        ({"inputs": [[float("nan"), 1]]}, "NaN", 400),
        ({"inputs": [[1e39, 1]]}, "float32", 400), ({"inputs": [[10 ** 400, 1]]}, "float32", 400),
        ({"inputs": [1, 2]}, f"{want}, got [2]", 400),
        ({"inputs": [[[1], [2]]]}, f"{want}, got [1, 2, 1]", 400), ({"inputs": "rows"}, "list of rows", 400),
    ]
    for obj, msg, status in cases:
        with pytest.raises(BadRequest) as e:
            parse_inputs(obj, input_shape=(2,), max_rows=4)
        assert msg in str(e.value) and e.value.status == status, (obj, str(e.value))


def _image(rows: int, value: float = 0.5) -> list:
    return [[[[value] * 8 for _ in range(8)]] for _ in range(rows)]


def test_parse_inputs_takes_nested_lists_of_the_input_shape():
    """Images (1, 8, 8): rows are nested lists of that shape; anything else is a 400 that
    names the expected and the received shape (and where a ragged list breaks)."""
    x = parse_inputs({"inputs": _image(3)}, (1, 8, 8), 4)
    assert x.dtype == np.float32 and x.shape == (3, 1, 8, 8) and (x == 0.5).all()
    want = "inputs: expected shape [N, 1, 8, 8] (rows of shape [1, 8, 8])"
    ragged = _image(2)
    ragged[1][0][5] = [0.0] * 7
    boolean = _image(2)
    boolean[1][0][7][3] = True
    cases = [
        ({"inputs": [[0.0] * 64] * 3}, f"{want}, got [3, 64]"),  # flat rows for an image model
        ({"inputs": [[[0.0] * 64]] * 3}, f"{want}, got [3, 1, 64]"),
        ({"inputs": [[[[0.0] * 8] * 8] * 2]}, f"{want}, got [1, 2, 8, 8]"),
        ({"inputs": [[[[[0.0]] * 8] * 8]]}, f"{want}, got [1, 1, 8, 8, 1]"),
        ({"inputs": ragged}, f"{want}, got lists of unequal lengths: inputs[1][0][5] has 7 items, not 8"),
        ({"inputs": boolean}, "inputs: rows must hold numbers only; inputs[1][0][7][3] is a boolean"),
        ({"inputs": [[[[float("inf")] * 8] * 8]]}, "NaN or infinite"),
    ]
    for obj, msg in cases:
        with pytest.raises(BadRequest) as e:
            parse_inputs(obj, (1, 8, 8), 4)
        assert msg in str(e.value) and e.value.status == 400, (msg, str(e.value))
    with pytest.raises(BadRequest) as e:
        parse_inputs({"inputs": _image(5)}, (1, 8, 8), 4)
    assert e.value.status == 413


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype.hasobject)
    return buf.getvalue()


def test_parse_npy_takes_any_float_or_integer_array_of_the_input_shape():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 1, 8, 8))
    for arr in (a.astype(np.float32), a, a.astype(">f8"), np.asfortranarray(a.astype(np.float16)),
                (a * 10).astype(np.int16), np.abs(a * 10).astype(np.uint8)):
        x = parse_npy(_npy(arr), (1, 8, 8), 4)
        assert x.dtype == np.float32 and x.shape == (3, 1, 8, 8) and x.flags.c_contiguous
        np.testing.assert_allclose(x, arr.astype(np.float32))
    assert parse_npy(_npy(np.ones((2, 40), np.float32)), 40, 4).shape == (2, 40)  # flat rows too
    # Format 2.0 (headers over 64 KiB) reads too.
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2, 3)})
    assert parse_npy(buf.getvalue() + bytes(24), (3,), 4).shape == (2, 3)


def test_parse_npy_refuses_wrong_shapes_dtypes_values_and_malformed_bodies():
    """Every refusal is a BadRequest (400, or 413 for too many rows) naming the problem;
    none reads data a header only claims (a header asking for terabytes costs nothing)."""
    want = "inputs: expected shape [N, 1, 8, 8] (rows of shape [1, 8, 8])"
    good = _npy(np.zeros((2, 1, 8, 8), np.float32))
    huge, empty = io.BytesIO(), io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, {"descr": "<f4", "fortran_order": False, "shape": (2, 1, 8, 8 * 10 ** 11)})
    np.lib.format.write_array_header_1_0(empty, {"descr": "<f4", "fortran_order": False, "shape": (2, 1, 8, 8)})
    v3 = bytearray(good)
    v3[6] = 3
    cases = [
        (_npy(np.zeros((3, 64), np.float32)), f"{want}, got [3, 64]", 400),
        (_npy(np.zeros((1, 8, 8), np.float32)), f"{want}, got [1, 8, 8]", 400),
        (_npy(np.zeros((2, 1, 8, 8, 1), np.float32)), f"{want}, got [2, 1, 8, 8, 1]", 400),
        (_npy(np.float32(1.0)), f"{want}, got []", 400),
        (_npy(np.zeros((0, 1, 8, 8), np.float32)), "no rows", 400),
        (_npy(np.zeros((5, 1, 8, 8), np.float32)), "5 rows, at most 4", 413),
        (_npy(np.full((1, 1, 8, 8), "a")), "npy dtype '<U1' is not a number type", 400),
        (_npy(np.zeros((1, 1, 8, 8), bool)), "npy dtype '|b1' is not a number type", 400),
        (_npy(np.zeros((1, 1, 8, 8), complex)), "is not a number type", 400),
        (_npy(np.zeros((1, 1, 8, 8), [("a", "f4")])), "is not a number type", 400),
        (_npy(np.full((1, 1, 8, 8), None, dtype=object)), "npy dtype '|O' is not a number type", 400),
        (_npy(np.full((1, 1, 8, 8), np.nan, np.float32)), "NaN or infinite", 400),
        (_npy(np.full((1, 1, 8, 8), 1e300)), "beyond float32", 400),
        (good[:-1], "malformed, 511 bytes of data where its header (shape [2, 1, 8, 8], dtype '<f4') needs 512", 400),
        (good + b"\0", "malformed, 513 bytes", 400),
        (good[:30], "npy body: malformed header", 400),
        (good[:8] + b"\xff" * 120, "npy body: malformed header", 400),
        (huge.getvalue(), f"{want}, got [2, 1, 8, 800000000000]", 400),
        (empty.getvalue(), "malformed, 0 bytes of data where its header", 400),
        (bytes(v3), "format version 3.0 is not supported", 400),
        (b"", "body is not an .npy array", 400),
        (b'{"inputs": [[1]]}', "body is not an .npy array", 400),
        (b"PK\x03\x04" + bytes(40), "body is not an .npy array", 400),  # an .npz is refused unread
    ]
    for body, msg, status in cases:
        with pytest.raises(BadRequest) as e:
            parse_npy(body, (1, 8, 8), 4)
        assert msg in str(e.value) and e.value.status == status, (msg, str(e.value))


def test_npy_content_type_is_recognised_with_parameters():
    assert is_npy(NPY_CONTENT_TYPE) and is_npy("Application/X-NPY; charset=binary")
    assert not is_npy(None) and not is_npy("application/json") and not is_npy("application/x-npz")


def test_parse_json_object_and_feedback():
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    for body in (b"nope", b"[1]", b"\xff", b"{" * 100000):
        with pytest.raises(BadRequest):
            parse_json_object(body)
    rid, labels = parse_feedback({"request_id": "r1", "labels": [1, 0]})
    assert rid == "r1" and labels == [1, 0]
    for obj in ({"labels": [1]}, {"request_id": "r", "labels": [-1]}, {"request_id": "r", "labels": [True]},
                {"request_id": "r", "labels": []}, {"request_id": "r", "labels": [2 ** 31]}, "x"):
        with pytest.raises(BadRequest):
            parse_feedback(obj)


def test_count_flips_by_hand():
    """labels 0 1 2 3 4; production 0 1 9 9 4 (right on 0,1,4); candidate 0 9 2 9 9
    (right on 0,2). Negative flips: right->wrong at rows 1 and 4 = 2; positive: row 2 = 1;
    production correct 3, candidate correct 2."""
    y = np.array([0, 1, 2, 3, 4])
    f = count_flips(y, np.array([0, 1, 9, 9, 4]), np.array([0, 9, 2, 9, 9]))
    assert (f.labelled, f.negative_flips, f.positive_flips, f.production_correct, f.candidate_correct) == (5, 2, 1, 3, 2)


def test_latency_windows_keep_the_recent_calls_per_generation_and_role():
    lat = Latencies(window=16)
    for ms in range(1, 101):  # the window keeps the last 16: 85..100
        lat.add("g1", "shadow", float(ms))
    snap = lat.snapshot()
    assert snap["g1"]["shadow"]["n"] == 16 and snap["g1"]["shadow"]["p50_ms"] == 92.5
    assert "primary" not in snap["g1"]


def test_merge_latency_sums_calls_and_takes_the_worst_quantile():
    """{n 10, p99 8} and {n 30, p99 12} -> {n 40, p99 12}; a replica without calls adds nothing."""
    a = {"n": 10, "p50_ms": 2.0, "p90_ms": 5.0, "p99_ms": 8.0}
    b = {"n": 30, "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 12.0}
    assert merge_latency([a, b, None, {"n": 0, "p50_ms": None}]) == {"n": 40, "p50_ms": 3.0, "p90_ms": 5.0,
                                                                      "p99_ms": 12.0}
    assert merge_latency([None]) == {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None}


def test_feedback_batch_is_checked_whole_and_names_the_bad_item():
    items = parse_feedback_batch({"items": [{"request_id": "a", "labels": [1]},
                                            {"request_id": "b", "labels": [0, 2]}]}, 10)
    assert items == [("a", [1]), ("b", [0, 2])]
    with pytest.raises(BadRequest, match=r"items\[1\]\.labels"):
        parse_feedback_batch({"items": [{"request_id": "a", "labels": [1]}, {"request_id": "b", "labels": [-1]}]}, 10)
    with pytest.raises(BadRequest, match=r"items\[0\]"):
        parse_feedback_batch({"items": ["a"]}, 10)
    with pytest.raises(BadRequest) as e:
        parse_feedback_batch({"items": [{"request_id": "a", "labels": [1]}] * 3}, 2)
    assert e.value.status == 413
    for obj in ({}, {"items": []}, {"items": "x"}):
        with pytest.raises(BadRequest, match="items"):
            parse_feedback_batch(obj, 10)


def test_fuse_is_a_weighted_mix():
    old, new = np.array([[0.8, 0.2]]), np.array([[0.2, 0.8]])
    assert np.allclose(fuse(old, new, 0.25), [[0.65, 0.35]])


def test_fuse_pads_the_narrower_probabilities_with_zero_columns():
    """A candidate that adds a class: production gives it probability 0 (and the other
    way round); the fused rows keep summing to 1."""
    old, new = np.array([[0.6, 0.4]]), np.array([[0.2, 0.2, 0.6]])
    want = [[0.4, 0.3, 0.3]]
    assert np.allclose(fuse(old, new, 0.5), want)
    assert np.allclose(fuse(new, old, 0.5), want)
    wide = fuse(np.full((4, 10), 0.1), np.full((4, 12), 1 / 12), 0.25)
    assert wide.shape == (4, 12) and np.allclose(wide.sum(1), 1.0)
    assert np.allclose(wide[:, 10:], 0.25 / 12)


def test_model_ref_rejects_bad_names_and_hashes():
    ok = ModelRef("g1", "/x/model.pt", "a" * 64)
    assert ok.app_name == "graceful-gen-g1" and ok.factory is None
    with pytest.raises(ValueError):
        ModelRef("../g1", "/x", "a" * 64)
    with pytest.raises(ValueError):
        ModelRef("g1", "/x", "abc")


def test_model_ref_carries_the_expected_factory_and_pickles():
    import pickle

    ref = ModelRef("g1", "/x/model.pt", "a" * 64, "mypkg.models:build")
    assert pickle.loads(pickle.dumps(ref)) == ref and ref.factory == "mypkg.models:build"
    assert ModelRef("g1", "/x/model.pt", "a" * 64, factory=None) == ModelRef("g1", "/x/model.pt", "a" * 64)


def test_metric_names_are_prefixed_and_documented():
    assert all(n.startswith("graceful_") for n in DEFINED)
    assert "ray_graceful_requests_total" in EXPORTED and "ray_graceful_latency_ms_bucket" in EXPORTED
    assert "ray_graceful_traffic_weight" in EXPORTED
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    missing = [n for n in EXPORTED if n not in doc]
    assert not missing, missing


def test_serving_spec_defaults_are_safe():
    spec = ServingSpec()
    assert spec.host == "127.0.0.1" and spec.admin_token is None
    assert json.loads(spec.model_dump_json())["shadow_batch_wait_s"] == 0.005


def test_demo_yaml_documents_every_serving_key():
    import yaml
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "config/demo.yaml").read_text()
    section = text[text.index("\nserving:"):text.index("\nrollout:")]
    documented = {line.strip().lstrip("# ").split(":")[0] for line in section.splitlines()[2:] if ":" in line}
    assert set(ServingSpec.model_fields) <= documented, set(ServingSpec.model_fields) - documented
    assert yaml.safe_load(text)["serving"]["host"] == "127.0.0.1"


def test_admin_token_comes_from_the_config_then_its_env_variable(monkeypatch):
    monkeypatch.delenv("GRACEFUL_ADMIN_TOKEN", raising=False)
    assert ServingSpec().resolved_admin_token() is None  # admin off
    monkeypatch.setenv("GRACEFUL_ADMIN_TOKEN", "from-the-env-1")
    assert ServingSpec().resolved_admin_token() == "from-the-env-1"
    assert ServingSpec(admin_token="from-the-file-1").resolved_admin_token() == "from-the-file-1"
    monkeypatch.setenv("GRACEFUL_ADMIN_TOKEN", "")
    assert ServingSpec().resolved_admin_token() is None
