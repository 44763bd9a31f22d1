"""The demo's numbers depend neither on the CPU's instruction set, nor on its core count, nor on
the caller's thread settings.

Each case trains the demo's architecture for a few steps in a fresh interpreter (torch reads
its CPU settings once, when it starts) and compares the weights bit for bit. Another machine
is imitated on this one by the settings that make torch's libraries pick narrower kernels
(oneDNN's and MKL's AVX2 code instead of AVX-512), by a caller asking for ATen's generic
kernels, one thread, OpenMP's dynamic thread count and a thread limit of one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from geovae.demo import (
    CPU_ENVIRONMENT,
    CPU_ENVIRONMENT_REMOVED,
    DEMO_THREADS,
    _unpinned_environment,
    demo_numerics,
    pin_cpu_numerics,
)

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the demo's numbers are pinned to AVX2 kernels; this CPU has none",
)

# A few training steps of the demo's model (the architecture in argv[2], 6 bands, 7 classes):
# convolutions, batch norm, latent samples, cross-entropy and reconstruction, AdamW. Prints
# the threads and kernels it ran with, OpenMP's dynamic mode and thread limit as torch's
# OpenMP runtime holds them, then a hash of the trained weights.
STEPS = """
import ctypes, hashlib, json, sys
pin = sys.argv[1] == "pinned"
if pin:
    from geovae.demo import pin_cpu_numerics
    pin_cpu_numerics()
import contextlib
import torch
import torch.nn.functional as F
from geovae.demo import demo_numerics
from geovae.model.vae import VAESegmenter

arch = json.loads(sys.argv[2])
with demo_numerics("cpu") if pin else contextlib.nullcontext():
    torch.manual_seed(0)
    net = VAESegmenter(6, 7, base_channels=arch["base_channels"], depth=arch["depth"],
                       latent_channels=arch["latent_channels"], head="lowrank")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.rand(16, 6, 32, 32) * 4 - 2
    y = torch.randint(0, 7, (16, 32, 32))
    for _ in range(2):
        logits = net.sample_logits(x, 2)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(2, 1, 1)) + F.mse_loss(net.reconstruct(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = hashlib.sha256()
    for p in net.state_dict().values():
        h.update(p.detach().contiguous().numpy().tobytes())
    gomp = ctypes.CDLL(next(l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l))
    print(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), gomp.omp_get_dynamic(),
          gomp.omp_get_thread_limit(), h.hexdigest())
"""

#: This machine imitating another, and a caller with other thread settings.
OTHER_MACHINE = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "default",
    "OMP_NUM_THREADS": "1",
    "OMP_DYNAMIC": "TRUE",
    "OMP_THREAD_LIMIT": "1",
}

Run = tuple[int, str, int, int, str]


def settings() -> tuple[int, bool, bool, bool]:
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.mkldnn.enabled,
        torch._C._get_nnpack_enabled(),
    )


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    from geovae.training.task import default_architecture

    arch = json.dumps(default_architecture())
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {*CPU_ENVIRONMENT, *CPU_ENVIRONMENT_REMOVED, *OTHER_MACHINE, "MKL_NUM_THREADS"}
    }
    cases = {
        "pinned here": ("pinned", {"OMP_NUM_THREADS": "2"}),
        "pinned, other machine": ("pinned", OTHER_MACHINE),
        "unpinned here": ("unpinned", {"OMP_NUM_THREADS": "2"}),
        "unpinned, other machine": ("unpinned", OTHER_MACHINE),
    }
    # Side by side: most of each run is importing torch.
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", STEPS, mode, arch],
            env={**clean, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (mode, env) in cases.items()
    }
    out: dict[str, Run] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        threads, capability, dynamic, limit, digest = stdout.split()
        out[name] = (int(threads), capability, int(dynamic), int(limit), digest)
    return out


def test_pinned_runs_use_the_demo_threads_and_avx2_kernels(runs: dict[str, Run]) -> None:
    assert runs["pinned, other machine"][:2] == (DEMO_THREADS, "AVX2")


def test_pinned_runs_keep_openmp_from_giving_fewer_threads(runs: dict[str, Run]) -> None:
    dynamic, limit = runs["pinned, other machine"][2:4]
    assert (dynamic, limit >= DEMO_THREADS) == (0, True)


def test_the_imitated_machine_does_ask_for_other_kernels_and_fewer_threads(runs: dict[str, Run]) -> None:
    assert runs["unpinned, other machine"][:4] == (1, "DEFAULT", 1, 1)


def test_pinned_training_is_bitwise_the_same_on_the_imitated_machine(runs: dict[str, Run]) -> None:
    assert runs["pinned here"][4] == runs["pinned, other machine"][4]


def test_without_the_pinning_the_imitated_machine_trains_other_weights(runs: dict[str, Run]) -> None:
    # The control: the imitation does change the numbers, so the test above can fail.
    assert runs["unpinned here"][4] != runs["unpinned, other machine"][4]


def test_pin_cpu_numerics_overrides_the_callers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OTHER_MACHINE.items():
        monkeypatch.setenv(name, value)  # also recorded, so that the settings below are undone
    for name in CPU_ENVIRONMENT:
        monkeypatch.setenv(name, "")
    assert "OMP_THREAD_LIMIT=1" in _unpinned_environment()
    pin_cpu_numerics()
    assert _unpinned_environment() == []


def test_demo_numerics_sets_and_restores_torch_settings(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MKL_CBWR", raising=False)
    before = settings()
    # at_level: an in-process `geovae -q ...` earlier in this worker leaves geovae's logger at ERROR
    with caplog.at_level("WARNING", logger="geovae"), demo_numerics("cpu") as numerics:
        assert settings() == (DEMO_THREADS, True, False, False)
    assert settings() == before
    assert numerics["threads"] == DEMO_THREADS
    # This process's torch started without the CPU environment, and the demo says that its
    # scores may then differ.
    assert "may differ from the README" in caplog.text
