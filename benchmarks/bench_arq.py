"""ARQ mixed-precision search on the MNIST CNN trained with Gaussian noise: certified accuracy and ACR of the float
model, uniform 8/4/2-bit integer models and the searched mixed-precision models (ACR and accuracy rewards).

    python benchmarks/bench_arq.py [--sigma 0.25 0.5] [--arch cnn resnet] [--images 100] [--n 10000] [--n0 100]
                                   [--alpha 0.001]
                                   [--search-images 100] [--search-n 1000] [--episodes 30] [--budget w4a4]
                                   [--bits 2 4 8] [--train-epochs 10] [--finetune-epochs 1]
                                   [--finetune-images 0] [--threads 1] [--device cpu|cuda]

Per base network (``--arch``, default both) and sigma (in [0, 1] pixel units up to 256/255: the pow2 input grid is
v = x / 256):

* the CNN (``cnn``: ``model.arch = 'cnn'``, the default conv layers [16, 4, 2, 1], [32, 4, 2, 1], one hidden dense
  layer of 100) or the small residual network (``resnet``: stem conv 8x4/2, one identity residual block of two 3x3
  convs, dense 50) is trained by ``qverify train`` with ``train.method = 'float-ibp'``, ``train.eps = 0`` (plain
  float training) and ``train.noise_sigma = sigma`` on ``data.train = 'mnist-5k'`` for ``--train-epochs``;
* ``float``: that float model as the base classifier (float64 torch forward on the noisy inputs mapped to the
  same integer grid), CERTIFY with the same noise as the integer models;
* ``uniform wXaX``: every layer at X bits, made as each search candidate is (``--finetune-epochs`` of QAT with
  Gaussian noise from the float checkpoint; 0: post-training quantization);
* ``ARQ (acr)``: the DDPG search (``--episodes``) at the ``--budget`` (default the W4A4 equivalent), reward ACR on
  the first ``--search-images`` images with ``--search-n`` samples; ``ARQ (accuracy)`` beside it: the same search
  with the base classifier's clean accuracy as the reward (HAQ's);

each certified with ``--n`` samples (n0 ``--n0``, ``--alpha``) on the first ``--images`` MNIST test images of
``../shared/data/mnist_test_first1000.npz``: certified accuracy at l2 radii 0.25 / 0.5 / 1.0, ACR, BitOps, the
search and certification time (wall seconds on this machine). JSON under ``benchmarks/out/bench_arq.json``; the
search directories (trace, model, certificate) under ``benchmarks/out/arq/``. Resumable: each row is stored in
``benchmarks/out/arq/row-*.json`` (its name carries the arch, sigma and sizes) and reused; an interrupted smoothing
run or search resumes from its records / trace.

Then, per base network and sigma, right after its rows (``--extras-images K``, default 20; 0 skips), side by
side in one process:

* **sampling throughput**: the same 10,000 quantized noisy inputs of test image 0 classified by the numpy integer
  executor (uniform W8A8, W4A4 and the ARQ (acr) model) and by the float64 torch model of the base network (the
  ``float`` row's classifier, one torch thread); median of 3 timings each, inputs per second and the ratio;
* **incremental against full re-certification** (Ugare et al. 2024): the W4A4 and ARQ (acr) models certified on the
  first K images from the uniform W8A8 certificate (``smooth(..., reuse=...)``, n_p = n / 10, a full CERTIFY where
  the bound is too weak) and by a full CERTIFY, CPU seconds of this process for each (ratio full / incremental),
  with the certified accuracy and ACR of both. Rows in ``benchmarks/out/arq/extras-*.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MNIST1000, OUT, print_table, write_json  # noqa: E402
from qverify.mixed_precision import ARQEvaluator, parse_budget, run_search  # noqa: E402
from qverify.smooth import InputQuantizer, Sampler, centers, certify_sample, smooth, summarize_smoothing  # noqa: E402

RADII = [0.25, 0.5, 1.0]


class FloatEngine:
    """The float model as a smoothing base classifier on the integer grid of ``net`` (what the trainer feeds it)."""

    def __init__(self, fm, net) -> None:  # noqa: ANN001 - a FloatModel and a QNetwork of the same grid
        self.fm, self.net, self.device, self.name = fm, net, "cpu", "float64 torch model"

    def classes(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.argmax(self.fm.forward(x.reshape((-1, *self.fm.input_shape))), axis=1)


def smooth_float(fm, net, images: np.ndarray, labels: np.ndarray, sigma: float, n0: int, n: int,  # noqa: ANN001
                 alpha: float) -> dict:
    """CERTIFY of the float model with the integer pipeline's noise (same seeds, same grid mapping)."""
    eng = FloatEngine(fm, net)
    q = InputQuantizer.of(net)
    r0, r0x = centers(net, images)
    recs = []
    for i in range(len(labels)):
        t = time.monotonic()
        smp = Sampler(q, r0[i], None if r0x is None else r0x[i], sigma, 0, i)
        cert, _ = certify_sample(eng, smp, n0, n, alpha, 1000)
        recs.append({"prediction": cert.prediction, "radius": cert.radius,
                     "correct": cert.prediction == int(labels[i]), "seconds": time.monotonic() - t})
    return summarize_smoothing(recs, RADII)


