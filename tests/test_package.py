"""What a user gets from a wheel, and the CLI around it: version, shipped recipes, plan, Hub."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

from evomerge.hub import push_folder

REPO = Path(__file__).parents[1]


def source_tree(dest: Path) -> Path:
    """The checkout's files as a clean clone has them (tracked and new, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_wheel_in_a_fresh_venv_runs_version_plan_and_finds_its_recipes(llama_fp32, tmp_path):
    src = source_tree(tmp_path / "src")
    build_env = {**os.environ, "EVOMERGE_KERNELS": "0"}  # kernels are optional; a fast build
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=build_env)
    wheel = next((tmp_path / "dist").glob("evomerge-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # torch & co. from the shared environment: a path line (it does not run that environment's
    # editable-install hook, so `import evomerge` can only find the wheel's copy)
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cli = [str(venv / "bin" / "evomerge")]

    def run(*args, cwd=tmp_path):
        return subprocess.run(cli + list(args), capture_output=True, text=True, env=env, cwd=cwd)

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"evomerge {wheel.name.split('-')[1]}"
    where = subprocess.run([py, "-c", "import evomerge, evomerge.pipelines.demo as d; "
                            "print(evomerge.__file__); print(d.template_path())"],
                           capture_output=True, text=True, env=env, check=True, cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    assert (site / "evomerge" / "recipes" / "prompts" / "ja-prompts.txt").is_file()
    # a shipped recipe by name, from any folder: the template says what to fill in
    out = run("plan", "miniworld-llm")
    assert out.returncode == 2 and "a template: set SEED, WORLD" in out.stderr
    # plan on a recipe of local models, read relative to the recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "w", "base": str(llama_fp32["base"]), "models": [str(llama_fp32["m1"]), str(llama_fp32["m2"])],
        "merge": {"method": "ties", "search": {"weight": [0, 1]}, "granularity": "per_group"}}))
    out = run("plan", str(recipe))
    assert out.returncode == 0, out.stderr
    assert "searched values" in out.stdout and "K params" in out.stdout and "MiB" in out.stdout


def test_offline_plan_fails_at_once_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "plan", "evollm-jp-ps"],
                         capture_output=True, text=True, env=env)
    took = time.perf_counter() - start
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "not in the local Hub cache" in out.stderr
    assert "HF_HUB_OFFLINE" in out.stderr, out.stderr
    print(f"offline plan: {took:.1f} s")  # no retries: interpreter start-up and imports only


class RecordingHub:
    """The Hub's side of the call boundary: what evomerge asks huggingface_hub to do."""

    def __init__(self):
        self.calls: list[tuple] = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        self.uploaded = sorted(p.name for p in Path(kw["folder_path"]).iterdir())


def test_push_to_hub_uploads_the_exported_folder(llama_fp32, tmp_path, evomerge_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(llama_fp32["base"]), "models": [str(llama_fp32["m1"])],
        "merge": {"method": "task_arithmetic", "parameters": {"weight": 0.5}}}))
    code, _, err = evomerge_cli("merge", recipe, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    hub = RecordingHub()
    assert push_folder(tmp_path / "out", "me/merged", api=hub) == "https://huggingface.co/me/merged"
    assert hub.calls[0] == ("create_repo", "me/merged", {"repo_type": "model", "private": False, "exist_ok": True})
    assert hub.calls[1][1]["repo_id"] == "me/merged" and hub.calls[1][1]["folder_path"] == str(tmp_path / "out")
    assert {"README.md", "config.json", "model.safetensors"} <= set(hub.uploaded)


def test_push_to_hub_offline_is_refused_before_merging(llama_fp32, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(llama_fp32["base"]), "models": [str(llama_fp32["m1"])],
        "merge": {"method": "task_arithmetic", "parameters": {"weight": 0.5}}}))
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), "--out", str(tmp_path / "o"),
                          "--push-to-hub", "me/merged"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and out.stderr.strip() == "error: --push-to-hub me/merged: the Hub is offline (HF_HUB_OFFLINE is set)"
    assert not (tmp_path / "o").exists()


def test_help_shows_flag_pairs_short_help_and_an_example(evomerge_cli):
    for command in ("merge", "evolve", "report", "plan", "demo", "inspect"):
        code, out, _ = evomerge_cli(command, "-h")
        assert code == 0 and "Example: evomerge " + command in out and "<bool>" not in out, out
    code, out, _ = evomerge_cli("merge", "-h")
    assert "--force / --no-force" in out
