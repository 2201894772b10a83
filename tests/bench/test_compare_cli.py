"""``kimchi-edge bench --compare`` without training anything: it needs only the installed package (no checkout, any
working folder), names the extra when one is missing, and the committed BENCHMARKS.md is the render of its JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from kimchi_edge.bench import EXTRA, compare
from kimchi_edge.bench.report import COMMAND, markdown
from kimchi_edge.cli import build_parser
from kimchi_edge.runtime.bench_cli import compare_options
from tests.conftest import COLOR_LABELS, REPO

RED, GREEN, BLUE = COLOR_LABELS


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, colour in (("red.png", (240, 10, 10)), ("blue.jpg", (10, 10, 240)), ("green.png", (10, 240, 10))):
        Image.new("RGB", (80, 60), colour).save(folder / name)
    return folder


def _env_without_checkout() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _worker_cfg(color_bundle: Path, images: Path, tmp_path: Path) -> dict:
    files = [str(images / n) for n in ("red.png", "blue.jpg", "green.png")]
    return {"kind": "path", "path": "ort-fp32", "run_dir": str(tmp_path), "bundle": str(color_bundle), "threads": 1,
            "images": files, "warmup": 1, "batch_sizes": [2], "batch_iterations": {"2": 2}}


def test_worker_runs_from_the_installed_package_in_any_folder(color_bundle, images, tmp_path):
    """The worker command exactly as compare starts it, from an empty folder, with PYTHONPATH unset."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg, out = elsewhere / "config.json", elsewhere / "result.json"
    cfg.write_text(json.dumps(_worker_cfg(color_bundle, images, tmp_path)), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "kimchi_edge.bench.worker", str(cfg), str(out)], cwd=elsewhere,
                          env=_env_without_checkout(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["batch1"]["labels"] == [RED, BLUE, GREEN]
    assert r["batches"]["2"]["labels_match_batch1"] == 1.0
    assert r["memory_ready_mb"]["VmHWM"] > 10 and r["batch1"]["latency_ms"]["n"] == 3
    assert r["cold_start"]["import_ms"] > 0  # the runtime was imported inside the timed load, not before


def test_run_worker_needs_no_checkout(color_bundle, images, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    r = compare.run_worker(_worker_cfg(color_bundle, images, tmp_path), threads=1, timeout=300, log=lambda _line: None)
    assert "error" not in r, r.get("stderr_tail")
    assert r["batch1"]["labels"] == [RED, BLUE, GREEN] and r["seconds"] > 0


def test_compare_refers_to_no_repository_folder():
    src = Path(compare.__file__).read_text(encoding="utf-8")
    for needle in ("REPO", "parents[1]", "PYTHONPATH", "cwd=str("):
        assert needle not in src, needle


def test_command_line_round_trips_through_the_parser():
    argv = ["bench", "--compare", "runs/x", "runs/x/bundle", "--images", "photos dir", "--out", "docs", "--rounds", "1",
            "--paths", "ort-fp32,ort-int8", "--no-experiments", "--phone-size", "400x300", "--batch-sizes", "2", "--threads", "1"]
    opts = compare_options(build_parser().parse_args(argv))
    assert opts.paths == ("ort-fp32", "ort-int8") and opts.phone_size == (400, 300) and opts.batch_sizes == (2,)
    assert opts.experiments is False and opts.one_thread_round is True and opts.max_images == 60 and opts.out == Path("docs")
    line = compare.command_line(opts)
    assert line == ("kimchi-edge bench --compare runs/x runs/x/bundle --images 'photos dir' --out docs --rounds 1 --threads 1 "
                    "--phone-size 400x300 --batch-sizes 2 --paths ort-fp32,ort-int8 --no-experiments")
    import shlex

    again = compare_options(build_parser().parse_args(["bench", *shlex.split(line)[2:]]))
    assert again == opts


def test_defaults_write_into_the_current_folder():
    opts = compare_options(build_parser().parse_args(["bench", "--compare", "run", "--images", "x"]))
    assert opts.out == Path(".") and opts.bundle_dir == Path("run/bundle") and opts.threads == 2
    assert compare.command_line(opts) == "kimchi-edge bench --compare run --images x"


BLOCKER = textwrap.dedent(
    """
    import sys

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)


def _run_blocked(blocked: tuple[str, ...], body: str, cwd: Path) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env_without_checkout(), capture_output=True, text=True,
                          timeout=300)


def test_missing_extra_is_one_line_naming_it_before_anything_runs(color_bundle, images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(color_bundle, run / "bundle")
    (run / "learner.pkl").write_bytes(b"")  # never read: the check comes first
    proc = _run_blocked(("fastai", "matplotlib"), f"""
        import sys
        from kimchi_edge.bench.compare import main
        sys.exit(main([{str(run)!r}, "--images", {str(images)!r}]))
        """, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"kimchi-edge bench: error: {COMMAND} needs fastai and matplotlib, which are not installed here; "
        f"install them with: pip install 'kimchi-edge[{EXTRA}]'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "run"]  # nothing written


def test_report_without_matplotlib_names_the_extra(tmp_path):
    proc = _run_blocked(("matplotlib",), f"""
        import sys
        from kimchi_edge.bench.report import main
        sys.exit(main([{str(REPO / 'docs' / 'bench_results.json')!r}, "--out", {str(tmp_path / 'out')!r}]))
        """, cwd=tmp_path)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "the benchmark chart needs matplotlib" in err[0] and f"pip install 'kimchi-edge[{EXTRA}]'" in err[0], err


def test_committed_benchmarks_md_is_the_render_of_its_json():
    """docs/BENCHMARKS.md is generated: editing it by hand (or its generator without re-rendering) fails here."""
    docs = REPO / "docs"
    results = json.loads((docs / "bench_results.json").read_text(encoding="utf-8"))
    assert markdown(results, "bench_latency.png") == (docs / "BENCHMARKS.md").read_text(encoding="utf-8")


def test_legacy_command_names_render_as_the_new_command():
    from kimchi_edge.bench.report import reproduce_command

    for old in ("python -m bench.compare", "python -m kimchi_edge.bench.compare"):
        assert reproduce_command({"command": f"{old} runs/a --images b"}) == "kimchi-edge bench --compare runs/a --images b"
    assert reproduce_command({"command": "kimchi-edge bench --compare r --images i"}) == "kimchi-edge bench --compare r --images i"