#: the base networks (``--arch``): the trainer's default CNN, and a small residual network (stem conv 8x4/2,
#: one identity residual block of two 3x3 convs, dense 50: the resnet of ``bench_robust_quant.py``)
ARCH = {"cnn": ["model.arch='cnn'", "model.hidden=[100]"],
        "resnet": ["model.arch='resnet'", "model.conv=[[8, 4, 2, 0]]", "model.blocks=1", "model.hidden=[50]"]}


def train_base(arch: str, sigma: float, epochs: int, out: Path, threads: int) -> Path:
    """The Gaussian-noise float training of the base network (resumes from its checkpoint)."""
    from qverify.train import load_config, train

    ckpt = out / f"{arch}_noise{sigma:g}_e{epochs}"
    cfg = load_config(None, ["data.train='mnist-5k'", *ARCH[arch],
                             "train.method='float-ibp'", "train.eps=0.0", f"train.noise_sigma={sigma}",
                             f"train.epochs={epochs}", "train.lr_milestones=[]", "progress=false",
                             f"threads={threads}", f"out_dir='{ckpt}'", f"name='mnist_{arch}_noise{sigma:g}'"])
    train(cfg, resume=True)
    return ckpt


def cached_row(path: Path, make) -> dict:  # noqa: ANN001 - a zero-argument callable returning the row
    """The row stored at ``path`` by an earlier run, else ``make()`` stored there (rows resume one by one)."""
    if path.exists():
        return json.loads(path.read_text())
    r = make()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(r, indent=1, default=str))
    tmp.replace(path)
    return r


def row(arch: str, sigma: float, model: str, summ: dict, bitops: int | None, bits: str, search_s: float | None,
        cert_s: float) -> dict:
    return {"arch": arch, "sigma": sigma, "model": model, "bits": bits, "BitOps": bitops,
            "clean": summ["clean_accuracy"],
            **{f"cert@{c['radius']:g}": c["certified_accuracy"] for c in summ["certified"]}, "ACR": summ["acr"],
            "search_s": search_s, "cert_s": cert_s}


def base_rows(arch: str, sigma: float, args: argparse.Namespace, images: np.ndarray, labels: np.ndarray,
              work: Path, tag: str, stag: str, times: dict) -> tuple[list[dict], object, int]:
    """The rows of one base network and sigma (each cached in ``work``), its search space and budget."""
    rows: list[dict] = []
    t = time.monotonic()
    ckpt = train_base(arch, sigma, args.train_epochs, work, args.threads)
    times[f"train {arch} {sigma:g}"] = time.monotonic() - t
    print(f"{arch} sigma {sigma}: trained in {times[f'train {arch} {sigma:g}']:.0f} s", file=sys.stderr)
    ev = ARQEvaluator(ckpt, images, labels, sigma, allowed=args.bits, n0=args.n0, n=args.search_n,
                      alpha=args.alpha, search_images=args.search_images, finetune_epochs=args.finetune_epochs,
                      threads=args.threads, finetune_images=args.finetune_images, device=args.device)
    sp = ev.space
    budget = parse_budget(args.budget, sp)
    from qverify.quantize import from_quantnet

    def float_row() -> dict:
        t = time.monotonic()
        fs = smooth_float(from_quantnet(ev.model), ev.network(sp.uniform(8, 8)), images, labels, sigma,
                          args.n0, args.n, args.alpha)
        return row(arch, sigma, "float", fs, None, "fp64", None, time.monotonic() - t)

    rows.append(cached_row(work / f"row-{arch}-s{sigma:g}-{tag}-float.json", float_row))
    print(f"{arch} sigma {sigma}: float done", file=sys.stderr)
    for b in sorted(set(args.bits), reverse=True):
        c = sp.uniform(b, b)

        def uniform_row(b: int = b, c=c) -> dict:  # noqa: ANN001 - a Candidate
            t = time.monotonic()
            ev_kw = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch=1000, seed=0, progress=False,
                         device="numpy" if args.device == "cpu" else args.device)
            s = smooth(ev.network(c), images, labels, sigma,
                       results_path=work / f"uniform_{arch}_s{sigma:g}_w{b}a{b}_{tag}.jsonl",
                       **ev_kw).summary(RADII)
            return row(arch, sigma, f"uniform w{b}a{b}", s, sp.bitops(c), c.key, None, time.monotonic() - t)

        rows.append(cached_row(work / f"row-{arch}-s{sigma:g}-{tag}-w{b}a{b}.json", uniform_row))
        print(f"{arch} sigma {sigma}: uniform {b} done", file=sys.stderr)
    for reward in ("acr", "accuracy"):
        def search_row(reward: str = reward) -> dict:
            out = work / f"search_{arch}_s{sigma:g}_{reward}_{stag}"
            t = time.monotonic()
            res = run_search(ckpt, images, labels, sigma, out, allowed=args.bits, budget=args.budget,
                             search="ddpg", episodes=args.episodes, reward=reward, n0=args.n0,
                             search_n=args.search_n, n=args.n, alpha=args.alpha,
                             search_images=args.search_images, finetune_epochs=args.finetune_epochs,
                             finetune_images=args.finetune_images, threads=args.threads, device=args.device,
                             command=" ".join(["python", *sys.argv]))
            ch = res["chosen"]
            r = row(arch, sigma, f"ARQ ({reward})", res["certificate"]["summary"], ch["bitops"], ch["key"],
                    res["search_seconds"], time.monotonic() - t - res["search_seconds"])
            r["evaluated"] = res["evaluations"]
            return r

        rows.append(cached_row(work / f"row-{arch}-s{sigma:g}-{stag}-arq-{reward}.json", search_row))
        print(f"{arch} sigma {sigma}: search {reward} done", file=sys.stderr)
    return rows, sp, budget


