"""How big is the edge install, and how fast does it import?

For each set of extras (default ``onnxruntime``, ``openvino`` and each with ``pipelines``), a fresh virtual environment under
WORK gets this checkout as a wheel with that extra, from the package index pip is configured
with (``pip install 'enginekit[EXTRA]'`` as a user types it). Measured per environment:

- ``site-packages`` on disk (``du``-style: the blocks of every file), less what any new virtual
  environment has before anything is installed (pip itself), and the heaviest distributions
  with the sizes of the files their RECORD lists;
- ``import enginekit`` time: the median over fresh interpreters, timed inside each (start-up not
  counted), after one warm-up run so the page cache is warm;
- ``load()`` + ``predict()`` of a tiny classifier artifact when ``--artifact`` names one built
  for that backend (proves the install runs, not only imports).

Targets (a small box's budget): ``[onnxruntime]`` <= 200 MB,
``[openvino]`` <= 300 MB, ``import enginekit`` < 0.1 s. The script prints a Markdown table and
writes ``WORK/install_size.json``; it exits 1 when a target is missed. Run::

    .venv/bin/python -m benchmarks.install_size out/install-size [--extra onnxruntime --extra openvino]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = {"onnxruntime": 200.0, "openvino": 300.0}
IMPORT_TARGET_S = 0.1

_SIZES = r"""
import json, os, sys, sysconfig
from importlib import metadata
site = sysconfig.get_paths()["purelib"]
def blocks(p):
    st = os.lstat(p)
    return getattr(st, "st_blocks", 0) * 512 or st.st_size
total = sum(blocks(os.path.join(d, f)) for d, _, fs in os.walk(site) for f in fs)
dists = {}
for dist in metadata.distributions(path=[site]):
    size = 0
    for f in dist.files or ():
        p = f.locate()
        if os.path.isfile(p):
            size += blocks(p)
    dists[dist.metadata["Name"]] = size
print(json.dumps({"total": total, "dists": dists}))
"""


def _du(python: Path) -> dict[str, Any]:
    out = subprocess.run([str(python), "-c", _SIZES], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _venv(where: Path) -> Path:
    if where.exists():
        shutil.rmtree(where)
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    return where / "bin" / "python"


def _import_s(python: Path, runs: int, cwd: Path) -> float:
    """Median seconds ``import enginekit`` takes inside fresh interpreters (timed in-process,
    so interpreter start-up is not counted), after one warm-up run."""
    code = "import time; t = time.perf_counter(); import enginekit; print(time.perf_counter() - t)"
    samples = [float(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True,
                                    cwd=cwd).stdout) for _ in range(runs + 1)]
    return statistics.median(samples[1:])


def _wheel(work: Path) -> Path:
    dist = work / "wheel"
    if dist.exists():
        shutil.rmtree(dist)
    # setuptools builds in the tree (build/, *.egg-info): leave the checkout as it was.
    before = {p for p in (ROOT / "build", ROOT / "enginekit.egg-info") if p.exists()}
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                       check=True, capture_output=True)
    finally:
        for made in {ROOT / "build", ROOT / "enginekit.egg-info"} - before:
            shutil.rmtree(made, ignore_errors=True)
    return next(dist.glob("enginekit-*.whl"))


def measure(work: Path, extra: str, wheel: Path, artifact: str | None, runs: int) -> dict[str, Any]:
    python = _venv(work / f"venv-{extra.replace(',', '-')}")
    empty = _du(python)["total"]
    log = work / f"pip-{extra.replace(',', '-')}.log"
    with log.open("w") as fh:
        subprocess.run([str(python), "-m", "pip", "install", f"{wheel}[{extra}]"], check=True, stdout=fh,
                       stderr=subprocess.STDOUT)
    sizes = _du(python)
    # Every interpreter runs outside the checkout: `python -c` puts the working folder first on
    # sys.path, and the checkout's enginekit/ folder would shadow the installed package.
    imported = _import_s(python, runs, work)
    heavy = subprocess.run([str(python), "-c", "import enginekit, sys; print(' '.join(sorted(m for m in "
                            "('torch', 'onnx', 'onnxruntime', 'openvino', 'numpy', 'PIL', 'rich', 'tokenizers') "
                            "if m in sys.modules)))"], check=True, capture_output=True, text=True, cwd=work).stdout.split()
    result: dict[str, Any] = {
        "extra": extra,
        "mb": round((sizes["total"] - empty) / 2**20, 1),
        "target_mb": TARGET_MB.get(extra),
        "import_s": round(imported, 4),
        "modules_after_import": heavy,
        "top": sorted(((n, round(s / 2**20, 1)) for n, s in sizes["dists"].items() if n not in ("pip", "setuptools")),
                      key=lambda kv: -kv[1])[:12],
    }
    if artifact:
        code = ("import enginekit, numpy as np; from PIL import Image; "
                f"clf = enginekit.load({artifact!r}); "
                "print(clf.predict(Image.fromarray(np.zeros((64, 64, 3), np.uint8)))[0])")
        run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=work)
        result["predict"] = "ok" if run.returncode == 0 else (run.stderr.strip().splitlines() or ["failed"])[-1]
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| install | MB on disk | target | `import enginekit` s | heaviest distributions (MB) |",
             "|---|---|---|---|---|"]
    for r in results:
        top = ", ".join(f"{n} {mb:g}" for n, mb in r["top"][:6])
        target = f"<= {r['target_mb']:g}" if r["target_mb"] else "-"
        lines.append(f"| `enginekit[{r['extra']}]` | {r['mb']:g} | {target} | {r['import_s']:.3f} | {top} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--extra", action="append",
                        help="extras to measure, comma-separated for several in one install (default: onnxruntime, "
                             "openvino, onnxruntime,pipelines, openvino,pipelines)")
    parser.add_argument("--artifact", action="append", default=[],
                        help="EXTRA=PATH: a tiny classifier artifact to load and predict with in that install")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    artifacts = dict(a.split("=", 1) for a in args.artifact)
    wheel = _wheel(args.work)
    results = [measure(args.work, extra, wheel, artifacts.get(extra), args.runs)
               for extra in (args.extra or ["onnxruntime", "openvino", "onnxruntime,pipelines", "openvino,pipelines"])]
    (args.work / "install_size.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    for r in results:
        print(f"{r['extra']}: modules loaded by `import enginekit`: {' '.join(r['modules_after_import']) or 'none'}"
              + (f"; predict: {r['predict']}" if "predict" in r else ""))
    missed = [r for r in results if (r["target_mb"] and r["mb"] > r["target_mb"]) or r["import_s"] >= IMPORT_TARGET_S
              or r.get("predict", "ok") != "ok"]
    return 1 if missed else 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
