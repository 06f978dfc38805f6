"""Training loop: the loss decreases, resume is exact, reported certified accuracy matches exact intervals,
baselines run, configs round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qverify.train.schedule import ramp_fraction, schedule_values, step_decay
from qverify.train.trainer import (
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    dump_config,
    load_config,
    prepare_data,
    select_device,
    train,
)
from tests.fixtures import CUDA
from tests.test_train_bounds_ibp import _as_pairs, _numpy_interval_module, reference_intervals

TINY = ["data.train='digits'", "data.holdout=300", "model.hidden=[16]", "progress=false", "train.batch_size=64",
        "train.lr=0.01", "quant.weight_bits=6", "quant.act_bits=6", "quant.out_bits=6", "train.eps=1.0"]


def _cfg(*extra: str, out: str = "") -> Config:
    return load_config(None, [*TINY, *extra, f"out_dir='{out}'"])


def test_loss_decreases_on_a_tiny_problem() -> None:
    res = train(_cfg("train.epochs=6", "train.warmup_epochs=1.0", "train.ramp_epochs=2.0"))
    h = res.history
    assert h[-1]["natural_loss"] < 0.5 * h[0]["natural_loss"]
    assert h[-1]["eval_acc"] > 0.8
    assert h[-1]["robust_loss"] > 0  # the bound term was active
    assert h[-1]["eval_cert"] > 0.3


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("extra", [(), ("train.method='float-ibp'",),
                                   ("quant.scheme='affine'", "train.float_epochs=1"),
                                   ("train.bound='crown-ibp'", "train.beta_end=0.5")])
def test_resume_gives_the_uninterrupted_model(tmp_path, extra: tuple[str, ...]) -> None:
    common = ["train.epochs=4", "train.warmup_epochs=1.0", "train.ramp_epochs=1.5", "train.lr_milestones=[2]", *extra]
    full = train(_cfg(*common, out=str(tmp_path / "a")))
    part = train(_cfg(*common, out=str(tmp_path / "b")), stop_after_epoch=1)
    assert len(part.history) == 2
    resumed = train(_cfg(*common, out=str(tmp_path / "b")), resume=True)
    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]



@CUDA
@pytest.mark.parametrize("extra", [(), ("model.arch='cnn'", "model.conv=[[4, 3, 2, 1]]")])
def test_cuda_training_is_deterministic_resumable_and_exact(tmp_path, extra: tuple[str, ...]) -> None:
    """On a GPU: the same seed gives the same model, an interrupted run resumes to it, and the figures the
    trainer reports (computed on the GPU) are those of the exported integer network on the CPU."""
    common = ["device='cuda'", "train.epochs=3", "train.warmup_epochs=0.5", "train.ramp_epochs=1.0",
              "train.lr_milestones=[2]", *extra]
    full = train(_cfg(*common, out=str(tmp_path / "a")))
    again = train(_cfg(*common, out=str(tmp_path / "c")))
    part = train(_cfg(*common, out=str(tmp_path / "b")), stop_after_epoch=0)
    resumed = train(_cfg(*common, out=str(tmp_path / "b")), resume=True)
    a = _state(full.model)
    for other in (again, resumed):
        b = _state(other.model)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert len(part.history) == 1 and next(full.model.parameters()).device.type == "cuda"
    net = full.network()
    _, ev = prepare_data(_cfg(*common))
    x, y = ev.images.astype(np.int64), ev.labels
    from qverify.bounds.interval import certified_by_interval
    from qverify.execute import predict
    from qverify.property import robustness_property

    r = full.config.train.radius
    props = [robustness_property(net, x[i].ravel(), int(y[i]), radius=r) for i in range(len(y))]
    assert full.eval is not None
    assert np.array_equal(full.eval.certified, np.asarray(certified_by_interval(net, props), dtype=bool))
    assert np.array_equal(full.eval.correct, predict(net, x) == y)


def test_checkpoint_written_before_new_settings_resumes(tmp_path) -> None:
    """A checkpoint whose configuration lacks settings added later (here the CROWN-IBP ones) resumes as long as
    the run uses their defaults."""
    common = ["train.epochs=2", "train.warmup_epochs=0.5", "train.ramp_epochs=1.0"]
    train(_cfg(*common, out=str(tmp_path)), stop_after_epoch=0)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for k in ("bound", "beta_end"):
        del state["config"]["train"][k]
    torch.save(state, path)
    assert len(train(_cfg(*common, out=str(tmp_path)), resume=True).history) == 2
    with pytest.raises(ConfigError):
        train(_cfg(*common, "train.bound='crown-ibp'", out=str(tmp_path)), resume=True)


def test_crown_ibp_bound_trains() -> None:
    res = train(_cfg("train.bound='crown-ibp'", "train.epochs=4", "train.warmup_epochs=1.0", "train.ramp_epochs=2.0"))
    h = res.history
    assert h[-1]["natural_loss"] < h[0]["natural_loss"] and h[-1]["robust_loss"] > 0
    assert h[-1]["eval_acc"] > 0.7 and res.network().metadata["train_method"] == "qaibp"
    with pytest.raises(ConfigError):
        load_config(None, ["train.bound='crown'"])


def test_resume_rejects_other_config(tmp_path) -> None:
    train(_cfg("train.epochs=1", out=str(tmp_path)))
    with pytest.raises(ConfigError):
        train(_cfg("train.epochs=2", "train.lr=0.01", out=str(tmp_path)), resume=True)


def test_reported_certified_accuracy_equals_exact_intervals_on_export() -> None:
    cfg = _cfg("train.epochs=3", "train.warmup_epochs=0.5", "train.ramp_epochs=1.0")
    res = train(cfg)
    net = res.network()
    _, ev = prepare_data(cfg)
    x, y = ev.images.astype(np.int64), ev.labels
    r = cfg.train.radius
    lo, hi = np.maximum(x - r, 0), np.minimum(x + r, net.input_hi)
    bounds = reference_intervals(net, lo, hi)
    ib = _numpy_interval_module()
    if ib is not None:
        bounds = _as_pairs(ib(net, lo, hi))
    olo, ohi = (np.asarray(b).reshape(len(y), -1) for b in bounds[-1])
    ly = olo[np.arange(len(y)), y]
    cert = np.ones(len(y), dtype=bool)
    for j in range(olo.shape[1]):
        ok = np.where(j < y, ly > ohi[:, j], ly >= ohi[:, j])
        cert &= np.where(j == y, True, ok)
    assert res.eval is not None
    assert np.array_equal(res.eval.certified, cert)
    try:  # and qverify's own decision procedure on robustness properties, when present
        from qverify.bounds.interval import certified_by_interval
    except ImportError:
        certified_by_interval = None
    if certified_by_interval is not None:
        from qverify.property import robustness_property

        props = [robustness_property(net, x[i].ravel(), int(y[i]), radius=r) for i in range(len(y))]
        assert np.array_equal(np.asarray(certified_by_interval(net, props), dtype=bool), cert)
    assert res.history[-1]["eval_cert"] == cert.mean()
    from qverify.execute import predict

    assert np.array_equal(res.eval.correct, predict(net, x) == y)
    assert res.history[-1]["eval_acc"] == (predict(net, x) == y).mean()


@pytest.mark.parametrize("method", ["qat", "float-ibp", "ibp"])
def test_baselines_train_and_export(method: str) -> None:
    res = train(_cfg(f"train.method='{method}'", "train.epochs=2", "train.warmup_epochs=0.5",
                     "train.ramp_epochs=1.0"))
    assert res.model.quantized
    net = res.network()
    assert net.metadata["train_method"] == method
    if method == "qat":
        assert all(r["robust_loss"] == 0 for r in res.history)
    if method == "float-ibp":
        assert res.history[-1].get("ptq") and res.history[0]["quantized"] is False
    assert res.eval is not None and res.eval.natural_acc > 0.3


def test_config_roundtrip_and_overrides(tmp_path) -> None:
    cfg = load_config(None, ["train.epochs=3", "model.hidden=[8, 4]", "quant.scheme='affine'",
                             "model.conv=[[4, 3, 1, 1]]", "train.lr_milestones=[1, 2]", "data.train=digits"])
    assert cfg.train.epochs == 3 and cfg.model.hidden == (8, 4) and cfg.quant.scheme == "affine"
    assert cfg.data.train == "digits" and cfg.model.conv == ((4, 3, 1, 1),)
    p = tmp_path / "c.toml"
    p.write_text(dump_config(cfg, header="test"))
    assert load_config(p) == cfg
    assert apply_overrides(cfg, {"train.epochs": 5}).train.epochs == 5
    with pytest.raises(ConfigError):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError):
        load_config(None, ["optim.lr=3"])
    with pytest.raises(ConfigError):
        load_config(None, ["train.epochs='many'"])
    with pytest.raises(ConfigError):
        load_config(None, ["train.method='magic'"])
    with pytest.raises(ConfigError):
        load_config(None, ["quant.bits=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError):
        load_config(bad)


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=-1", r"train.lr must be in \(0, inf\), got -1.0"),
    ("train.lr=nan", r"train.lr must be in \(0, inf\), got nan"),
    ("train.lr_gamma=0", r"train.lr_gamma must be in \(0, 1\]"),
    ("train.kappa_end=1.5", r"train.kappa_end must be in \[0, 1\]"),
    ("train.lam=-0.1", r"train.lam must be in \[0, inf\)"),
    ("train.eval_radius=-2", r"train.eval_radius must be in \[-1, inf\)"),
    ("train.lr_milestones=[3, -1]", r"train.lr_milestones must be epochs >= 0"),
    ("data.eval_limit=-1", r"data.eval_limit must be >= 0, got -1"),
])
def test_out_of_range_settings_are_refused_by_name(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_schedule() -> None:
    assert ramp_fraction(0, 10, 20) == 0.0 and ramp_fraction(20, 10, 20) == 0.5 and ramp_fraction(99, 10, 20) == 1
    assert ramp_fraction(10, 10, 0) == 1.0
    assert step_decay(1.0, 5, (3, 5, 8), 0.5) == 0.25
    v = schedule_values(2, 5, 10, warmup_epochs=1, ramp_epochs=2, eps=4.0, lam=2.0, rho=0.1, kappa_end=0.5,
                        lr=1e-3)
    assert v.fraction == 0.75 and v.eps == 3.0 and v.lam == 1.5 and v.kappa == 1.0 + 0.75 * -0.5
    w = schedule_values(2, 5, 10, warmup_epochs=1, ramp_epochs=2, eps=4.0, lam=2.0, rho=0.1, kappa_end=0.5,
                        lr=1e-3, ibp_mixing=True)
    assert w.lam == 1.0 - w.kappa


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            select_device(f"cuda:{torch.cuda.device_count()}")
    for bad in ("tpu", "cpu:1", "cuda:x", "gpu"):
        with pytest.raises(ConfigError, match="device must be cpu, cuda, cuda:N or auto"):
            select_device(bad)


def test_yaml_config_reads_like_toml(tmp_path) -> None:
    import yaml

    cfg = load_config(None, ["train.epochs=3", "model.hidden=[8, 4]", "model.conv=[[4, 3, 1, 1]]",
                             "quant.weight_bits=6", "train.lr=0.002", "data.train=digits"])
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(p) == cfg
    q = tmp_path / "partial.yml"
    q.write_text("seed: 3\ntrain:\n  epochs: 2\n  lr: 1   # an int where a float is expected\nmodel:\n  hidden: [16]\n")
    got = load_config(q)
    assert got.seed == 3 and got.train.epochs == 2 and got.train.lr == 1.0 and got.model.hidden == (16,)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()


@pytest.mark.parametrize("text, where", [
    ("train:\n  epochs: 2\n   lr: 0.1\n", "line 3"),           # bad indentation: the place is named
    ("- 1\n- 2\n", "must be a mapping"),                      # a list, not settings
    ("train:\n  epochs: many\n", "'epochs' must be int"),     # a value of the wrong type
    ("train:\n  epoch: 2\n", "unknown setting 'epoch'"),       # a misspelt setting
])
def test_malformed_yaml_names_the_file_and_the_place(tmp_path, text, where) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and where in str(e.value)


def test_schedule_notes_say_when_the_robust_objective_falls_short() -> None:
    """Epochs inside the warm-up give plain QAT, epochs inside the ramp never reach eps: both are said, with the
    fraction of eps reached (f = (epochs - warmup) / ramp); a complete schedule and plain QAT say nothing."""
    assert "never switches on" in TrainConfig(epochs=2, warmup_epochs=2.0, eps=3.0).schedule_notes()[0]
    note = TrainConfig(epochs=5, warmup_epochs=1.0, ramp_epochs=8.0, eps=4.0).schedule_notes()
    assert len(note) == 1 and "reaches only 2 of train.eps = 4" in note[0]
    assert TrainConfig(epochs=10, warmup_epochs=2.0, ramp_epochs=8.0, eps=4.0).schedule_notes() == []
    assert TrainConfig(method="qat", epochs=1).schedule_notes() == []
    assert TrainConfig(epochs=3, warmup_epochs=2.0, ramp_epochs=0.0).schedule_notes() == []
    # float pre-training delays the warm-up of the quantized methods, not of float IBP
    assert "float_epochs" in TrainConfig(epochs=4, float_epochs=3, warmup_epochs=2.0).schedule_notes()[0]
    assert "plain float" in TrainConfig(method="float-ibp", epochs=2, warmup_epochs=2.0).schedule_notes()[0]
    assert TrainConfig(method="float-ibp", epochs=10, float_epochs=9, warmup_epochs=1.0,
                       ramp_epochs=2.0).schedule_notes() == []