def _network(ev, c, path: Path):  # noqa: ANN001, ANN202 - an ARQEvaluator, a Candidate -> a QNetwork
    """The candidate's integer network, stored at ``path`` on first use (fine-tuning is deterministic, so this is
    the network its row certified)."""
    from qverify.io import load_model, save_model

    if path.exists():
        return load_model(path)
    net = ev.network(c)
    save_model(net, path)
    return net


def _median_rate(fn, x: np.ndarray) -> float:  # noqa: ANN001 - a classifier of integer batches
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return len(x) / float(np.median(ts))


def extras(arch: str, sigma: float, args: argparse.Namespace, images: np.ndarray, labels: np.ndarray, work: Path,
           tag: str, stag: str) -> dict:
    """Sampling throughput and incremental re-certification of one base network and sigma (module docstring)."""
    from qverify.quantize import from_quantnet
    from qverify.smooth import Engine

    ckpt = train_base(arch, sigma, args.train_epochs, work, args.threads)
    ev = ARQEvaluator(ckpt, images, labels, sigma, allowed=args.bits, n0=args.n0, n=args.search_n,
                      alpha=args.alpha, search_images=args.search_images, finetune_epochs=args.finetune_epochs,
                      threads=args.threads, finetune_images=args.finetune_images, device=args.device)
    sp = ev.space
    from qverify.io import load_model

    nets = {f"uniform w{b}a{b}": _network(ev, sp.uniform(b, b), work / f"uniform_{arch}_s{sigma:g}_w{b}a{b}_{tag}.qnn")
            for b in (8, 4)}
    nets["ARQ (acr)"] = load_model(work / f"search_{arch}_s{sigma:g}_acr_{stag}" / "model.qnn")
    ref = nets["uniform w8a8"]
    q = InputQuantizer.of(ref)
    r0, r0x = centers(ref, images[:1])
    x = next(Sampler(q, r0[0], None if r0x is None else r0x[0], sigma, 0, 0).batches(1, 10_000, 10_000))
    fe = FloatEngine(from_quantnet(ev.model), ref)
    rates = {"float64 torch": _median_rate(fe.classes, x)}
    for k, net in nets.items():
        rates[k] = _median_rate(Engine(net, "numpy").classes, x)
    out: dict = {"arch": arch, "sigma": sigma, "throughput": rates,
                 "ratio": {k: v / rates["float64 torch"] for k, v in rates.items() if k != "float64 torch"}}
    ids = list(range(min(args.extras_images, len(labels))))
    kw = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch=1000, seed=0, ids=ids, progress=False, device="numpy")
    reference = work / f"uniform_{arch}_s{sigma:g}_w8a8_{tag}.jsonl"
    inc = []
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for k in ("uniform w4a4", "ARQ (acr)"):
            t = time.process_time()
            full = smooth(nets[k], images, labels, sigma, results_path=Path(d) / f"full-{len(inc)}.jsonl",
                          **kw).summary(RADII)
            t_full = time.process_time() - t
            t = time.process_time()
            part = smooth(nets[k], images, labels, sigma, results_path=Path(d) / f"inc-{len(inc)}.jsonl",
                          reuse=reference, reference_net=ref, **kw).summary(RADII)
            t_inc = time.process_time() - t
            inc.append({"model": k, "images": len(ids), "incremental": part.get("incremental"),
                        "fallback": part.get("fallback"),
                        "full": {"cpu_s": t_full, "acr": full["acr"],
                                 **{f"cert@{c['radius']:g}": c["certified_accuracy"] for c in full["certified"]}},
                        "inc": {"cpu_s": t_inc, "acr": part["acr"],
                                **{f"cert@{c['radius']:g}": c["certified_accuracy"] for c in part["certified"]}},
                        "ratio": t_full / t_inc})
    out["incremental"] = inc
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--arch", nargs="+", default=["cnn", "resnet"], choices=list(ARCH))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--search-images", type=int, default=100)
    ap.add_argument("--search-n", type=int, default=1000)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--budget", default="w4a4")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--train-epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-images", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (numpy executor), or cuda: fine-tuning and smoothing there")
    ap.add_argument("--extras-images", type=int, default=20,
                    help="images of the incremental-vs-full comparison (0: no throughput / incremental step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = np.load(MNIST1000)
    images, labels = d["images"][:args.images], d["labels"][:args.images]
    work = OUT / "arq"
    work.mkdir(parents=True, exist_ok=True)
    rows, times = [], {}
    tag = f"i{args.images}-n{args.n}-a{args.alpha:g}-e{args.train_epochs}"
    stag = f"{tag}-si{args.search_images}-sn{args.search_n}-ep{args.episodes}-ft{args.finetune_epochs}"
    sp = None
    ext = []
    for arch, sigma in itertools.product(args.arch, args.sigma):
        arch_rows, sp, budget = base_rows(arch, sigma, args, images, labels, work, tag, stag, times)
        rows += arch_rows
        rows.append({"arch": arch, "sigma": sigma, "model": f"(budget {args.budget})", "BitOps": budget})
        if args.extras_images > 0:  # right after the rows it uses: a run stopped later keeps it
            ext.append(cached_row(work / f"extras-{arch}-s{sigma:g}-{stag}-x{args.extras_images}.json",
                                  lambda arch=arch, sigma=sigma: extras(arch, sigma, args, images, labels, work, tag,
                                                                        stag)))
            print(f"{arch} sigma {sigma}: throughput and incremental done", file=sys.stderr)
    print(f"MNIST {' / '.join(args.arch)} (mnist-5k, Gaussian-noise float training {args.train_epochs} epochs); "
          f"{args.images} test images, "
          f"n0 {args.n0}, n {args.n}, alpha {args.alpha}; search: ddpg {args.episodes} episodes, widths {args.bits}, "
          f"{args.search_images} images, n {args.search_n}, fine-tune {args.finetune_epochs} epoch(s)"
          + (f" on {args.finetune_images} images" if args.finetune_images else "")
          + f"; {args.threads} torch thread(s)")
    print_table(rows, ["arch", "sigma", "model", "bits", "BitOps", "clean", "cert@0.25", "cert@0.5", "cert@1", "ACR",
                       "evaluated", "search_s", "cert_s"])
    path = write_json("bench_arq", {"args": vars(args), "rows": rows, "times": times,
                                    "layers": [{**lay.__dict__, "macs": lay.macs} for lay in sp.layers] if sp else []})
    print(f"\nwrote {path}")
    if args.extras_images <= 0:
        return
    thr = [{"arch": e["arch"], "sigma": e["sigma"], "model": k, "inputs/s": f"{v:.3g}",
            "int/float": "" if k == "float64 torch" else f"{e['ratio'][k]:.2f}"}
           for e in ext for k, v in e["throughput"].items()]
    print("\nsampling throughput (10,000 noisy inputs of image 0, median of 3)")
    print_table(thr, ["arch", "sigma", "model", "inputs/s", "int/float"])
    inc = [{"arch": e["arch"], "sigma": e["sigma"], "model": r["model"], "images": r["images"],
            "inc/fallback": f"{r['incremental']}/{r['fallback']}",
            "cert@0.25 inc (full)": f"{r['inc']['cert@0.25']:.2f} ({r['full']['cert@0.25']:.2f})",
            "cert@0.5 inc (full)": f"{r['inc']['cert@0.5']:.2f} ({r['full']['cert@0.5']:.2f})",
            "ACR inc (full)": f"{r['inc']['acr']:.3f} ({r['full']['acr']:.3f})",
            "CPU s inc / full": f"{r['inc']['cpu_s']:.1f} / {r['full']['cpu_s']:.1f}", "ratio": f"{r['ratio']:.2f}x"}
           for e in ext for r in e["incremental"]]
    print("\nincremental re-certification from the uniform W8A8 certificate against a full CERTIFY")
    print_table(inc, list(inc[0]) if inc else [])
    path = write_json("bench_arq_extras", {"args": vars(args), "extras": ext})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
