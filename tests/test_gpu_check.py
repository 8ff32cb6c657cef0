"""The prepared GPU check (issue #14, item 4) without a GPU and without downloading anything.

benchmarks/gpu_check.sh runs here as on the device machine, with the install step only checking its plan
(``PLAN_ONLY=1``) over generated wheels and the check in ``--dry-run`` (CPU, tiny sizes); the wheel tools of
scripts/gpu_wheels.py (split, join, Ray's trim, the two-call layout) run on small generated files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from .conftest import ROOT, load_script

wheels = load_script(ROOT / "scripts" / "gpu_wheels.py", "gpu_wheels")
check = load_script(ROOT / "benchmarks" / "gpu_check.py", "gpu_check")

# huggingface_hub 2.x's HTTP stack, imported here; the device's huggingface_hub 1.33 uses httpx, which it has.
HERE_ONLY = {"httpx2", "httpcore2", "truststore"}


def fake_wheel(folder: Path, dist: str, files: dict[str, bytes]) -> Path:
    """A wheel-shaped zip: ``files`` plus METADATA and a RECORD listing them."""
    path = folder / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl"
    info = f"{dist.replace('-', '_')}-1.0.dist-info"
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/METADATA", f"Name: {dist}\nVersion: 1.0\n")
        z.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    """One generated wheel per carried distribution; Ray's holds a 'Java jar' and a 1.5 MB 'extension' (random: incompressible)."""
    folder = tmp_path_factory.mktemp("downloads")
    for dist in wheels.WHEELS:
        files = {f"{dist}/__init__.py": b"# generated\n"}
        if dist == "ray":
            files |= {"ray/_raylet.so": os.urandom(1_500_000), "ray/jars/ray_dist.jar": os.urandom(300_000)}
        fake_wheel(folder, dist, files)
    return folder


