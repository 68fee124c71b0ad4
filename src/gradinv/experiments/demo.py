"""The README's main job: a small audit of a default deployment, in one picture a newcomer reads at a glance.

Four runs over the runner, on bundled data, about a minute on two CPU cores:

- a malicious server (Robbing the Fed, Fowl et al. 2022) plants an imprint layer and reads a client's batch of
  digits exactly out of one update;
- an honest-but-curious server rebuilds a private photo from one FedSGD gradient of LeNet with iDLG (Zhao et
  al. 2020: the label read from the gradient's signs, then L-BFGS gradient matching);
- the labels of a batch of 24 leak exactly from the classifier's update (iLRG, Ma et al. 2023);
- the client adds Gaussian noise to its update (a Table 2 defense) and the same attack fails.

(Inverting Gradients, the attack for deeper networks, needs thousands of iterations for a sharp picture: see
``gradinv reproduce``.)

Writes ``demo.png`` (the picture), ``demo.md`` (the same in words), the results store and ``report.html``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradinv._atomic import atomic_path
from gradinv.experiments.case import Case, Seeds
from gradinv.experiments.runner import LABELS, Cell

DEFENSE = "noise:0.1"


def demo_cells(seed: int = 0) -> dict[str, Cell]:
    """The demo's four cells, by role."""
    photo = Case(model="lenet", data="photos", seeds=Seeds.all(seed))
    return {
        "server": Cell(
            Case(model="mlp", data="digits", batch_size=8, server="imprint:64", seeds=Seeds.all(seed)), "rtf"
        ),
        "iterative": Cell(photo, "idlg"),
        "labels": Cell(Case(model="mlp", data="digits", batch_size=24, seeds=Seeds.all(seed)), LABELS + "ilrg"),
        "defended": Cell(photo.replace(defenses=(DEFENSE,)), "idlg"),
    }


