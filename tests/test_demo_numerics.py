"""The demo's numbers do not depend on the CPU's instruction set or its core count.

Each case trains the demo's architecture for a few steps in a fresh interpreter (torch reads
its CPU settings once, when it starts) and compares the weights bit for bit. Another CPU is
imitated by the settings that make torch's libraries pick narrower kernels on this one
(oneDNN's and MKL's AVX2 code instead of AVX-512) and by one thread instead of two.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from geovae.demo import CPU_ENVIRONMENT, DEMO_THREADS, demo_numerics

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the demo's numbers are pinned to AVX2 kernels; this CPU has none",
)

# A few training steps of the demo's model (the task's default architecture, 6 bands,
# 7 classes): convolutions, batch norm, latent samples, cross-entropy and reconstruction,
# AdamW. Prints the threads and kernels it ran with, then a hash of the trained weights.
STEPS = """
import hashlib, os, sys
pin = sys.argv[1] == "pinned"
if pin:
    from geovae.demo import pin_cpu_numerics
    pin_cpu_numerics()
import contextlib
import torch
import torch.nn.functional as F
from geovae.demo import demo_numerics
from geovae.model.vae import VAESegmenter
from geovae.training.task import default_architecture

with demo_numerics("cpu") if pin else contextlib.nullcontext():
    torch.manual_seed(0)
    arch = default_architecture()
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
    print(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""

#: This CPU imitating another: AVX2 kernels in oneDNN and MKL, one thread by default.
OTHER_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"}


def train_steps(mode: str, env: dict[str, str]) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in {*CPU_ENVIRONMENT, *OTHER_CPU}}
    proc = subprocess.run(
        [sys.executable, "-c", STEPS, mode], env={**clean, **env}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    threads, capability, digest = proc.stdout.split()
    return int(threads), capability, digest


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, str, str]]:
    return {
        "pinned here": train_steps("pinned", {"OMP_NUM_THREADS": "2"}),
        "pinned, other CPU": train_steps("pinned", OTHER_CPU),
        "unpinned here": train_steps("unpinned", {"OMP_NUM_THREADS": "2"}),
        "unpinned, other CPU": train_steps("unpinned", OTHER_CPU),
    }


def test_pinned_runs_use_the_demo_threads_and_avx2_kernels(runs: dict[str, tuple[int, str, str]]) -> None:
    assert runs["pinned, other CPU"][:2] == (DEMO_THREADS, "AVX2")


def test_pinned_training_is_bitwise_the_same_on_the_imitated_cpu(runs: dict[str, tuple[int, str, str]]) -> None:
    assert runs["pinned here"][2] == runs["pinned, other CPU"][2]


def test_without_the_pinning_the_imitated_cpu_trains_other_weights(runs: dict[str, tuple[int, str, str]]) -> None:
    # The control: the imitation does change the numbers, so the test above can fail.
    assert runs["unpinned here"][2] != runs["unpinned, other CPU"][2]


def settings() -> tuple[int, bool, bool, bool]:
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.mkldnn.enabled,
        torch._C._get_nnpack_enabled(),
    )


def test_demo_numerics_sets_and_restores_torch_settings(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MKL_CBWR", raising=False)
    before = settings()
    with demo_numerics("cpu") as numerics:
        assert settings() == (DEMO_THREADS, True, False, False)
    assert settings() == before
    assert numerics["threads"] == DEMO_THREADS
    # This process's torch started without the CPU environment, and the demo says that its
    # scores may then differ.
    assert "may differ from the README" in caplog.text
