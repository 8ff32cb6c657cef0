"""The Python packages the lent GPU machine lacks, carried to it as wheels (issue #14, item 4).

The device machine (``nvidia-h200``) cannot reach a package registry; its image already holds torch,
transformers, peft, accelerate, safetensors and most of what raygrpo imports, but not Ray, diffusers or
pydantic (``/work/.library/device/KINDS.md``, read 2026-11-17: :data:`DEVICE_HAS`). A call may carry
64 MiB of working tree in all. Ray's wheel for Python 3.12 is 79 MB; 32 MB of it is
``ray/jars/ray_dist.jar``, which only Java workers load. So, here (registries reachable)::

    python scripts/gpu_wheels.py download      # pip download the versions this venv holds, cp312 manylinux x86-64
    python scripts/gpu_wheels.py pack          # -> .whl/ (one call): Ray without its Java jar, about 57 MB in all
    python scripts/gpu_wheels.py pack --calls 2   # -> .whl/call1, .whl/call2: the full Ray wheel split in two halves

and on the device machine (stdlib only: it runs before anything is installed)::

    python3 scripts/gpu_wheels.py install .whl --target /tmp/site   # join parts, verify sha256, pip install
    python3 scripts/gpu_wheels.py install .whl --plan               # check the parts and print the plan only

``pack`` splits every wheel above ``--part-mb`` (40) into ``NAME.part-00``, ``.part-01``, ... and writes
``MANIFEST.json`` (each wheel's sha256, size and parts); ``install`` joins the parts back and checks
them against it, so a half that did not arrive, or arrived short, fails by name before pip runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOWNLOADS = ROOT / "outputs" / "gpu-wheels"  # untracked (outputs/ is ignored)
PACKED = ROOT / ".whl"  # ignored by .gitignore; the device tool's `carry` names it
CALL_LIMIT = 64 * 2**20  # what one device call may carry: working tree and wheels together
MANIFEST = "MANIFEST.json"

# Distributions the check imports that the device image lacks (or holds too old: pydantic wants
# typing_extensions >= 4.16). tests/test_gpu_check.py checks this against what the dry run imports.
WHEELS = (
    "ray",
    "jsonschema",  # `import ray` imports it (runtime_env's plugin schemas), and it these three:
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "diffusers",
    "ftfy",  # diffusers imports it where installed, and raygrpo's Wan adapter needs it
    "wcwidth",
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "typing_extensions",
    "kernels",  # transformers >= 5.25 imports it (its hub kernels); the device image predates that
)
# Ray's files that no Python-only run loads: the Java workers' jar (32 MB of the 79 MB wheel).
RAY_DROPPED_PREFIXES = ("ray/jars/",)
# The device image's Python packages (KINDS.md, "Python packages already there", read 2026-11-17).
DEVICE_HAS = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
    formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
    imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
    matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
    pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
    statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
    tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)
# pip download's target: the device machine's python3 (3.12, x86-64, glibc manylinux); pip matches N of manylinux_2_N exactly.
MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
PLATFORM += [arg for tag in MANYLINUX for arg in ("--platform", f"{tag}_x86_64")]


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (``typing_extensions`` == ``Typing-Extensions``)."""
    return "".join("-" if c in "_." else c for c in name.lower())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """Cut ``path`` into ``NAME.part-00``, ``-01``, ... of at most ``part_bytes`` each (as ``split -b``), removing it."""
    parts = []
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            part = path.with_name(f"{path.name}.part-{len(parts):02d}")
            part.write_bytes(chunk)
            parts.append(part)
    path.unlink()
    return parts


def join_parts(parts: list[Path], dest: Path, expected_sha256: str, expected_size: int) -> Path:
    """Concatenate ``parts`` (in order) into ``dest`` and check its size and sha256; ValueError naming what is wrong."""
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ValueError(f"{dest.name}: parts missing: {missing} (carry every part; with --calls 2 one travels per call)")
    tmp = dest.with_name(dest.name + ".joining")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    size, digest = tmp.stat().st_size, sha256(tmp)
    if (size, digest) != (expected_size, expected_sha256):
        tmp.unlink()
        raise ValueError(
            f"{dest.name}: joined {size} bytes with sha256 {digest[:12]}, the manifest says {expected_size} bytes, {expected_sha256[:12]}"
        )
    os.replace(tmp, dest)
    return dest


def trim_wheel(source: Path, dest: Path, dropped_prefixes: tuple[str, ...]) -> int:
    """Copy the wheel ``source`` to ``dest`` without the files under ``dropped_prefixes`` (and their RECORD lines).

    pip checks every file a wheel holds against its RECORD; a file that is not there is not checked,
    but its RECORD line would be installed as a broken promise, so it goes too. Returns the bytes dropped.
    """
    dropped = 0
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.startswith(dropped_prefixes):
                dropped += info.compress_size
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(dropped_prefixes)).encode()
            zout.writestr(info, data, compress_type=info.compress_type)
    return dropped


# ------------------------------------------------------------------------------------------ commands


def download(dest: Path) -> list[Path]:
    """``pip download`` each of :data:`WHEELS` at the version this interpreter holds (the repo's install), for the device."""
    from importlib.metadata import PackageNotFoundError, version

    specs = []
    for name in WHEELS:
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.executable}: run `make install` first (its version is the one carried)")
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *PLATFORM, *specs]
    subprocess.run(command, check=True)
    return sorted(dest.glob("*.whl"))


