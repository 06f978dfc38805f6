"""ARQ mixed-precision search (qverify.mixed_precision) and the Gaussian-noise training it fine-tunes with
(``train.noise_sigma`` and ``train(init=...)`` in qverify.train.trainer; tested here beside their one user)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from qverify.mixed_precision import (
    SEARCH_SEED_OFFSET,
    ARQEvaluator,
    Candidate,
    DDPGSettings,
    Layer,
    MixedPrecisionError,
    Space,
    Trace,
    action_to_bits,
    ddpg_search,
    enforce_budget,
    exhaustive_search,
    greedy_search,
    layers_of,
    parse_budget,
    read_trace,
    run_search,
    uniform_baseline,
    with_uniform_baseline,
)
from qverify.train.layers import ModelConfig, QuantConfig, build_model
from qverify.train.trainer import ConfigError, load_config, noise_seed, noisy_inputs, prepare_data, train

TINY = ["data.train='digits'", "data.holdout=300", "model.hidden=[16]", "progress=false", "train.batch_size=64",
        "train.lr=0.01", "train.eps=0.0", "train.method='qat'", "train.epochs=2"]


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ noise training
def test_noisy_inputs_are_the_smoothing_quantizer_of_the_noisy_real_input() -> None:
    """The training noise maps to the grid exactly as qverify.smooth's input quantizer of the exported network,
    and its statistics are those of N(0, sigma^2) rounded to the grid."""
    from qverify.smooth import InputQuantizer

    cfg = load_config(None, [*TINY, "train.epochs=0"])
    net = train(cfg).network()
    model = build_model(cfg.model, cfg.quant, (1, 8, 8), 16, 10)
    s_in = float(model.input_scale)
    assert net.input_scale == model.input_scale and net.input_rounding is None
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.integers(0, 17, size=(300, 64)))
    sigma = 0.1
    got = noisy_inputs(x, sigma, s_in, 16, torch.Generator().manual_seed(5))
    eps = torch.randn((300, 64), generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    q = InputQuantizer.of(net)
    want = np.stack([q(x[i].numpy().astype(np.float64), None, eps[i:i + 1] * sigma)[0] for i in range(300)])
    assert np.array_equal(got.numpy(), want)
    # statistics away from the clamp: pixel 8 of 0..16, sigma 1 pixel-unit (1/32): mean 0, variance 1 + 1/12
    c = torch.full((200_000, 1), 8, dtype=torch.int64)
    d = (noisy_inputs(c, s_in * 1.0, s_in, 16, torch.Generator().manual_seed(1)) - 8).double().numpy().ravel()
    assert abs(d.mean()) < 4 * np.sqrt(1.09 / len(d))
    assert abs(d.var() - (1 + 1 / 12)) < 0.02
    assert np.all(d == np.round(d))
    assert noise_seed(0, 1, 2) != noise_seed(0, 2, 1)


def test_noise_training_is_seeded_and_sigma_zero_is_the_old_training(tmp_path, monkeypatch) -> None:
    import qverify.train.trainer as trainer

    def no_noise(*_a, **_k):  # noqa: ANN202 - sigma 0 must not reach the noise at all (the old code path)
        raise AssertionError("noise drawn with train.noise_sigma = 0")

    with monkeypatch.context() as m:
        m.setattr(trainer, "noisy_inputs", no_noise)
        base = _state(train(load_config(None, TINY)).model)
    zero = _state(train(load_config(None, [*TINY, "train.noise_sigma=0.0"])).model)
    assert all(np.array_equal(base[k], zero[k]) for k in base)
    a = _state(train(load_config(None, [*TINY, "train.noise_sigma=0.1"])).model)
    b = _state(train(load_config(None, [*TINY, "train.noise_sigma=0.1"])).model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], base[k]) for k in a)
    # float training (float-ibp with eps 0) takes it too; an interrupted noisy run resumes to the same model
    common = [*TINY, "train.method='float-ibp'", "train.noise_sigma=0.1", "train.epochs=3"]
    full = _state(train(load_config(None, [*common, f"out_dir='{tmp_path / 'a'}'"])).model)
    train(load_config(None, [*common, f"out_dir='{tmp_path / 'b'}'"]), stop_after_epoch=0)
    res = _state(train(load_config(None, [*common, f"out_dir='{tmp_path / 'b'}'"]), resume=True).model)
    assert all(np.array_equal(full[k], res[k]) for k in full)


@pytest.mark.parametrize("extra, message", [
    (["train.method='qaibp'", "train.eps=1.0"], "train.noise_sigma"),
    (["train.method='float-ibp'", "train.eps=1.0"], "train.noise_sigma"),
    (["train.noise_sigma=-0.5"], "train.noise_sigma must be >= 0"),
])
def test_noise_training_settings_are_checked(extra, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, "train.noise_sigma=0.25", *extra])


def test_train_from_init_starts_from_the_given_weights() -> None:
    src = train(load_config(None, TINY))
    cfg = load_config(None, [*TINY, "train.epochs=0", "quant.weight_bits=[4, 2]", "quant.act_bits=[2]"])
    res = train(cfg, init=src.model.state_dict())
    a, b = _state(src.model), _state(res.model)
    for k in a:
        if k.endswith("weight") or k.endswith("bias"):
            assert np.array_equal(a[k], b[k]), k
    assert res.model.quantized and [blk.weight_bits for blk in res.model.affine_blocks] == [4, 2]


# ------------------------------------------------------------------------------------------------ cost and budget
def test_bitops_of_a_small_cnn_by_hand() -> None:
    mc = ModelConfig(arch="cnn", hidden=(10,), conv=((4, 3, 2, 1), (8, 3, 1, 0)))
    model = build_model(mc, QuantConfig(), (1, 8, 8), 255, 3)
    lays = layers_of(model)
    # conv 1->4, k3 s2 p1 on 8x8: 4x4 out; conv 4->8 k3 s1 on 4x4: 2x2 out; dense 32->10; dense 10->3
    assert [lay.macs for lay in lays] == [4 * 16 * 1 * 9, 8 * 4 * 4 * 9, 32 * 10, 10 * 3]
    assert [(lay.kind, lay.c_in, lay.c_out, lay.kernel, lay.stride, lay.in_hw) for lay in lays] == [
        ("conv", 1, 4, 3, 2, 64), ("conv", 4, 8, 3, 1, 16), ("dense", 32, 10, 1, 1, 1), ("dense", 10, 3, 1, 1, 1)]
    assert [lay.params for lay in lays] == [4 * 9 + 4, 8 * 4 * 9 + 8, 320 + 10, 30 + 3]
    sp = Space(tuple(lays), 8, (2, 4, 8))
    c = Candidate((8, 4, 2, 4), (4, 2, 8))
    # the input of layer 0 is the 8-bit pixel grid; layer l >= 1 is multiplied by act_bits[l - 1]
    assert sp.bitops(c) == 576 * 8 * 8 + 1152 * 4 * 4 + 320 * 2 * 2 + 30 * 4 * 8 == 57536
    assert parse_budget("w4a4", sp) == 576 * 4 * 8 + (1152 + 320 + 30) * 4 * 4
    assert parse_budget("1.5e5", sp) == 150_000
    assert sp.flat(c) == (8, 4, 4, 2, 2, 4, 8) and sp.from_flat(sp.flat(c)) == c


def test_bitops_of_a_small_resnet_by_hand() -> None:
    mc = ModelConfig(arch="resnet", conv=((4, 3, 1, 1),), blocks=1, hidden=(16,))
    lays = layers_of(build_model(mc, QuantConfig(), (1, 8, 8), 255, 10))
    # stem conv 1->4 (8x8 out), conv_a and conv_b 4->4 (8x8), dense 256->16, 16->10
    assert [lay.macs for lay in lays] == [4 * 64 * 9, 4 * 64 * 4 * 9, 4 * 64 * 4 * 9, 256 * 16, 16 * 10]
    sp = Space(tuple(lays), 8, (2, 4, 8))
    assert parse_budget("w4a8", sp) == 2304 * 4 * 8 + (9216 * 2 + 4096 + 160) * 4 * 8


def _mlp_space() -> Space:
    lays = (Layer(0, "dense", 20, 10, 1, 1, 210, 1, 1), Layer(1, "dense", 10, 8, 1, 1, 88, 1, 1),
            Layer(2, "dense", 8, 3, 1, 1, 27, 1, 1))
    return Space(lays, 8, (2, 4, 8))


def test_budget_is_enforced_from_the_last_layer_by_hand() -> None:
    sp = _mlp_space()  # MACs 200, 80, 24; decisions w0, w1, a1, w2, a2
    top = sp.uniform(8, 8)
    assert sp.bitops(top) == 19456
    # one sweep a2, w2, a1 (8 -> 4): 18688, 18304, 15744 <= 15744: stop
    assert enforce_budget(sp, top, 15744) == Candidate((8, 8, 4), (4, 4))
    # a full sweep to all 4 (8064 > 7000), then a2, w2, a1, w1 to 2: 7872, 7776, 7136, 6816 <= 7000
    assert enforce_budget(sp, top, 7000) == Candidate((4, 2, 2), (2, 2))
    assert enforce_budget(sp, top, 8064) == sp.uniform(4, 4)
    assert enforce_budget(sp, sp.uniform(2, 2), 7000) == sp.uniform(2, 2)  # already within: unchanged
    assert [action_to_bits(a, (2, 4, 8)) for a in (0.0, 0.33, 0.34, 0.66, 0.67, 1.0)] == [2, 2, 4, 4, 8, 8]


def test_bad_bits_and_budgets_are_errors_naming_the_setting() -> None:
    sp = _mlp_space()
    with pytest.raises(MixedPrecisionError, match="--bits: unknown bit width"):
        Space(sp.layers, 8, (1, 4))
    with pytest.raises(MixedPrecisionError, match="--bits: unknown bit width"):
        Space(sp.layers, 8, (4, 32))
    floor = sp.bitops(sp.uniform(2, 2))
    with pytest.raises(MixedPrecisionError, match="--budget .* below the cost of every layer at the smallest"):
        parse_budget(str(floor - 1), sp)
    with pytest.raises(MixedPrecisionError, match="--budget"):
        parse_budget("w1a1", sp)
    with pytest.raises(MixedPrecisionError, match="--budget 'fast'"):
        parse_budget("fast", sp)
    assert parse_budget(str(floor), sp) == floor


# ------------------------------------------------------------------------------------------------ searches
_SENS = (4.0, 1.0, 3.0, 0.5, 2.0)


def _reward(sp: Space):
    """A deterministic synthetic reward: quantization noise ``sum_i s_i 2^-b_i`` of each decision, negated."""
    def r(c: Candidate) -> float:
        return -4 * sum(s * 2.0 ** -b for s, b in zip(_SENS, sp.flat(c), strict=True))
    return r


def test_exhaustive_ddpg_and_greedy_on_a_tiny_space() -> None:
    sp = _mlp_space()
    budget = parse_budget("w4a4", sp)
    fn = _reward(sp)
    truth = max((sp.from_flat(f) for f in itertools.product((2, 4, 8), repeat=5)
                 if sp.bitops(sp.from_flat(f)) <= budget), key=fn)
    ex = exhaustive_search(sp, budget, fn)
    assert ex.best["key"] == truth.key and ex.best["bitops"] <= budget
    assert truth != sp.uniform(4, 4) and fn(truth) > fn(sp.uniform(4, 4))  # mixed precision pays here
    torch.set_num_threads(1)
    st = DDPGSettings(episodes=150, warmup=20, decay=0.99)
    d = ddpg_search(sp, budget, fn, st, seed=0)
    assert d.best["key"] == truth.key
    found = [e["episode"] for e in d.trace.episodes if e["key"] == truth.key]
    assert max(found) >= st.warmup  # reached by the trained agent, not only by the random warm-up
    assert all(e["bitops"] <= budget for e in d.trace.entries.values())
    again = ddpg_search(sp, budget, fn, DDPGSettings(episodes=40, warmup=20, decay=0.99), seed=0)
    assert again.trace.episodes == d.trace.episodes[:40]  # seeded: the same episodes
    g = greedy_search(sp, budget, fn)
    assert g.best["bitops"] <= budget and g.best["reward"] <= ex.best["reward"]
    assert g.trace.episodes[0]["key"] == sp.uniform(8, 8).key


def test_the_uniform_baseline_is_chosen_only_when_it_scores_higher() -> None:
    """A short search that misses the uniform candidate gets it from the baseline where it is strictly better;
    a tie keeps the searched candidate; the baseline is the widest uniform width within the budget."""
    sp = _mlp_space()
    w4 = parse_budget("w4a4", sp)
    assert uniform_baseline(sp, w4) == sp.uniform(4, 4)
    assert uniform_baseline(sp, w4 - 1) == sp.uniform(2, 2)
    assert uniform_baseline(sp, sp.bitops(sp.uniform(8, 8))) == sp.uniform(8, 8)
    assert uniform_baseline(sp, sp.bitops(sp.uniform(2, 2)) - 1) is None
    u = sp.uniform(4, 4)

    def peaked(c: Candidate) -> float:  # the uniform W4A4 is the unique optimum
        return 1.0 if c == u else -sum(abs(b - 4) for b in sp.flat(c))

    torch.set_num_threads(1)
    res = ddpg_search(sp, w4, peaked, DDPGSettings(episodes=2, warmup=2), seed=0)
    assert res.best["key"] != u.key  # the two random episodes miss it
    seen = len(res.trace.entries)
    got, base = with_uniform_baseline(res)
    assert base is not None and base["key"] == u.key and base["source"] == "uniform baseline"
    assert got.best["key"] == u.key and got.best["reward"] == 1.0 and len(got.trace.entries) == seen + 1
    flat = ddpg_search(sp, w4, lambda c: 0.0, DDPGSettings(episodes=2, warmup=2), seed=0)
    kept, base = with_uniform_baseline(flat)
    assert base is not None and kept.best["key"] == flat.best["key"]


class _Stop(Exception):
    pass


def test_an_interrupted_search_resumes_from_its_trace(tmp_path) -> None:
    """A DDPG search killed after some evaluations, re-run on its trace file, evaluates only what is missing and
    ends where the uninterrupted search ends."""
    sp = _mlp_space()
    budget = parse_budget("w4a4", sp)
    fn = _reward(sp)
    st = DDPGSettings(episodes=40, warmup=10)
    full = ddpg_search(sp, budget, Trace(sp, fn, tmp_path / "full.json", {"k": 1}), st, seed=3)
    calls: list[str] = []

    def dying(c: Candidate) -> float:
        if len(calls) == 6:
            raise _Stop
        calls.append(c.key)
        return fn(c)

    with pytest.raises(_Stop):
        ddpg_search(sp, budget, Trace(sp, dying, tmp_path / "t.json", {"k": 1}), st, seed=3)
    assert len(json.loads((tmp_path / "t.json").read_text())["candidates"]) == 6
    later: list[str] = []

    def counting(c: Candidate) -> float:
        later.append(c.key)
        return fn(c)

    res = ddpg_search(sp, budget, Trace(sp, counting, tmp_path / "t.json", {"k": 1}), st, seed=3)
    assert not set(later) & set(calls) and len(later) + 6 == len(full.trace.entries)
    assert res.best["key"] == full.best["key"] and res.trace.episodes == full.trace.episodes
    assert res.trace.order == full.trace.order
    with pytest.raises(MixedPrecisionError, match="trace of another search"):
        Trace(sp, fn, tmp_path / "t.json", {"k": 2})


def test_exhaustive_refuses_a_large_space() -> None:
    sp = _mlp_space()
    with pytest.raises(MixedPrecisionError, match="exceed"):
        exhaustive_search(sp, 10**9, _reward(sp), max_candidates=100)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A Gaussian-noise trained tiny MLP checkpoint (digits) and 12 held-out samples."""
    d = tmp_path_factory.mktemp("arq")
    cfg = load_config(None, [*TINY, "train.noise_sigma=0.1", f"out_dir='{d / 'ckpt'}'"])
    train(cfg)
    _, ev = prepare_data(cfg)
    np.savez(d / "data.npz", images=ev.images[:12, 0], labels=ev.labels[:12])
    return d


