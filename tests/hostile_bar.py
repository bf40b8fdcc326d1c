"""The hostile corpus of tests/test_hostile_configs.py as separate `evomerge merge` processes,
with each one's wall time and peak memory (the issue's bar: exit 2, one line, within 60 s, 6 GB).

    PYTHONPATH=. python tests/hostile_bar.py          # prints one row per case, then the worst
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_hostile_configs import FOLDERS, ONE, RECIPES, mk  # noqa: E402
from tiny import make_llm_family  # noqa: E402


def run(cfg: Path) -> tuple[int, list[str], float, float]:
    """(exit code, stderr lines, seconds, peak RSS in GB) of one merge process."""
    out = cfg.parent / "out"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "merge", str(cfg), "--out", str(out),
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    assert not out.exists(), cfg
    return os.waitstatus_to_exitcode(status), err.strip().splitlines(), seconds, usage.ru_maxrss / 2**20


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="evomerge-bar-"))
    clean = make_llm_family(root / "clean", n=2)
    worst_s = worst_gb = 0.0
    bad = []
    cases = [(f"recipe: {n}", build, None) for n, (build, _) in RECIPES.items()]
    cases += [(f"folder: {n}", None, spec) for n, spec in FOLDERS.items()]
    for name, build, folder_case in cases:
        case = root / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(clean["base"].parent, case / "fam")
        fam = {k: case / "fam" / k for k in ("base", "m1", "m2")} | {"cfg": case}
        if folder_case is not None:
            corrupt, _, *target = folder_case
            corrupt(fam[target[0] if target else "m1"])
        (case / "c.yaml").write_text(build(fam) if build else mk(fam, ONE))
        code, lines, seconds, gb = run(case / "c.yaml")
        ok = code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
        bad += [] if ok else [name]
        worst_s, worst_gb = max(worst_s, seconds), max(worst_gb, gb)
        print(f"{'ok ' if ok else 'BAD'} {seconds:5.1f} s {gb:5.2f} GB  {name}: {lines[-1][:100] if lines else ''}")
    print(f"{len(cases)} cases, {len(bad)} not refused in one line {bad}; worst {worst_s:.1f} s, {worst_gb:.2f} GB")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
