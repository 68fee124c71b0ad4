"""Where one iteration of a gradient-matching attack spends its time, and which way of differentiating is faster.

For each model (width-64 ConvNet, ResNet-18; 32x32 photo batch; eval-mode BatchNorm) and restart count R, one
engine step of Inverting Gradients' cost (cosine matching + TV, then its gradient with respect to the R candidate
batches) is timed two ways: ``func`` (``torch.func.vmap(grad_and_value(cost))`` over the restarts, double
back-propagation through ``torch.func.grad``) and ``autograd`` (plain ``torch.autograd.grad(create_graph=True)``
on a functional call, restarts one after another). The forward pass alone and one first-order gradient are
timed as the floor. The engine's ``differentiation="auto"`` uses autograd for one restart, and on a CPU for any number;
this table is the measurement behind that choice. Median of ``--repeats`` calls after a warm-up.
Writes OUT/engine.{md,json} (default OUT: bench/results).

``--backends``: instead, one L-BFGS evaluation of DLG's cost (Euclidean matching, autograd replay, gradient with
respect to the candidate) per model and batch size, with oneDNN's convolutions and with PyTorch's native ones,
interleaved; the measurement behind :mod:`gradinv.attacks.components.backend` (OUT/engine_backends.{md,json}).
Usage: python bench/engine.py [--models convnet,resnet18] [--restarts 1,8] [--batch-sizes 1] [--threads 2]
       python bench/engine.py --backends [--models lenet,cnn6,resnet20] [--batch-sizes 1,2,4,8]
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad_and_value, vmap

from _common import median_seconds, parser, photo_case, setup, write_results
from gradinv.attacks.components.backend import NATIVE_CONV_MACS, convolution_macs
from gradinv.attacks.components.engine import MatchingSettings, use_autograd
from gradinv.attacks.components.objectives import cosine, euclidean
from gradinv.attacks.components.priors import total_variation
from gradinv.attacks.components.replay import matching_cost
from gradinv.fl.functional import stateless_twin


def timings(model: str, batch: int, restarts: int, repeats: int) -> dict:
    ds, sc = photo_case(model=model)
    obs = sc.observe()
    labels = torch.arange(batch) % 10
    prior = lambda x: 1e-4 * total_variation(x)  # noqa: E731
    func = matching_cost(obs, objective=cosine, prior=prior)
    auto = matching_cost(obs, objective=cosine, prior=prior, autograd=True)
    x = torch.randn(restarts, batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    step_func = vmap(grad_and_value(lambda xr: func(xr, labels)))

    def step_autograd() -> None:
        for r in range(restarts):
            xr = x[r].clone().requires_grad_(True)
            torch.autograd.grad(auto(xr, labels), xr)

    twin = stateless_twin(obs.model, train_mode=False)
    params, buffers = dict(obs.parameters), dict(obs.buffers)

    def forward() -> None:
        with torch.no_grad():
            for r in range(restarts):
                functional_call(twin, (params, buffers), (x[r],))

    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def first_order() -> None:
        for r in range(restarts):
            out = functional_call(twin, (leaf, buffers), (x[r],))
            torch.autograd.grad(torch.nn.functional.cross_entropy(out, labels), list(leaf.values()))

    row = {"model": model, "batch": batch, "restarts": restarts}
    for name, fn in (
        ("forward", forward),
        ("gradient", first_order),
        ("func", lambda: step_func(x)),
        ("autograd", step_autograd),
    ):
        row[name] = median_seconds(fn, repeats=repeats)
    row["auto_picks"] = "autograd" if use_autograd(MatchingSettings(), restarts, torch.device("cpu")) else "func"
    return row


def backend_timings(model: str, batch: int, repeats: int) -> dict:
    """One DLG-style evaluation (Euclidean matching, autograd replay, gradient w.r.t. the candidate) with oneDNN's
    convolutions and with PyTorch's native ones, alternating, ``repeats`` medians each."""
    _, sc = photo_case(model=model)
    obs = sc.observe()
    labels = torch.arange(batch) % 10
    cost = matching_cost(obs, objective=euclidean, autograd=True)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def evaluate() -> None:
        torch.autograd.grad(cost(x, labels), x)

    times: dict[bool, list[float]] = {True: [], False: []}
    enabled = torch.backends.mkldnn.enabled
    try:
        for _ in range(3):
            for onednn in (True, False):
                torch.backends.mkldnn.enabled = onednn
                times[onednn].append(median_seconds(evaluate, repeats=repeats))
    finally:
        torch.backends.mkldnn.enabled = enabled
    macs = convolution_macs(obs.model, (3, 32, 32), batch)
    onednn, native = min(times[True]), min(times[False])
    return {
        "model": model,
        "batch": batch,
        "macs": macs,
        "onednn": onednn,
        "native": native,
        "picks": "native" if macs is not None and 0 < macs <= NATIVE_CONV_MACS else "onednn",
    }


def markdown(title: str, header: list[str], cells: list[list[object]]) -> list[str]:
    """The title, a blank line and a Markdown table."""
    rows = [header, ["---"] * len(header), *cells]
    return [title, "", *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def backends(args, run) -> None:
    rows = [
        backend_timings(m, int(b), args.repeats) for m in args.models.split(",") for b in args.batch_sizes.split(",")
    ]
    title = (
        f"Seconds per DLG evaluation (Euclidean matching, autograd replay, gradient w.r.t. the candidate), oneDNN vs "
        f"PyTorch's native CPU convolutions, best of 3 alternating medians of {args.repeats}, {run['threads']} "
        f"threads; gradinv runs native kernels up to {NATIVE_CONV_MACS:,} multiply-accumulates per forward pass"
    )
    header = ["model", "batch", "conv MACs", "oneDNN", "native", "native / oneDNN", "gradinv picks"]
    cells = [
        [r["model"], r["batch"], f"{r['macs']:,}", f"{r['onednn']:.5f}", f"{r['native']:.5f}"]
        + [f"{r['native'] / r['onednn']:.2f}", r["picks"]]
        for r in rows
    ]
    lines = markdown(title, header, cells)
    write_results(args.out, "engine_backends", run, {"rows": rows}, "\n".join(lines))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", default="convnet,resnet18")
    p.add_argument("--restarts", default="1,8")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", action="store_true", help="time oneDNN vs native convolutions instead")
    args = p.parse_args()
    run = setup(args)
    if args.quick:
        args.models, args.restarts, args.repeats = "convnet", "1,2", 1
    if args.backends:
        return backends(args, run)
    rows = [
        timings(m, int(b), int(r), args.repeats)
        for m in args.models.split(",")
        for b in args.batch_sizes.split(",")
        for r in args.restarts.split(",")
    ]
    title = (
        f"Seconds per engine step (cost + gradient w.r.t. all restarts' candidates), median of {args.repeats}, "
        f"{run['threads']} threads"
    )
    header = ["model", "batch", "restarts", "forward", "1st-order gradient", "func (vmap)", "autograd (loop)"]
    cells = [
        [r["model"], r["batch"], r["restarts"], *(f"{r[k]:.4f}" for k in ("forward", "gradient", "func", "autograd"))]
        + [f"{r['autograd'] / r['func']:.2f}", r["auto_picks"]]
        for r in rows
    ]
    lines = markdown(title, [*header, "autograd / func", "auto picks"], cells)
    write_results(args.out, "engine", run, {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
