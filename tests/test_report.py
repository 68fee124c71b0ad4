"""The grid report: one self-contained HTML file and a CSV, checked structurally with the stdlib parser (and, with
``-m browser`` where Chromium is installed, rendered by a real browser)."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import itertools
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from gradinv.experiments.report import (
    CSV_COLUMNS,
    defense_short,
    defense_strength,
    parse_spec,
    protocol_short,
    render_html,
    summarize,
    write_csv,
    write_report,
)

REQUIRED_CSV = {
    "attack",
    "model",
    "data",
    "batch_size",
    "defenses",
    "seed",
    "status",
    "psnr",
    "ssim",
    "label_accuracy",
    "seconds",
    "protocol",
    "clients",
    "image_size",
    "recovered_fraction_40db",
    "dp_epsilon",
    "utility",
    "reason",
    "key",
}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
NOISE = "noise:std={},clip=null,distribution=gaussian"
DECLINED_REASON = 'needs <BatchNorm> in "train" mode & a batch > 1'
FAILED_REASON = "<script>alert('x')</script> diverged"


class Page(HTMLParser):
    """Collects what the tests look at, and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.table_ids: list[str | None] = []
        self.rows: dict[str, list[dict[str, str | None]]] = {}
        self.text: list[str] = []
        self._tables: list[str | None] = []
        self._in_tbody = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._tables.append(attrs.get("id"))
            self.table_ids.append(attrs.get("id"))
        elif tag == "tbody":
            self._in_tbody += 1
        elif tag == "tr" and self._in_tbody and self._tables and self._tables[-1]:
            self.rows.setdefault(self._tables[-1], []).append(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()
        if tag == "table":
            self._tables.pop()
        elif tag == "tbody":
            self._in_tbody -= 1

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, cls: str | None = None, **want: str) -> list[dict[str, str | None]]:
        """Attributes of every ``tag`` having class ``cls`` (if given) and the attribute values ``want``."""
        return [
            attrs
            for t, attrs in self.tags
            if t == tag
            and (cls is None or cls in (attrs.get("class") or "").split())
            and all(attrs.get(k) == v for k, v in want.items())
        ]


def parse(page: str) -> Page:
    p = Page()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed: {p.stack}"
    return p