def _working_tree_bytes() -> int:
    """What a device call carries besides the wheels: tracked and untracked-not-ignored files."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
    return sum((ROOT / name).stat().st_size for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file())


def pack(downloads: Path, dest: Path, calls: int, part_mb: int, tree_bytes: int) -> dict:
    """Lay the wheels out for ``calls`` device calls under ``dest`` and write each call's MANIFEST.json; returns the layout.

    One call: Ray without its Java jar, every file whole unless above ``part_mb``. Two calls: Ray whole,
    split; ``call1`` holds its first part, ``call2`` the rest and every other wheel, both with the manifest.
    """
    wheels = sorted(downloads.glob("*.whl"))
    have = {normalize(w.name.split("-")[0]) for w in wheels}
    lacking = [n for n in WHEELS if normalize(n) not in have]
    if lacking:
        raise SystemExit(f"{downloads} lacks wheels for {lacking}: run `python scripts/gpu_wheels.py download` first")
    shutil.rmtree(dest, ignore_errors=True)
    folders = [dest] if calls == 1 else [dest / f"call{k + 1}" for k in range(calls)]
    staging = dest / ".staging" if calls > 1 else dest
    for folder in {*folders, staging}:
        folder.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for wheel in wheels:
        target = staging / wheel.name
        if calls == 1 and normalize(wheel.name.split("-")[0]) == "ray":
            trim_wheel(wheel, target, RAY_DROPPED_PREFIXES)
        else:
            shutil.copyfile(wheel, target)
        entry = {"sha256": sha256(target), "size": target.stat().st_size, "parts": [target.name]}
        if entry["size"] > part_mb * 2**20:
            entry["parts"] = [p.name for p in split_file(target, part_mb * 2**20)]
        manifest[wheel.name] = entry
    if calls > 1:  # the first call takes the largest wheel's first part; the last call everything else
        files = sorted(staging.iterdir(), key=lambda p: -p.stat().st_size)
        first = next(p for p in files if ".part-" in p.name)
        for f in files:
            os.replace(f, (folders[0] if f == first else folders[-1]) / f.name)
        staging.rmdir()
    layout = {}
    for folder in folders:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        carried = sum(f.stat().st_size for f in folder.iterdir())
        layout[str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder)] = carried
        if carried + tree_bytes > CALL_LIMIT:
            raise SystemExit(
                f"{folder}: {carried / 1e6:.1f} MB of wheels + {tree_bytes / 1e6:.1f} MB of working tree exceed the "
                f"{CALL_LIMIT / 2**20:.0f} MiB one device call carries; pack with --calls {calls + 1}"
            )
    return layout


def install(folder: Path, target: Path, plan_only: bool) -> list[str]:
    """Join every split wheel of ``folder``'s manifest, check it, and pip-install all into ``target`` (``--no-deps``).

    ``plan_only``: check that every part is there at the right total size and return the plan, writing nothing.
    """
    manifest = json.loads((folder / MANIFEST).read_text())
    plan, wheels = [], []
    for name, entry in manifest.items():
        parts = [folder / p for p in entry["parts"]]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise SystemExit(f"{name}: parts missing in {folder}: {missing} (with --calls 2, copy each call's folder into one first)")
        size = sum(p.stat().st_size for p in parts)
        if size != entry["size"]:
            raise SystemExit(f"{name}: its parts hold {size} bytes, the manifest says {entry['size']}: a part arrived short")
        if len(parts) > 1:
            plan.append(f"join {len(parts)} parts -> {name} ({size / 1e6:.1f} MB, sha256 checked)")
            if not plan_only:
                join_parts(parts, folder / name, entry["sha256"], entry["size"])
        elif not plan_only and sha256(parts[0]) != entry["sha256"]:
            raise SystemExit(f"{name}: sha256 differs from the manifest's: the file changed on the way")
        wheels.append(folder / name)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade"]
    command += ["--target", str(target), *map(str, wheels)]
    plan.append(" ".join(command))
    if not plan_only:
        subprocess.run(command, check=True)
    return plan


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="pip download the carried wheels for the device's Python 3.12 (needs a registry)")
    d.add_argument("--dest", type=Path, default=DOWNLOADS)
    k = sub.add_parser("pack", help="lay the downloaded wheels out for one call (or --calls 2) under .whl/")
    k.add_argument("--downloads", type=Path, default=DOWNLOADS)
    k.add_argument("--dest", type=Path, default=PACKED)
    k.add_argument("--calls", type=int, choices=(1, 2), default=1, help="1: Ray without its Java jar; 2: Ray whole, split over two calls")
    k.add_argument("--part-mb", type=int, default=40, help="split wheels above this size (MiB) into parts of this size")
    i = sub.add_parser("install", help="on the device: join split wheels, verify them, pip install --target")
    i.add_argument("folder", type=Path)
    i.add_argument("--target", type=Path, default=Path("/tmp/site"))
    i.add_argument("--plan", action="store_true", help="check the parts and print what would run, installing nothing")
    args = p.parse_args(argv)
    if args.command == "download":
        for wheel in download(args.dest):
            print(f"{wheel.stat().st_size / 1e6:7.1f} MB  {wheel.name}")
    elif args.command == "pack":
        for folder, size in pack(args.downloads, args.dest, args.calls, args.part_mb, _working_tree_bytes()).items():
            print(f"{size / 1e6:7.1f} MB  {folder}/  (carry it: the device call's `carry` list names {folder})")
    else:
        for line in install(args.folder, args.target, args.plan):
            print(line)


if __name__ == "__main__":
    main()