@pytest.fixture(scope="module")
def packed(downloads, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("packed") / "whl"
    wheels.pack(downloads, dest, calls=1, part_mb=1, tree_bytes=0)
    return dest


def test_split_and_join_give_back_the_same_bytes_and_name_what_is_wrong(tmp_path):
    data = os.urandom(2_500_000)
    path = tmp_path / "big.whl"
    path.write_bytes(data)
    digest = wheels.sha256(path)
    parts = wheels.split_file(path, 1_000_000)
    assert [p.stat().st_size for p in parts] == [1_000_000, 1_000_000, 500_000] and not path.exists()
    joined = wheels.join_parts(parts, tmp_path / "joined.whl", digest, len(data))
    assert joined.read_bytes() == data
    parts[1].write_bytes(data[1_000_000:1_999_999])  # a part that arrived one byte short
    with pytest.raises(ValueError, match="joined 2499999 bytes"):
        wheels.join_parts(parts, tmp_path / "again.whl", digest, len(data))
    parts[2].unlink()
    with pytest.raises(ValueError, match=r"parts missing: \['big.whl.part-02'\]"):
        wheels.join_parts(parts, tmp_path / "again.whl", digest, len(data))


def test_one_call_layout_drops_only_rays_java_jar_and_the_plan_joins_it(packed, tmp_path):
    manifest = json.loads((packed / wheels.MANIFEST).read_text())
    assert len(manifest) == len(wheels.WHEELS)
    ray_name = next(name for name in manifest if name.startswith("ray-"))
    entry = manifest[ray_name]
    assert entry["parts"] == [f"{ray_name}.part-00", f"{ray_name}.part-01"]  # above --part-mb 1: split, and joined on the device
    joined = wheels.join_parts([packed / p for p in entry["parts"]], tmp_path / ray_name, entry["sha256"], entry["size"])
    with zipfile.ZipFile(joined) as z:
        names = set(z.namelist())
        record = z.read("ray-1.0.dist-info/RECORD").decode()
    assert "ray/_raylet.so" in names and not any(n.startswith("ray/jars/") for n in names)
    assert "ray/_raylet.so" in record and "ray/jars" not in record
    plan = wheels.install(packed, tmp_path / "site", plan_only=True)
    assert plan[0] == f"join 2 parts -> {ray_name} ({entry['size'] / 1e6:.1f} MB, sha256 checked)"
    assert "--no-index --no-deps" in plan[-1] and all(name in plan[-1] for name in manifest)
    assert not (tmp_path / "site").exists() and not (packed / ray_name).exists()  # the plan writes nothing


def test_two_call_layout_keeps_ray_whole_and_needs_both_calls(downloads, tmp_path):
    layout = wheels.pack(downloads, tmp_path / "whl", calls=2, part_mb=1, tree_bytes=0)
    call1, call2 = (tmp_path / "whl" / f"call{k}" for k in (1, 2))
    assert set(layout) == {str(call1), str(call2)}
    assert sorted(p.name for p in call1.iterdir()) == [wheels.MANIFEST, "ray-1.0-py3-none-any.whl.part-00"]
    device = tmp_path / "device"  # the folder on the device machine both calls copy into
    device.mkdir()
    for p in call2.iterdir():
        (device / p.name).write_bytes(p.read_bytes())
    with pytest.raises(SystemExit, match="part-00"):
        wheels.install(device, tmp_path / "site", plan_only=True)
    (device / "ray-1.0-py3-none-any.whl.part-00").write_bytes((call1 / "ray-1.0-py3-none-any.whl.part-00").read_bytes())
    ray_size = json.loads((device / wheels.MANIFEST).read_text())["ray-1.0-py3-none-any.whl"]["size"]
    assert ray_size > 1_800_000  # whole: the jar travels too
    assert wheels.install(device, tmp_path / "site", plan_only=True)[0].startswith("join 2 parts -> ray-1.0")
    with pytest.raises(SystemExit, match="exceed the 64 MiB one device call carries; pack with --calls 2"):
        wheels.pack(downloads, tmp_path / "over", calls=1, part_mb=1, tree_bytes=wheels.CALL_LIMIT)


# ------------------------------------------------------------------------------------- the check itself


def _raises(args):
    raise ValueError("planted failure")


def _crashes(args):
    os._exit(3)


def _hangs(args):
    """Measures something, starts a grandchild as the rank sections do, then hangs; the timeout must end both."""
    check.save_partial(args, {"measured": 1.5})
    child = subprocess.Popen(["sleep", "120"])
    Path(args.work, "grandchild.pid").write_text(str(child.pid))
    time.sleep(120)


def _fine(args):
    return {"passed": True, "answer": 42}


def test_a_section_that_fails_crashes_or_hangs_leaves_the_others_running(tmp_path):
    args = check.parse_args(["--dry-run", "--out", str(tmp_path / "report.json")])
    args.work = str(tmp_path)
    sections = {"raises": (_raises, 60), "crashes": (_crashes, 60), "hangs": (_hangs, 3), "fine": (_fine, 60)}
    report = check.run_sections(sections, args)
    got = report["sections"]
    assert got["raises"]["passed"] is False and "ValueError: planted failure" in got["raises"]["error"]
    assert got["crashes"]["passed"] is False and "exit code 3" in got["crashes"]["error"]
    assert got["hangs"]["passed"] is False and got["hangs"]["error"].startswith("timed out after 3 s")
    assert got["hangs"]["partial"] == {"measured": 1.5}  # what it measured before its time ran out
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    assert got["fine"] == {"passed": True, "answer": 42, "modules": got["fine"]["modules"], "seconds": got["fine"]["seconds"]}
    assert report["total"]["passed"] is False
    assert json.loads((tmp_path / "report.json").read_text())["sections"].keys() == got.keys()  # written as it went
    args.budget_s = check.MIN_SECTION_S - 1  # and a spent budget skips what is left, saying so
    assert "skipped" in check.run_sections({"fine": (_fine, 60)}, args)["sections"]["fine"]


@pytest.fixture(scope="module")
def dry_run(packed, tmp_path_factory) -> tuple[dict, str]:
    """benchmarks/gpu_check.sh as the device runs it, the install only planned, the check on CPU at tiny sizes."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PLAN_ONLY": "1", "PYTHON": sys.executable, "OUT": str(out)}  # models: the session's cache
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(packed), "--dry-run"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_dry_run_passes_every_section_with_its_figures(dry_run):
    report, stdout = dry_run
    sections = report["sections"]
    assert list(sections) == list(check.SECTIONS) and report["total"]["passed"] and report["device"] == "cpu"
    assert "join 2 parts -> ray-1.0-py3-none-any.whl" in stdout  # the install step's plan ran first
    env = sections["environment"]
    assert env["torch"] and env["versions"]["ray"] and env["failed_imports"] == {} and env["bf16_matmul_tflops_measured"] > 0
    # float32 on CPU (bf16 is what the GPU run checks): every step's ratio is exact, and DGPO's step 1
    ratio = sections["first_ratio"]
    assert ratio["dancegrpo"]["max_abs_dev"] == [0.0, 0.0] and ratio["dgpo"]["max_abs_dev"] == [0.0]
    fsdp = sections["fsdp2"]
    assert fsdp["gloo_2_ranks"]["sharded"] and fsdp["two_ranks_on_one_device_with"] == ["gloo_2_ranks"]
    assert fsdp["gloo_2_ranks"]["first_ratio_max_abs_dev"] == [0.0, 0.0]  # step 2 samples with the weights step 1 trained
    # two ranks compute the update one rank computes (the same global gradient norm)
    assert fsdp["gloo_2_ranks"]["grad_norm"] == pytest.approx(fsdp["gloo_1_rank"]["grad_norm"], rel=1e-5)
    real = sections["realistic"]
    for algorithm in ("dgpo", "dancegrpo"):
        rollout, learner = real[f"rollout_{algorithm}"], real[f"learner_{algorithm}"]
        assert rollout["flops"] > 0 and learner["flops"] > 0 and rollout["mfu"] is None  # no peak known for a CPU
        assert rollout["images_per_s"] == pytest.approx(rollout["group_size"] / rollout["seconds"])
        assert learner["tflops_achieved"] == pytest.approx(learner["flops"] / learner["seconds"] / 1e12)
        planner = real[f"planner_{algorithm}"]  # raygrpo/plan.py, where it plans this config: the FLOPs counted here
        if "planned_over_counted_flops" in planner:
            ratios = planner["planned_over_counted_flops"]
            assert ratios["rollout"] == pytest.approx(1.0, rel=0.05)
            # DGPO's learner is left out: the planner counts 1.2x here (3 no-gradient forwards per term; dgpo.py runs 2)
            assert algorithm == "dgpo" or ratios["learner"] == pytest.approx(1.0, rel=0.05)
        else:
            assert planner.get("why") or planner.get("error")
    broadcast = sections["weight_broadcast"]["gloo"]
    assert broadcast["digests_agree"] and broadcast["every_byte_agrees"] and broadcast["receiver_changed"] and broadcast["bytes"] > 0
    for name in sections:
        assert f"gpu_check: {name}: passed" in stdout


def test_the_device_has_or_is_carried_every_package_the_check_imports(dry_run):
    report, _ = dry_run
    imported = set().union(*(s.get("modules", []) for s in report["sections"].values())) - set(sys.stdlib_module_names)
    there = {wheels.normalize(d) for d in (*wheels.DEVICE_HAS, *wheels.WHEELS, *HERE_ONLY, "raygrpo")}
    by_module = packages_distributions()
    missing = {m: by_module[m] for m in imported if m in by_module and not any(wheels.normalize(d) in there for d in by_module[m])}
    assert missing == {}, f"imported by the check, neither on the device image nor in gpu_wheels.WHEELS: {missing}"
