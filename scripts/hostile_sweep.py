"""A hostile-input sweep of `geovae segment`: signals at random moments, full disks, odd names.

Not part of the test suite (minutes of runs, and the full disks need root for a small tmpfs);
the suite holds one deterministic test per case. Each run is classified by what it left:

* signals: SIGTERM or SIGINT at a random moment of a run into an empty folder or over a
  previous set. A run ends ``clean`` (exit 143/130 and the folder exactly as before: empty,
  or the previous set byte for byte), ``complete`` (the signal came after the last check:
  the new set, each file listed by its report), ``finished before the signal``, ``killed
  by the signal`` (its default action, before geovae set its handlers: the folder as
  before), or ``BROKEN`` (anything else: files without a report, a staging folder or lock
  left, another exit code, a hang).
* batch signals: SIGTERM to `geovae batch` (4 copies of the scene in folders a/ to d/, 2
  local workers) or SIGINT to its process group (a terminal's Ctrl-C, which reaches the
  workers too) at a random moment. ``clean`` (exit 143/130 and one line, every scene
  folder either without visible files or complete with its report; the staging folders of
  the scenes the stop cut are left for the next run), ``finished before the signal`` or
  ``BROKEN``.
* full disks (root only): a tmpfs of each size; ``one line`` (exit 1, one line saying no
  space is left, nothing left on the disk), ``fits`` (exit 0, a complete set) or ``BROKEN``.
* names: scene names of several lengths and scripts; ``ok`` (exit 0, outputs named after
  the scene, a STAC item whose hrefs are URI references) or ``refused`` (exit 1, one line
  saying the name is too long, no folder made) or ``BROKEN``.

Usage (from the repository root, with the shared data)::

    GEOVAE_TEST_DATA=/work/shared/data .venv/bin/python scripts/hostile_sweep.py --signals 32 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

STEM = "nc_lsat7_2000_6band_uint8"
BAD_HREF = re.compile(r'[\x00-\x20\x7f<>"{}|\\^`]|%(?![0-9A-Fa-f]{2})')
ARGS = ["--samples", "2", "--formats", "gpkg,geojson,parquet"]


def _digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _segment(scene: Path, model: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "geovae",
        "-q",
        "segment",
        str(scene),
        "-m",
        str(model),
        "-o",
        str(out),
        *ARGS,
        *extra,
    ]


def _complete(folder: Path, stem: str) -> bool:
    """The folder holds exactly the files its report lists (and nothing hidden)."""
    report = folder / f"{stem}.json"
    if not report.is_file():
        return False
    listed = set(json.loads(report.read_text())["outputs"].values())
    return listed == {p.name for p in folder.iterdir()}


def sweep_signals(scene: Path, model: Path, work: Path, n: int, rng: random.Random) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    t0 = time.monotonic()
    subprocess.run(_segment(scene, model, work / "timing"), check=True, capture_output=True)
    whole = time.monotonic() - t0
    print(f"one run takes {whole:.1f} s; {n} runs, signals at uniform times in [0, {whole * 1.1:.1f}] s")
    for i in range(n):
        signum = rng.choice([signal.SIGTERM, signal.SIGINT])
        over = rng.random() < 0.5
        out = work / f"sig{i}"
        if over:
            shutil.copytree(work / "timing", out)
        before = _digest(out)
        at = rng.uniform(0, whole * 1.1)
        p = subprocess.Popen(_segment(scene, model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(at)
        p.send_signal(signum)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            counts["BROKEN: hang"] += 1
            continue
        want = 143 if signum == signal.SIGTERM else 130
        said = "geovae: terminated" if signum == signal.SIGTERM else "geovae: interrupted"
        hidden = [q.name for q in out.iterdir() if q.name.startswith(".")] if out.exists() else []
        name = signal.Signals(signum).name
        where = "over a set" if over else "into an empty folder"
        if p.returncode == -signum:
            # The default action: the signal came before geovae set its handlers (the first
            # tenths of a second, while Python imports) or after it reset them.
            if hidden:
                kind = f"BROKEN: killed by the signal, left {hidden}"
            elif _digest(out) == before:
                kind = "killed by the signal (default action), folder as before"
            elif _complete(out, STEM):
                kind = "killed by the signal (default action) after its commit, the new set complete"
            else:
                kind = "BROKEN: killed by the signal, files without their report"
        elif p.returncode == 0:
            kind = "finished before the signal" if _complete(out, STEM) and not hidden else "BROKEN: exit 0"
        elif p.returncode != want or err.strip() != said:
            kind = f"BROKEN: exit {p.returncode}: {err.strip()[:120]!r}"
        elif hidden:
            kind = f"BROKEN: left {hidden}"
        elif _digest(out) == before:
            kind = "clean (folder as before)"
        elif _complete(out, STEM):
            kind = "complete (stopped after the commit)"
        else:
            kind = "BROKEN: files without their report"
        counts[f"{name} {where}: {kind}"] += 1
        print(f"  run {i}: {name} at {at:.2f} s {where}: {kind}")
        shutil.rmtree(out, ignore_errors=True)
    return counts


def sweep_batch_signals(scene: Path, model: Path, work: Path, n: int, rng: random.Random) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    scenes = []
    for d in "abcd":
        (work / "scenes" / d).mkdir(parents=True, exist_ok=True)
        scenes.append(work / "scenes" / d / "y.tif")
        shutil.copy(scene, scenes[-1])

    def cmd(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "geovae",
            "-q",
            "batch",
            *map(str, scenes),
            "-m",
            str(model),
            "-o",
            str(out),
            *ARGS,
        ]

    t0 = time.monotonic()
    subprocess.run(cmd(work / "btiming"), check=True, capture_output=True)
    whole = time.monotonic() - t0
    print(f"one batch takes {whole:.1f} s; {n} runs, signals at uniform times in [0, {whole * 1.1:.1f}] s")
    for i in range(n):
        group = rng.random() < 0.5
        signum = signal.SIGINT if group else signal.SIGTERM
        out = work / f"bsig{i}"
        at = rng.uniform(0, whole * 1.1)
        p = subprocess.Popen(
            cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        time.sleep(at)
        if group:
            os.killpg(p.pid, signum)
        else:
            p.send_signal(signum)
        try:
            _, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            counts["BROKEN: hang"] += 1
            continue
        time.sleep(2)  # the workers' own exit
        folders = [d for d in out.iterdir() if d.is_dir()] if out.exists() else []
        half = [
            d.name for d in folders if any(not q.name.startswith(".") for q in d.iterdir()) and not _complete_batch(d)
        ]
        want = 143 if signum == signal.SIGTERM else 130
        said = "geovae: terminated" if signum == signal.SIGTERM else "geovae: interrupted"
        who = "SIGINT to the group" if group else "SIGTERM to batch"
        if half:
            kind = f"BROKEN: scene folders without their report {half}"
        elif p.returncode == 0:
            kind = "finished before the signal"
        elif p.returncode == want and err.strip() == said:
            kind = "clean (one line)"
        else:
            kind = f"BROKEN: exit {p.returncode}, {len(err.strip().splitlines())} lines: {err.strip()[-120:]!r}"
        counts[f"batch, {who}: {kind}"] += 1
        print(f"  batch run {i}: {who} at {at:.2f} s: {kind}")
        shutil.rmtree(out, ignore_errors=True)
    return counts


def _complete_batch(folder: Path) -> bool:
    """A batch scene folder holds its report and every file the report lists (the marker
    and the hidden staging folders of cut scenes aside)."""
    report = folder / "y.json"
    if not report.is_file():
        return False
    listed = set(json.loads(report.read_text())["outputs"].values())
    return listed == {q.name for q in folder.iterdir() if not q.name.startswith(".") and q.name != "_SUCCESS"}


def sweep_disks(scene: Path, labels: Path, model: Path, sizes: list[str]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    if os.geteuid() != 0:
        print("full disks: skipped (a tmpfs needs root)")
        return counts
    for size in sizes:
        mnt = Path(tempfile.mkdtemp(prefix="geovae-full-"))
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        try:
            runs = {
                "segment": (_segment(scene, model, mnt / "o"), lambda m=mnt: _complete(m / "o", STEM)),
                "vectorize": (
                    [sys.executable, "-m", "geovae", "vectorize", str(labels), "-o", str(mnt / "p.gpkg")],
                    lambda m=mnt: [q.name for q in m.iterdir()] == ["p.gpkg"],
                ),
            }
            for what, (cmd, fits) in runs.items():
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                lines = p.stderr.strip().splitlines()
                left = [q.name for q in mnt.iterdir()]
                if p.returncode == 0 and not lines and fits():
                    kind = "fits"
                elif p.returncode == 1 and len(lines) == 1 and "no space left" in lines[0] and not left:
                    kind = "one line, nothing left"
                else:
                    kind = f"BROKEN: exit {p.returncode}, {len(lines)} lines {lines[:2]}, left {left}"
                counts[f"{what} onto {size}: {kind}"] += 1
                print(f"  {what} onto a {size} disk: {kind}")
                for q in mnt.iterdir():
                    shutil.rmtree(q) if q.is_dir() else q.unlink()
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
            mnt.rmdir()
    return counts


def sweep_names(scene: Path, model: Path, work: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    letters = {"latin": "a", "accented": "é", "greek": "λ", "cjk": "語", "emoji": "🛰", "mixed": "scène v1.2 #%"}
    for script, ch in letters.items():
        for length in (1, 20, 60, 120, 200, 230, 250):
            stem = (ch * length)[:length] if len(ch) == 1 else (ch * (length // len(ch) + 1))[:length]
            stem = stem.strip() or "x"
            if len(os.fsencode(stem + ".tif")) > 255:
                counts[f"{script}: longer than the filesystem allows (not made)"] += 1
                continue
            folder = work / "names" / f"{script}{length}"
            folder.mkdir(parents=True)
            link = folder / f"{stem}.tif"
            link.symlink_to(scene)
            out = folder / "out"
            p = subprocess.run(_segment(link, model, out, ("--no-quicklook",)), capture_output=True, text=True)
            lines = p.stderr.strip().splitlines()
            if p.returncode == 0:
                item = json.loads((out / f"{stem}.stac.json").read_text())
                hrefs = [a["href"] for a in item["assets"].values()] + [ln["href"] for ln in item["links"]]
                bad = [h for h in hrefs if BAD_HREF.search(h)]
                kind = "ok" if _complete(out, stem) and not bad else f"BROKEN: hrefs {bad[:2]}"
            elif p.returncode == 1 and len(lines) == 1 and "too long" in lines[0] and not out.exists():
                kind = "refused, one line"
            else:
                kind = f"BROKEN: exit {p.returncode}: {p.stderr.strip()[:160]!r}"
            counts[f"{script}: {kind}"] += 1
            print(f"  {script} x{length} ({len(os.fsencode(stem))} bytes): {kind}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signals", type=int, default=32, help="runs stopped by a signal")
    ap.add_argument("--batch-signals", type=int, default=0, help="batches stopped by a signal")
    ap.add_argument("--disks", default="64k,400k,1200k,1600k,3m", help="tmpfs sizes (root only)")
    ap.add_argument("--no-names", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from conftest import data_path
    from test_outputs import _model_for

    scene = data_path("nc_landsat7_landclass96", f"{STEM}.tif")
    labels = data_path("nc_landsat7_landclass96", "nc_landclass96_label_uint8.tif")
    work = Path(tempfile.mkdtemp(prefix="geovae-sweep-"))
    model = _model_for(scene, work / "m.safetensors")
    rng = random.Random(args.seed)
    total: collections.Counter[str] = collections.Counter()
    try:
        if args.signals:
            total += sweep_signals(scene, model, work, args.signals, rng)
        if args.batch_signals:
            total += sweep_batch_signals(scene, model, work, args.batch_signals, rng)
        if args.disks:
            total += sweep_disks(scene, labels, model, args.disks.split(","))
        if not args.no_names:
            total += sweep_names(scene, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\ncounts:")
    for k, v in sorted(total.items()):
        print(f"  {v:3d}  {k}")
    if any(k.startswith("BROKEN") or ": BROKEN" in k for k in total):
        sys.exit(1)


if __name__ == "__main__":
    main()