def test_cli_search_writes_bits_model_certificate_trace_and_resumes(tiny_run, capsys) -> None:
    from qverify.cli import main
    from qverify.io import load_model
    from qverify.smooth import read_smooth_results

    out = tiny_run / "search"
    args = ["mixed-precision", str(tiny_run / "ckpt"), str(tiny_run / "data.npz"), "--sigma", "0.1", "--bits", "4",
            "8", "--budget", "w4a8", "--search", "greedy", "--n0", "20", "--search-n", "100", "--n", "200",
            "--images", "4", "--finetune-epochs", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    cap = capsys.readouterr().out
    assert "chosen: weight bits" in cap and "certificate (n 200, 12 samples)" in cap
    bits = json.loads((out / "bits.json").read_text())
    tr = read_trace(out)
    assert bits["bitops"] <= bits["budget"] == tr["identity"]["budget"]
    assert tr["chosen"] == bits["key"] and {e["key"] for e in tr["candidates"]} >= {bits["key"]}
    for e in tr["candidates"]:
        assert {"weight_bits", "act_bits", "bitops", "reward", "acr", "seconds"} <= set(e)
        assert e["reward"] == e["acr"]
    net = load_model(out / "model.qnn")
    want = ",".join(f"w{w}a{a}" for w, a in zip(bits["weight_bits"], [*bits["act_bits"], 8], strict=True))
    assert net.metadata["layer_bits"] == want and net.metadata["mixed_precision"] == bits["key"]
    cert = read_smooth_results(out / "certificate.jsonl")
    assert len(cert.records) == 12 and cert.header["n"] == 200
    # the certificate's noise is independent of the noise that chose the model (another seed)
    searched = read_smooth_results(out / "candidates" / f"{bits['key']}.jsonl")
    assert cert.header["seed"] == 0 and searched.header["seed"] == SEARCH_SEED_OFFSET
    # the chosen widths give the same integer network again (what a resumed search relies on)
    d = np.load(tiny_run / "data.npz")
    again = ARQEvaluator(tiny_run / "ckpt", d["images"], d["labels"], 0.1, allowed=(4, 8), finetune_epochs=1
                         ).network(Candidate(tuple(bits["weight_bits"]), tuple(bits["act_bits"])))
    for la, lb in zip(net.layers, again.layers, strict=True):
        va, vb = vars(la), vars(lb)
        assert type(la) is type(lb) and va.keys() == vb.keys()
        assert all(np.array_equal(va[k], vb[k]) if isinstance(va[k], np.ndarray) else va[k] == vb[k] for k in va)
    # resuming: every evaluation comes from the trace, and the same model comes out
    before = [(e["key"], e["seconds"]) for e in tr["candidates"]]
    res = json.loads((out / "result.json").read_text())
    assert main(args) == 0
    res2 = json.loads((out / "result.json").read_text())
    assert res2["cache_hits"] == res2["calls"] == res["calls"]
    assert [(e["key"], e["seconds"]) for e in read_trace(out)["candidates"]] == before
    assert load_model(out / "model.qnn").metadata["mixed_precision"] == bits["key"]
    capsys.readouterr()
    # another search into the same directory is refused by name; bad widths and budgets are errors
    assert main([*args[:-2], "--reward", "accuracy", "--out", str(out)]) == 3
    assert "trace of another search" in capsys.readouterr().err
    assert main([*args[:-2], "--bits", "1", "4", "--out", str(tiny_run / "x")]) == 3
    assert "--bits: unknown bit width" in capsys.readouterr().err
    assert main([*args[:-2], "--budget", "10", "--out", str(tiny_run / "x")]) == 3
    assert "--budget '10'" in capsys.readouterr().err


def test_ptq_ddpg_search_with_the_accuracy_reward(tiny_run) -> None:
    torch.set_num_threads(1)
    d = np.load(tiny_run / "data.npz")
    res = run_search(tiny_run / "ckpt", d["images"], d["labels"], 0.1, tiny_run / "ptq", allowed=(2, 4, 8),
                     budget="w4a4", search="ddpg", episodes=4, reward="accuracy", n0=10, search_n=50, n=50,
                     search_images=4, final_ids=[0, 1], finetune_epochs=0)
    tr = read_trace(tiny_run / "ptq")
    assert len(tr["episodes"]) == 4 and all(e["reward"] == e["accuracy"] for e in tr["candidates"])
    assert res["chosen"]["bitops"] <= res["chosen"]["budget"]
    assert res["certificate"]["summary"]["n"] == 2


def test_report_shows_the_search_points_with_the_chosen_one(tiny_run) -> None:
    from qverify.report import render_report

    out = tiny_run / "search"
    if not (out / "certificate.jsonl").exists():  # the CLI test above writes it; alone, run a small search here
        d = np.load(tiny_run / "data.npz")
        run_search(tiny_run / "ckpt", d["images"], d["labels"], 0.1, out, allowed=(4, 8), budget="w4a8",
                   search="greedy", n0=20, search_n=100, n=200, search_images=4, finetune_epochs=1)
    tr = read_trace(out)
    paths = render_report([str(out)], tiny_run / "report")
    page = paths["html"].read_text()
    text = paths["markdown"].read_text()
    summ = json.loads(paths["summary"].read_text())["smoothing"][0]
    assert "Mixed-precision search (S1)" in page and 'id="plot-search-S1"' in page
    assert page.count("<td>chosen</td>") == 1 and f"<td>{tr['chosen']}</td>" in page
    assert "### Mixed-precision search (S1)" in text and "| chosen |" in text
    pts = summ["mixed_precision"]["points"]
    assert {p["key"] for p in pts} == {e["key"] for e in tr["candidates"]}
    assert summ["mixed_precision"]["chosen"] == tr["chosen"]
    assert summ["summary"]["n"] == 12  # the chosen model's certificate is the run's row
    # the trace file itself is accepted too; a search without its certificate is refused by name
    assert "Mixed-precision search" in render_report([str(out / "trace.json")], tiny_run / "r2")["html"].read_text()
    (tiny_run / "unfinished").mkdir()
    (tiny_run / "unfinished" / "trace.json").write_text((out / "trace.json").read_text())
    with pytest.raises(ValueError, match="has not finished"):
        render_report([str(tiny_run / "unfinished")], tiny_run / "r3")
