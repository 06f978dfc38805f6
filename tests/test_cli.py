import json

import numpy as np
import pytest

from qverify.cli import main
from qverify.io import load_model, save_model
from tests.fixtures import MNIST1000, P1_6, tiny_fixed_point_mlp

needs_shared = pytest.mark.skipif(not P1_6.exists(), reason="../shared anchors not present")


@needs_shared
def test_convert_info_run(tmp_path, capsys):
    dst = tmp_path / "p16.qnn"
    assert main(["convert", str(P1_6), "--format", "qvip-h5", "--bits", "6", "--input-bits", "8", "-o", str(dst)]) == 0
    assert load_model(dst).num_outputs == 32
    assert main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "Requantize" in out and "/2^9 half_up" in out and "parameters: 52320" in out
    assert main(["run", str(dst), str(MNIST1000), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == pytest.approx(0.969) and len(res["predictions"]) == 1000
    labels = np.load(MNIST1000)["labels"]
    wrong = [i for i in range(400) if res["predictions"][i] != labels[i]]
    assert wrong == [18, 149, 217, 241, 247, 259, 321, 340, 381]


def test_info_json_and_help(tmp_path, capsys):
    p = tmp_path / "m.qnn"
    save_model(tiny_fixed_point_mlp(), p)
    assert main(["info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 12 and len(info["layers"]) == 4
    for cmd in ["convert", "info", "run", "property", "verify", "radius"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_info_prints_the_graph(tmp_path, capsys):
    """``info`` on a graph: each node's op and parameters, which values it reads, where branches join and fork."""
    from tests.fixtures import random_graph_network

    net = random_graph_network(np.random.default_rng(3), ["residual"], n_blocks=1)
    p = tmp_path / "g.qnn"
    save_model(net, p)
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "joins #" in out and "read by #" in out and "Add" in out and "3x3 stride" in out
    assert main(["info", str(p), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    add = next(r for r in rows if r["kind"] == "Add")
    assert len(add["reads"]) == 2


def test_bad_model_is_exit_3_with_message(tmp_path, capsys):
    bad = tmp_path / "broken.qnn"
    bad.write_text("nope")
    assert main(["info", str(bad)]) == 3
    assert "broken.qnn" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.onnx")]) == 3
    (tmp_path / "model.xyz").write_text("?")
    assert main(["info", str(tmp_path / "model.xyz")]) == 3
    assert "unknown model format" in capsys.readouterr().err


def test_bad_data_and_ids(tmp_path, capsys):
    p = tmp_path / "m.qnn"
    save_model(tiny_fixed_point_mlp(), p)
    d = tmp_path / "d.npz"
    np.savez(d, images=np.array([[1, 2], [3, 0]]), labels=np.array([0, 1]))
    assert main(["run", str(p), str(d), "--ids", "0:2"]) == 0
    assert main(["run", str(p), str(d), "--ids", "5"]) == 3
    assert "outside" in capsys.readouterr().err
    np.savez(tmp_path / "e.npz", x=np.zeros(3))
    assert main(["run", str(p), str(tmp_path / "e.npz")]) == 3
    assert "expected arrays 'images' and 'labels'" in capsys.readouterr().err


@needs_shared
def test_property_command_round_trips_with_model(tmp_path):
    from qverify.io.h5 import load_qvip_h5
    from qverify.io.vnnlib import parse_vnnlib
    from qverify.property import pixels_to_grid, robustness_property

    out = tmp_path / "props"
    assert main(["property", str(MNIST1000), "--model", str(P1_6), "--ids", "300:302", "--radius", "4",
                 "-o", str(out)]) == 0
    net = load_qvip_h5(P1_6)
    d = np.load(MNIST1000)
    p = parse_vnnlib(out / "prop_300_r4.vnnlib", net)
    want = robustness_property(net, pixels_to_grid(net, d["images"][300:301])[0], int(d["labels"][300]), radius=4)
    assert np.array_equal(p.lo, want.lo) and np.array_equal(p.hi, want.hi)
    y = np.random.default_rng(0).integers(-32, 32, size=(2000, 32))
    y[:, 5] = y[:, 4]  # ties with the label's output (label 4): the first-max rule decides
    assert np.array_equal(p.is_violated(y), want.is_violated(y))


def test_property_command_without_model_uses_vnncomp_ties(tmp_path):
    d = tmp_path / "d.npz"
    np.savez(d, images=np.zeros((2, 4, 4), np.uint8), labels=np.array([3, 1]))
    assert main(["property", str(d), "--radius", "1", "-o", str(tmp_path / "p")]) == 0
    text = (tmp_path / "p" / "prop_0_r1.vnnlib").read_text()
    assert "(>= Y_2 Y_3)" in text and "(>= Y_0 Y_3)" in text and "+" not in text.split("(assert (or")[-1]


def test_train_command_writes_model_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--epochs", "1", "--set", "data.train_limit=300", "--set",
            "data.eval_limit=100", "--set", "train.eval_radius=1", "--no-progress", "-o", str(out)]
    assert main(args) == 0
    # one epoch is inside the default 2-epoch QAT warm-up: the user is told the robust term never switched on
    cap = capsys.readouterr()
    assert "never switches on" in cap.err
    assert "evaluated on: training images (first 100), 100 images (images it trained on" in cap.out
    net = load_model(out / "model.qnn")
    assert net.num_outputs == 10 and (out / "config.toml").exists() and (out / "checkpoint.pt").exists()
    assert main([*args, "--resume"]) == 0  # finished run: resume reloads and re-exports the same model
    assert main(args) == 3  # a checkpoint is never overwritten unasked
    assert "checkpoint.pt exists: add --resume to continue that run, or --overwrite" in capsys.readouterr().err
    again = load_model(out / "model.qnn")
    assert all(np.array_equal(a.weight, b.weight) for a, b in zip(net.layers, again.layers, strict=True)
               if hasattr(a, "weight"))
    assert main([*args, "--set", "train.lr=0.01", "--resume"]) == 3
    assert "(train.lr: checkpoint 0.001, this run 0.01)" in capsys.readouterr().err
    assert main([*args, "--set", "train.lr=0.01", "--overwrite"]) == 0
    assert main(["train", "--set", "train.nonsense=1", "-o", str(tmp_path / "x")]) == 3
    assert main(["train", "--device", "tpu", "-o", str(tmp_path / "x")]) == 3  # before any data is read
    assert "device must be cpu, cuda, cuda:N or auto, got 'tpu'" in capsys.readouterr().err




def test_interrupted_train_says_which_epoch_the_checkpoint_holds(tmp_path, capsys, monkeypatch):
    import qverify.train as qtrain

    real = qtrain.train

    def interrupted(cfg, resume=False, data=None):  # Ctrl-C during the third epoch
        real(cfg, resume=resume, data=data, stop_after_epoch=1)
        raise KeyboardInterrupt

    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--epochs", "3", "--set", "data.train_limit=200", "--set",
            "data.eval_limit=50", "--no-progress", "-o", str(out)]
    monkeypatch.setattr(qtrain, "train", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'} holds epoch 2 of 3; run the same command with --resume" in err
    assert "interrupted" in err and not (out / "model.qnn").exists()
    monkeypatch.setattr(qtrain, "train", real)
    assert main([*args, "--resume"]) == 0 and (out / "model.qnn").exists()


@pytest.mark.parametrize("bits", [8, 7])
def test_train_onnx_export_warns_where_onnxruntime_clips(tmp_path, capsys, monkeypatch, bits):
    """On a CPU whose onnxruntime clips u8 x s8 pairs (stood in for here), exporting 8-bit weights warns and names
    the 7-bit way out; 7-bit weights cannot clip, so they do not warn."""
    pytest.importorskip("onnxruntime")
    import qverify.io.onnx as qonnx

    monkeypatch.setattr(qonnx, "ort_u8s8_saturates", lambda: True)
    out = tmp_path / f"run{bits}"
    assert main(["train", "--data", "mnist-5k", "--epochs", "1", "--method", "qat", "--set", "data.train_limit=200",
                 "--set", "data.eval_limit=50", "--set", f"quant.weight_bits={bits}", "--set",
                 "quant.weight_int_bits=-3", "--set", "quant.calibrate=false", "--onnx", "--no-progress",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    # the pow2 scheme rounds half up unless told otherwise; --onnx asks for ONNX's half-to-even and says so
    assert "quant.rounding = 'half_even'" in err and 'rounding = "half_even"' in (out / "config.toml").read_text()
    w_qnn, w_onnx = ([layer.weight for layer in load_model(out / f).layers if hasattr(layer, "weight")]
                     for f in ("model.qnn", "model.onnx"))
    assert len(w_qnn) == len(w_onnx) and all(np.array_equal(a, b) for a, b in zip(w_qnn, w_onnx, strict=True))
    wmax = max(int(np.abs(w).max()) for w in w_qnn)
    assert wmax > 64 if bits == 8 else wmax <= 64  # weights on [-1/8, 1/8): 8 bits reach past 64, 7 cannot
    assert (qonnx.U8S8_CLIP_NOTE in err) == (bits == 8)
    if bits == 8:
        assert "model.onnx" in err and "quant.weight_bits = 7" in err



def test_train_onnx_refuses_before_training_what_it_cannot_export(tmp_path, capsys):
    out = tmp_path / "digits"
    # scikit-learn's digits are on [0, 16]: the ONNX export needs 8-bit pixels, known before a single epoch
    assert main(["train", "--data", "digits", "--epochs", "1", "--onnx", "--no-progress", "-o", str(out)]) == 3
    assert "--onnx: the input grid must be the 8-bit [0, 255], the data's is [0, 16]" in capsys.readouterr().err
    assert not (out / "model.qnn").exists()
    assert main(["train", "--data", "mnist-5k", "--set", "quant.rounding='half_up'", "--onnx", "-o", str(out)]) == 3
    assert "train with quant.rounding = 'half_even'" in capsys.readouterr().err


def test_certify_and_report_commands(tmp_path, capsys):
    from tests.fixtures import random_dense_network

    net = random_dense_network(np.random.default_rng(3), n_in=4, hidden=(5,), n_out=3)
    model = tmp_path / "m.qnn"
    save_model(net, model)
    d = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(d, images=rng.integers(0, 8, size=(6, 4)), labels=rng.integers(0, 3, size=6))
    out = tmp_path / "cert"
    args = ["certify", str(model), str(d), "--radius", "1", "--radius", "2", "--workers", "1", "--no-progress",
            "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "certified acc" in text and (out / "report" / "report.html").exists()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert main(args) == 0  # resume: nothing is redone
    assert "0 new, 12 resumed" in capsys.readouterr().out
    assert (out / "results.jsonl").read_text().splitlines()[: len(lines)] == lines
    assert main(["report", str(out / "results.jsonl"), str(out / "results.jsonl"), "-o", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").exists()
    with pytest.raises(SystemExit):
        main(["certify", str(model), str(d), "-o", str(out)])  # no --radius


@pytest.mark.parametrize("flags, relax, fallback", [([], "scip", "highs"), (["--relax", "none"], "", "highs"),
                                                    (["--relax", "highs", "--fallback", "none"], "highs", "")])
def test_exact_stage_flags_map_to_settings(flags, relax, fallback):
    from qverify.cli import _verify_settings, build_parser

    args = build_parser().parse_args(["verify", "m.qnn", "p.vnnlib", *flags])
    s = _verify_settings(args)
    assert (s.relax, s.fallback) == (relax, fallback)


def test_verify_prints_the_slack_bracket_of_an_unknown(capsys):
    from qverify.cli import _print_result
    from qverify.result import Result

    near = {"x": [0, 1], "y": [3, 1]}
    _print_result("p", Result("unknown", "milp", 1.0, "timeout", details={"slack": {"lower": -3, "upper": 2,
                                                                                        "nearest": near}}))
    _print_result("q", Result("unknown", "symbolic", 0.1, "incomplete-method",
                              details={"slack": {"lower": -1, "upper": None, "nearest": None}}))
    out = capsys.readouterr().out
    assert "p: unknown (timeout)" in out and "least slack over the box in [-3, 2] (a violation is slack <= 0" in out
    assert "least slack over the box >= -1 (a violation is slack <= 0)" in out


# ---------------------------------------------------------------------------------------------- runtime divergence
@pytest.fixture(scope="module")
def tie_models(tmp_path_factory):
    """The near-tie QLinearMatMul model (onnxruntime differs on odd sums) and its twin (agrees), a data file and a
    robustness property of radius 3 for each."""
    pytest.importorskip("onnxruntime")
    from tests.onnx_builders import near_tie_model

    d = tmp_path_factory.mktemp("ties")
    np.savez(d / "d.npz", images=np.array([[100, 101, 99], [40, 60, 80]], dtype=np.uint8), labels=np.array([0, 0]))
    out = {}
    for ties in (True, False):
        model = near_tie_model(d / f"ties_{ties}.onnx", ties=ties)
        props = d / f"props_{ties}"
        assert main(["property", str(d / "d.npz"), "--model", str(model), "--radius", "3", "--ids", "0",
                     "-o", str(props)]) == 0
        out[ties] = (model, next(props.glob("*.vnnlib")))
    return d, out


@pytest.mark.parametrize("ties", [True, False])
def test_verify_warns_exactly_where_onnxruntime_differs(tie_models, tmp_path, capsys, ties):
    from qverify.divergence import semantics_of
    from qverify.io.onnx import load_onnx

    _, models = tie_models
    model, prop = models[ties]
    rf, js = tmp_path / "r.txt", tmp_path / "r.json"
    assert main(["verify", str(model), str(prop), "--result-file", str(rf), "--json", str(js)]) == 0  # robust
    out = capsys.readouterr().out
    details = json.loads(js.read_text())["details"]
    lines = rf.read_text().splitlines()
    assert lines[0] == "unsat" and all(line.startswith("; ") for line in lines[1:])
    sem = semantics_of(load_onnx(model))
    assert details["semantics"] == sem and f"under {sem} semantics" in lines[1]
    div = details["divergence"]
    if ties and sem == "exact":
        assert div["differing"] > 0 and div["checked"] == 256
        assert "warning: onnxruntime" in out and f"on {div['differing']} of 256 points" in out
        assert lines[2].startswith("; qverify warning: onnxruntime") and "holds for the executor's function" in lines[2]
    else:
        assert div["differing"] == 0 and "warning" not in out and "warning" not in details
        assert "agrees with the executor" in lines[2]
    assert main(["verify", str(model), str(prop), "--result-file", str(rf), "--no-divergence-check"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert rf.read_text().splitlines()[1:] == [f"; qverify: verdict about the integer network under {sem} semantics"]


def test_info_and_run_say_where_onnxruntime_differs(tie_models, capsys):
    d, models = tie_models
    for ties, (model, _) in models.items():
        assert main(["info", str(model)]) == 0
        info = capsys.readouterr().out
        assert main(["info", str(model), "--json"]) == 0
        div = json.loads(capsys.readouterr().out)["divergence"]
        assert div["where"] == "grid" and div["checked"] == 256
        assert main(["run", str(model), str(d / "d.npz"), "--json"]) == 0
        cap = capsys.readouterr()
        run = json.loads(cap.out)["divergence"]
        assert run["where"] == "data" and run["checked"] == 2
        if div["differing"]:
            assert "warning: onnxruntime" in info and "random points of the input grid" in info
        else:
            assert not ties and "runtime check: onnxruntime" in info and "agrees" in info
        assert ("warning: onnxruntime" in cap.err) == (run["differing"] > 0)
    assert main(["info", str(models[True][0]), "--no-divergence-check"]) == 0
    assert "onnxruntime" not in capsys.readouterr().out


def test_certify_records_the_divergence_and_warns(tie_models, tmp_path, capsys):
    d, models = tie_models
    model, _ = models[True]
    out = tmp_path / "cert"
    assert main(["certify", str(model), str(d / "d.npz"), "--radius", "2", "--workers", "1", "--no-progress",
                 "--divergence-points", "64", "-o", str(out)]) == 0
    cap = capsys.readouterr()
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    header, inst = recs[0], [r for r in recs if r["type"] == "instance"]
    assert header["divergence_check"]["points"] == 64 and header["divergence_check"]["runtime"] == "onnxruntime"
    assert all(r["details"]["divergence"]["checked"] <= 64 for r in inst if r["verdict"] != "misclassified")
    warned = [r for r in inst if r.get("details", {}).get("warning")]
    assert ("warning: onnxruntime differs" in cap.err) == bool(warned)
    html = (out / "report" / "report.html").read_text()
    assert 'id="divergence"' in html


def test_semantics_flag_is_stated_and_changes_the_function(tmp_path, capsys):
    """``--semantics onnxruntime`` loads onnxruntime's float32 requantization: on the near-tie model the exact
    semantics differs from onnxruntime inside the box (a warning), onnxruntime's does not; the verdict line and the
    result file say which semantics the verdict is about."""
    from qverify.io.onnx import load_onnx
    from qverify.io.vnnlib import write_vnnlib
    from qverify.property import robustness_property
    from tests.onnx_builders import near_tie_model

    model = near_tie_model(tmp_path / "ties.onnx")
    net = load_onnx(model)
    write_vnnlib(robustness_property(net, np.array([100, 101, 99]), 0, radius=3), net, tmp_path / "p.vnnlib")
    for sem, warned in (("exact", True), ("onnxruntime", False)):
        rf = tmp_path / f"{sem}.txt"
        args = ["verify", str(model), str(tmp_path / "p.vnnlib"), "--timeout", "20", "--result-file", str(rf)]
        main(args + ([] if sem == "exact" else ["--semantics", sem]))
        cap = capsys.readouterr()
        assert f"semantics={sem}" in cap.out
        assert ("onnxruntime" in (cap.out + cap.err) and "warning" in (cap.out + cap.err)) == warned, cap
        assert sem in rf.read_text()
    assert main(["info", str(model), "--semantics", "onnxruntime"]) == 0
    assert "float32" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["info", str(model), "--semantics", "bogus"])
    assert e.value.code == 2


def test_mixed_precision_command_reports_bad_input(tmp_path, capsys):
    # the search itself runs end to end in tests/test_mixed_precision.py; here: the command's errors
    d = tmp_path / "d.npz"
    np.savez(d, images=np.zeros((2, 8, 8), dtype=np.uint8), labels=np.array([0, 1]))
    assert main(["mixed-precision", str(tmp_path / "nowhere"), str(d), "--sigma", "0.25", "--out",
                 str(tmp_path / "o")]) == 3
    assert "no qverify train checkpoint there" in capsys.readouterr().err
    assert main(["mixed-precision", str(tmp_path), str(tmp_path / "missing.npz"), "--sigma", "0.25", "--out",
                 str(tmp_path / "o")]) == 3
    assert "missing.npz: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["mixed-precision", str(tmp_path), str(d), "--sigma", "0.25", "--search", "random", "--out", "x"])