def _png(path: Path, seed: int) -> None:
    """A small truth-over-reconstruction-like picture: two rows of 3 tiles, 16 px each."""
    img = Image.new("RGB", (48, 32))
    px = img.load()
    for x in range(48):
        for y in range(32):
            px[x, y] = ((x * 5 + seed * 40) % 256, (y * 8) % 256, ((x + y) * 3 + seed * 90) % 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


_KEYS = itertools.count(0xC0FFEE)


def _rec(**kw) -> dict:
    base = {
        "key": None,
        "status": "ok",
        "reason": None,
        "attack": "invertinggradients",
        "model": "convnet",
        "model_options": {},
        "data": "photos",
        "image_size": 32,
        "batch_size": 1,
        "protocol": {"name": "fedsgd"},
        "clients": 1,
        "defenses": [],
        "seed": 0,
        "seeds": {"model": 0, "data": 0, "defense": 0, "attack": 0},
        "trained_steps": 0,
        "psnr": 20.0,
        "psnr_per_sample": [20.0],
        "ssim": 0.6,
        "label_accuracy": 1.0,
        "recovered_fraction_40db": None,
        "dp_epsilon": None,
        "update_cosine": 0.99,
        "utility": None,
        "seconds": 12.5,
        "seconds_total": 14.0,
        "threads": 2,
        "device": "cpu",
        "versions": {"gradinv": "0.1.0", "torch": "2.4.0"},
        "image": None,
    }
    base.update(kw)
    base["key"] = base["key"] or f"{next(_KEYS):016x}"
    return base


@pytest.fixture
def run(tmp_path):
    """A varied little grid: two attacks, two batch sizes, noise at three strengths, a prune, a stack, utility, a
    declined and a failed cell, two real pictures and one missing."""
    _png(tmp_path / "images" / "a.png", 0)
    _png(tmp_path / "images" / "b.png", 1)
    recs = [
        _rec(seed=0, psnr=24.0, image="images/a.png", utility=0.81),
        _rec(seed=1, psnr=26.0, image="images/b.png", utility=0.80),
        _rec(batch_size=4, psnr=16.0, label_accuracy=0.75),
        _rec(batch_size=4, seed=1, psnr=17.0, image="images/missing.png"),
        _rec(defenses=[NOISE.format(0.001)], psnr=22.0, utility=0.79),
        _rec(defenses=[NOISE.format(0.01)], psnr=15.0, utility=0.70),
        _rec(defenses=[NOISE.format(0.1)], psnr=9.0, utility=0.40, dp_epsilon=float("inf")),
        _rec(defenses=["prune:fraction=0.9"], psnr=18.0),
        _rec(defenses=[NOISE.format(0.01), "prune:fraction=0.9"], psnr=12.0),
        _rec(attack="robbing", batch_size=4, psnr=80.0, recovered_fraction_40db=0.5, label_accuracy=None),
        _rec(attack="robbing", batch_size=1, psnr=90.0, recovered_fraction_40db=1.0, label_accuracy=None),
        _rec(attack="rgap", model="resnet18", status="declined", reason=DECLINED_REASON, psnr=None, ssim=None),
        _rec(attack="rgap", status="failed", reason=FAILED_REASON, psnr=None, ssim=None, seconds=None),
    ]
    return tmp_path, recs


def _meta():
    return {"attacks": ["invertinggradients", "robbing", "rgap"], "seeds": [0, 1], "note": "<b>bold?</b>"}


def test_write_report_files(run):
    root, recs = run
    html_path, csv_path = write_report(root, recs, title="Grid <A&B>", meta=_meta())
    assert html_path == root / "report.html" and csv_path == root / "results.csv"
    assert sorted(p.name for p in root.iterdir()) == ["images", "report.html", "results.csv"]  # no temp files left
    # a second write replaces both in place
    write_report(root, recs[:2], title="again")
    assert sorted(p.name for p in root.iterdir()) == ["images", "report.html", "results.csv"]
    assert len(parse(html_path.read_text("utf-8")).rows["results"]) == 2


def test_tables_one_row_per_record_and_group(run):
    root, recs = run
    page = render_html(recs, root=root, title="grid", meta=_meta())
    p = parse(page)
    assert "results" in p.table_ids and "summary" in p.table_ids
    assert len(p.rows["results"]) == len(recs)
    assert all("cell" in (r.get("class") or "").split() for r in p.rows["results"])
    assert sorted(r["data-key"] for r in p.rows["results"]) == sorted(r["key"] for r in recs)
    groups = summarize(recs)
    assert len(p.rows["summary"]) == len(groups) == 11  # the two seeds of two setups share a row
    statuses = [(r.get("class") or "").split()[1] for r in p.rows["results"]]
    assert statuses.count("status-ok") == 11 and statuses.count("status-declined") == 1
    assert statuses.count("status-failed") == 1
    # header counts and the meta in a collapsible block
    text = " ".join(p.text)
    assert "11 ok" in text and "1 declined" in text and "1 failed" in text
    assert p.all("details", id="meta") and "Grid settings" in text
    assert "<b>bold?</b>" in text and "<b>bold" not in page  # escaped in the source, readable as text


def test_summary_medians():
    recs = [_rec(seed=s, psnr=v, ssim=v / 100, label_accuracy=1.0) for s, v in enumerate((10.0, 30.0, 20.0))]
    recs.append(_rec(seed=3, status="failed", reason="boom", psnr=None))
    (row,) = summarize(recs)
    assert row["psnr"] == 20.0 and row["ssim"] == pytest.approx(0.2)
    assert (row["cells"], row["ok"], row["failed"]) == (4, 3, 1)
    # specs that differ only outside the short label still make separate groups
    rows = summarize([_rec(defenses=[NOISE.format(0.01)]), _rec(defenses=["noise:std=0.01,clip=1.0"])])
    assert len(rows) == 2 and {r["defenses"] for r in rows} == {"noise std=0.01"}


def test_images_are_decodable_data_uris(run):
    root, recs = run
    p = parse(render_html(recs, root=root, title="grid"))
    imgs = p.all("img")
    assert imgs
    for attrs in imgs:
        src = attrs["src"] or ""
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:60]
        try:
            payload = base64.b64decode(src[len(prefix) :], validate=True)
        except binascii.Error as exc:  # pragma: no cover - the assertion message is the point
            pytest.fail(f"bad base64: {exc}")
        with Image.open(io.BytesIO(payload)) as im:
            assert im.format == "PNG"
            im.verify()
    figures = p.all("figure", cls="cell-image")
    assert len(figures) == 2  # a.png and b.png; the missing one is a note
    # small pictures are shown enlarged by a whole factor: 48 x 32 px -> 4x
    cell_imgs = [a for a in imgs if " · seed " in (a.get("alt") or "")]
    assert [(a["width"], a["height"]) for a in cell_imgs] == [("192", "128")] * 2
    captions = " ".join(p.text)
    assert "PSNR 24.00 dB" in captions and "seed 1" in captions
    assert "images/missing.png could not be read" in captions
    # every picture is linked from its row, and every link points into the page
    anchors = {f["id"] for f in figures}
    hrefs = {a["href"] for a in p.all("a")}
    assert {"#" + a for a in anchors} <= hrefs


