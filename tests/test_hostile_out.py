"""`--out` under attack: killed merges, concurrent writers, outputs over the inputs, links,
read-only and full file systems. The old model stays at --out until the new one is whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from kill_merge import digest  # noqa: E402


def ties(base, *models, weight=0.5) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": weight, "density": 0.5}} for m in models]}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def old_and_new(llama_fp32, tmp_path, evomerge_cli):
    """An --out holding an old merge, a config for a different new one, and both digests."""
    fam = llama_fp32
    old_cfg = write(tmp_path / "old.yaml", ties(fam["base"], fam["m1"], fam["m2"], weight=0.3))
    new_cfg = write(tmp_path / "new.yaml", ties(fam["base"], fam["m1"], fam["m2"], weight=0.9))
    for cfg, out in ((old_cfg, "old_copy"), (new_cfg, "new_copy")):
        code, _, err = evomerge_cli("merge", cfg, "--out", tmp_path / out, "--device", "cpu")
        assert code == 0, err
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    shutil.copytree(tmp_path / "old_copy", out)
    old, new = digest(tmp_path / "old_copy"), digest(tmp_path / "new_copy")
    assert old != new
    return new_cfg, out, tmp_path / "old_copy", old, new


def sweep(cfg: Path, out: Path, old_copy: Path, *flags: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run([sys.executable, str(TESTS / "kill_merge.py"), str(cfg), str(out), str(old_copy), *flags],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sigkill_at_every_file_operation_leaves_old_or_new(old_and_new):
    cfg, out, old_copy, old, new = old_and_new
    rows = sweep(cfg, out, old_copy)
    kills = [r for r in rows if r["signalled"]]
    assert len(kills) >= 4, rows  # mkdir, the swap and the old folder's removal at least
    assert all(r["state"] in (old, new) for r in kills), rows
    assert {r["state"] for r in kills} == {old, new}  # killed before and after the swap
    assert rows[-1]["exit"] == 0 and rows[-1]["state"] == new and rows[-1]["leftovers"] == []


def test_fallback_swap_never_loses_the_old_model(old_and_new):
    """Without renameat2 the swap is two renames; a kill between them leaves --out missing for
    an instant, and the next run on --out puts the old model back."""
    cfg, out, old_copy, old, new = old_and_new
    rows = sweep(cfg, out, old_copy, "--no-exchange")
    gaps = [r for r in rows if r["state"] == "missing"]
    assert len(gaps) == 1 and gaps[0]["recovered"] == old, rows
    assert all(r["state"] in (old, new, "missing") for r in rows), rows
    assert rows[-1]["state"] == new and rows[-1]["leftovers"] == []


def test_sigterm_cleans_up_its_temporary_folder(old_and_new):
    cfg, out, old_copy, old, new = old_and_new
    rows = sweep(cfg, out, old_copy, "--signal", "TERM")
    terms = [r for r in rows if r["signalled"]]
    assert terms and all(r["exit"] == 143 and r["state"] in (old, new) for r in terms), rows
    assert all(not any(".tmp-" in n for n in r["leftovers"]) for r in terms), rows


def test_stale_temporary_folders_are_removed_by_the_next_run(old_and_new, evomerge_cli):
    cfg, out, _, _, new = old_and_new
    stale = out.parent / ".out.tmp-999999"  # a killed merge's 100-200 MB of shards
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    (out.parent / ".out.old-888888").mkdir()
    code, _, err = evomerge_cli("merge", cfg, "--out", out, "--device", "cpu", "--force")
    assert code == 0, err
    assert digest(out) == new
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_second_writer_is_refused_while_the_first_holds_out(old_and_new, evomerge_cli):
    from evomerge.atomic import output_lock

    cfg, out, _, old, _ = old_and_new
    with output_lock(out):
        code, _, err = evomerge_cli("merge", cfg, "--out", out, "--device", "cpu", "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "another evomerge process" in err and f"pid {os.getpid()}" in err
    assert digest(out) == old


def one_line_refusal(evomerge_cli, *args) -> str:
    code, out, err = evomerge_cli("merge", *args, "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where", ["parent", "same"])
def test_out_overlapping_an_input_is_refused_even_with_force(llama_fp32, tmp_path, evomerge_cli, where):
    fam = tmp_path / "fam"
    shutil.copytree(llama_fp32["base"].parent, fam)
    cfg = write(tmp_path / "c.yaml", ties(fam / "base", fam / "m1"))
    out = {"parent": fam, "same": fam / "m1"}[where]
    before = digest(fam)
    msg = one_line_refusal(evomerge_cli, cfg, "--out", out, "--force")
    assert "overlaps the input" in msg
    assert digest(fam) == before


def test_out_equal_to_the_recipe_file_is_refused(llama_fp32, tmp_path, evomerge_cli):
    cfg = write(tmp_path / "c.yaml", ties(llama_fp32["base"], llama_fp32["m1"]))
    text = cfg.read_text()
    assert "a file, not a folder" in one_line_refusal(evomerge_cli, cfg, "--out", cfg, "--force")
    assert cfg.read_text() == text


@pytest.mark.parametrize("target", ["/nonexistent/evomerge-dangling", "existing"])
def test_out_that_is_a_symlink_is_refused(llama_fp32, tmp_path, evomerge_cli, target):
    cfg = write(tmp_path / "c.yaml", ties(llama_fp32["base"], llama_fp32["m1"]))
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real if target == "existing" else target)
    assert "symbolic link" in one_line_refusal(evomerge_cli, cfg, "--out", link, "--force")
    assert link.is_symlink() and list(real.iterdir()) == []


@contextmanager
def small_tmpfs(path: Path, size: str, *, read_only: bool = False):
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_out_is_one_line(llama_fp32, tmp_path, evomerge_cli):
    cfg = write(tmp_path / "c.yaml", ties(llama_fp32["base"], llama_fp32["m1"]))
    with small_tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        msg = one_line_refusal(evomerge_cli, cfg, "--out", ro / "out")
        assert "cannot write" in msg and "Read-only" in msg
        assert list(ro.iterdir()) == []


def test_full_file_system_is_one_line_and_keeps_the_old_model(old_and_new, tmp_path, evomerge_cli):
    cfg, _, old_copy, old, _ = old_and_new
    with small_tmpfs(tmp_path / "full", "160k") as full:  # room for the old model, not for both
        out = full / "out"
        shutil.copytree(old_copy, out)
        msg = one_line_refusal(evomerge_cli, cfg, "--out", out, "--force")
        assert "No space left" in msg
        assert digest(out) == old and sorted(p.name for p in full.iterdir()) == ["out"]