def run_demo(*, out: str | Path = "runs/demo", progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Run the demo into ``out`` (rerunning reuses finished runs) and draw ``demo.png``; returns the records by
    role."""
    from gradinv.experiments.executors import run_cells
    from gradinv.experiments.grid import write_report_for
    from gradinv.experiments.store import Store

    out = Path(out)
    cells = demo_cells(seed)
    with Store(out) as store:
        records = run_cells(list(cells.values()), store, resume=True, progress=progress)
        store.set_meta(name="demo", grid={role: c.to_dict() for role, c in cells.items()})
    by_role = dict(zip(cells, records, strict=True))
    lines = summary_lines(by_role)
    draw(out, by_role, lines)
    with atomic_path(out / "demo.md") as tmp:
        Path(tmp).write_text(
            "# gradinv demo: does this deployment leak?\n\n" + "\n".join(f"- {l}" for l in lines) + "\n"
        )
    write_report_for(out)
    print("\n".join(lines))
    print(f"-> {out}/demo.png, demo.md, report.html")
    return by_role


def summary_lines(r: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What the four runs show, in a sentence each."""
    s, i, lab, d = r["server"], r["iterative"], r["labels"], r["defended"]
    n = len(s["psnr_per_sample"] or [])
    found = round((s["recovered_fraction_40db"] or 0) * n)
    return [
        f"Malicious server (Robbing the Fed): {found} of {n} private digits read exactly (> 40 dB) out of one update.",
        f"Honest server, iDLG: the private photo rebuilt from one gradient of LeNet at {i['psnr']:.1f} dB PSNR "
        f"(SSIM {i['ssim']:.2f}), label {'right' if i['label_accuracy'] == 1 else 'wrong'}, in {i['seconds']:.0f} s.",
        f"Labels (iLRG): the class counts of a batch of 24 recovered with {100 * lab['label_count']:.0f}% accuracy.",
        f"Defense: with Gaussian noise on the update (std 0.1 x its RMS) the same attack gets {d['psnr']:.1f} dB"
        + (": the photo no longer leaks." if d["psnr"] < 15 else "."),
    ]


def draw(out: Path, r: Mapping[str, Mapping[str, Any]], lines: Sequence[str]) -> Path:
    """``demo.png``: each run's private images above what the server rebuilt, with its sentence beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def arrays(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        with np.load(out / Path(record["image"]).with_suffix(".npz")) as saved:
            return saved["truth"].transpose(0, 2, 3, 1), saved["reconstruction"].transpose(0, 2, 3, 1)

    fig = plt.figure(figsize=(13, 8))
    fig.suptitle("gradinv demo: what one shared update leaks, and what a defense changes", fontsize=14, y=0.985)
    grid = fig.add_gridspec(4, 2, width_ratios=(1.35, 1), hspace=0.45, wspace=0.05, left=0.02, right=0.98)

    def strip(row: int, truth: np.ndarray, rec: np.ndarray, captions: Sequence[str]) -> None:
        sub = grid[row, 0].subgridspec(2, len(truth), hspace=0.05, wspace=0.05)
        for j in range(len(truth)):
            for k, img in enumerate((truth[j], rec[j])):
                ax = fig.add_subplot(sub[k, j])
                ax.imshow(img.squeeze() if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel("private" if k == 0 else "rebuilt", fontsize=8)
                if k == 1:
                    ax.set_xlabel(captions[j], fontsize=7)

    s_truth, s_rec = arrays(r["server"])
    strip(0, s_truth, s_rec, [f"{p:.0f} dB" for p in r["server"]["psnr_per_sample"]])
    i_truth, i_rec = arrays(r["iterative"])
    _, d_rec = arrays(r["defended"])
    both = np.concatenate([i_truth, i_truth])
    captions = [f"{r['iterative']['psnr']:.1f} dB", f"with noise: {r['defended']['psnr']:.1f} dB"]
    strip(1, both, np.concatenate([i_rec, d_rec]), captions)
    ax = fig.add_subplot(grid[2, 0])
    lab = r["labels"]
    classes = sorted(set(lab["labels_true"]) | set(lab["labels_recovered"] or []))
    true = [lab["labels_true"].count(c) for c in classes]
    got = [(lab["labels_recovered"] or []).count(c) for c in classes]
    x = np.arange(len(classes))
    ax.bar(x - 0.2, true, 0.4, label="true", color="0.35")
    ax.bar(x + 0.2, got, 0.4, label="recovered (iLRG)", color="tab:red")
    ax.set_xticks(x, [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("class (digits, batch 24)", fontsize=8)
    ax.set_ylabel("samples", fontsize=8)
    ax.legend(fontsize=8)
    texts = [lines[0], lines[1] + "\n" + lines[3], lines[2]]
    for row, text in enumerate(texts):
        tax = fig.add_subplot(grid[row, 1])
        tax.axis("off")
        tax.text(0.02, 0.5, _wrap(text, 62), va="center", fontsize=10)
    vax = fig.add_subplot(grid[3, :])
    vax.axis("off")
    vax.text(0.01, 0.6, verdict(r), fontsize=10.5, va="center")
    path = out / "demo.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def verdict(r: Mapping[str, Mapping[str, Any]]) -> str:
    """One line on what leaked (40 dB: exact; 20 dB: recognisable) and what to run next."""
    leaks = []
    if (r["server"]["recovered_fraction_40db"] or 0) > 0:
        leaks.append("to a malicious server, exactly")
    if (r["iterative"]["psnr"] or 0) >= 20:
        leaks.append("to an honest one, by optimisation")
    labels = (r["labels"]["label_count"] or 0) >= 0.9
    head = (
        f"Verdict: this deployment leaks its clients' images ({'; '.join(leaks)})"
        + (" and labels" if labels else "")
        + f"; noise of std 0.1 x RMS {'stops' if (r['defended']['psnr'] or 0) < 15 else 'does not stop'} the honest "
        "server's attack."
        if leaks
        else "Verdict: no image leaked in these runs."
    )
    return (
        head
        + "\nNext: gradinv audit (your model, batch, local steps, defenses), gradinv bench defenses, gradinv reproduce."
    )


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))