def test_image_outside_root_or_not_png_is_a_note(tmp_path):
    (tmp_path / "root").mkdir()
    _png(tmp_path / "outside.png", 0)
    (tmp_path / "root" / "fake.png").write_bytes(b"GIF89a not a png")
    recs = [_rec(image="../outside.png"), _rec(seed=1, image="fake.png")]
    p = parse(render_html(recs, root=tmp_path / "root", title="t"))
    assert not p.all("img")
    text = " ".join(p.text)
    assert "outside the report folder" in text and "is not a PNG" in text


def test_no_external_references(run):
    root, recs = run
    page = render_html(recs, root=root, title="grid", meta={"url": "https://example.org/x"})
    p = parse(page)
    for tag, attrs in p.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base"), tag
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value is None:
                continue
            assert value.startswith(("data:image/png;base64,", "#")), f"<{tag} {name}={value[:60]}>"
    style = "".join(p.text)  # the css is <style> text
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    assert "https://example.org/x" in " ".join(p.text)  # shown as text, not as a link


def test_plots_present_when_things_vary(run):
    root, recs = run
    p = parse(render_html(recs, root=root, title="grid"))
    ids = {f["id"] for f in p.all("figure", cls="plot")}
    assert ids == {"plot-batch", "plot-defense", "plot-utility"}


def test_plots_absent_when_nothing_varies(tmp_path):
    recs = [_rec(seed=s, psnr=20.0 + s) for s in range(3)]
    p = parse(render_html(recs, root=tmp_path, title="flat"))
    assert not p.all("figure", cls="plot")
    assert not p.all("section", id="plots")
    # one axis at a time
    batch = [_rec(batch_size=b, psnr=30.0 - b) for b in (1, 2, 8)]
    p = parse(render_html(batch, root=tmp_path, title="b"))
    assert {f["id"] for f in p.all("figure", cls="plot")} == {"plot-batch"}
    defended = [_rec(defenses=["prune:fraction=" + str(f)], psnr=30.0 * (1 - f)) for f in (0.5, 0.9)]
    p = parse(render_html(defended, root=tmp_path, title="d"))
    assert {f["id"] for f in p.all("figure", cls="plot")} == {"plot-defense"}
    # defenses without a numeric strength give no strength plot
    signs = [_rec(defenses=["sign:scaled=true"]), _rec(psnr=25.0)]
    assert not parse(render_html(signs, root=tmp_path, title="s")).all("figure", cls="plot")


def test_reasons_escaped(run):
    root, recs = run
    page = render_html(recs, root=root, title="grid")
    p = parse(page)
    assert "<script>" not in page and "<BatchNorm>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    text = " ".join(p.text)
    assert DECLINED_REASON in text and FAILED_REASON in text


def test_empty_records(tmp_path):
    p = parse(render_html([], root=tmp_path, title="nothing yet"))
    assert "results" in p.table_ids and "summary" in p.table_ids
    assert not p.rows.get("results") and not p.all("img")
    assert "0 ok" in " ".join(p.text)


def test_csv(run):
    root, recs = run
    path = write_csv(recs, root / "sub" / "results.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        assert set(reader.fieldnames or ()) >= REQUIRED_CSV
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    assert len(rows) == len(recs)
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in recs)
    stacked = [r for r in rows if "prune" in r["defenses"] and "noise" in r["defenses"]]
    assert len(stacked) == 1
    assert stacked[0]["defenses"] == NOISE.format(0.01) + ";prune:fraction=0.9"
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["reason"] == FAILED_REASON and failed["psnr"] == "" and failed["seconds"] == ""
    assert {r["protocol"] for r in rows} == {"fedsgd"}
    assert float(next(r for r in rows if r["dp_epsilon"])["dp_epsilon"]) == float("inf")
    ok = next(r for r in rows if r["image"] == "images/a.png")
    assert float(ok["psnr"]) == 24.0 and ok["defenses"] == "" and ok["batch_size"] == "1"


def test_spec_helpers():
    assert parse_spec(NOISE.format(0.01)) == ("noise", {"std": 0.01, "clip": None, "distribution": "gaussian"})
    assert parse_spec("sign") == ("sign", {})
    assert defense_strength("prune:fraction=0.9") == ("prune", "fraction", 0.9)
    assert defense_strength("dpsgd:clip=1.0,noise_multiplier=0.5,delta=1e-05") == ("dpsgd", "noise_multiplier", 0.5)
    assert defense_strength("custom:level=3") == ("custom", "level", 3.0)
    assert defense_strength("sign:scaled=true") == ("sign", None, None)
    assert defense_short([]) == "none" and defense_short(None) == "none"
    assert defense_short([NOISE.format(0.01), "prune:fraction=0.9"]) == "noise std=0.01 + prune fraction=0.9"
    proto = {"name": "fedavg", "local_steps": 5, "lr": 0.1, "local_batch_size": None}
    assert protocol_short(proto) == "fedavg:local_steps=5,lr=0.1"
    assert protocol_short({"name": "fedsgd"}) == "fedsgd" and protocol_short(None) == ""


# ------------------------------------------------------------------------------------------------------ browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        binary,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


_CHECK_SCRIPT = """<pre id="check"></pre><script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var tables = Array.prototype.slice.call(document.querySelectorAll("table[id]")).map(function (t) {
    return [t.id, t.tBodies.length ? t.tBodies[0].rows.length : 0];
  });
  document.getElementById("check").textContent = JSON.stringify({
    images: imgs.length,
    decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    tables: Object.fromEntries(tables)
  });
});
</script>"""


class _Check(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.inside = tag == "pre" and dict(attrs).get("id") == "check"

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.found.append(data)


@pytest.mark.browser
def test_report_renders_in_chromium(run):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium / chromium-browser on PATH (make test-browser installs it)")
    root, recs = run
    html_path, _ = write_report(root, recs, title="Browser check", meta=_meta())

    shot = root / "shot.png"
    res = _browse(binary, root / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2400", html_path.as_uri())
    assert shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        stat = ImageStat.Stat(im.convert("L"))
        assert stat.var[0] > 100, f"blank screenshot (variance {stat.var[0]:.1f})"
        colors = im.convert("RGB").resize((320, 600)).getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50  # text, tables and pictures, not a flat page

    # a copy with a tiny inline check script: the browser reports how many images decoded and what tables exist
    probe = root / "probe.html"
    probe.write_text(html_path.read_text("utf-8").replace("</body>", _CHECK_SCRIPT + "</body>"), "utf-8")
    res = _browse(binary, root / "profile-dom", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    parser = _Check()
    parser.feed(res.stdout)
    assert parser.found, f"check script did not run; dom starts {res.stdout[:300]!r}"
    check = json.loads("".join(parser.found))
    n_img = len(parse(html_path.read_text("utf-8")).all("img"))
    assert check["images"] == n_img and n_img == 2 + 3  # two cell pictures and three plots
    assert check["decoded"] == n_img, check
    assert check["tables"]["results"] == len(recs)
    assert check["tables"]["summary"] == len(summarize(recs))
