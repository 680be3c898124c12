"""The fast Langevin loop: exact on its default path, replayable, and its speed options
(compile, bf16 autocast, channels-last) close to the default path within stated tolerances."""

import os
import shutil

import pytest
import torch

from distributed_ebm import langevin as langevin_module
from distributed_ebm.algorithms import ALGORITHMS
from distributed_ebm.config import ConfigError, LangevinConfig, ModelConfig, RunConfig, load_config
from distributed_ebm.energy import build_energy
from distributed_ebm.inpainting import inpaint_langevin
from distributed_ebm.langevin import cpu_has_native_bf16, langevin, resolve_autocast, score_grad

SHAPE = (3, 8, 8)
KNOBS = {"steps": 6, "step_size": 0.2, "ref_sigma": 0.7, "clamp": (-1.0, 1.0)}
INDUCTOR_CXX = os.environ.get("CXX", "g++")  # the compiler torch.compile's CPU backend calls


@pytest.fixture
def energy():
    """A small ConvEnergy with a random θ (the built one has θ = 0, hence ∇Φ = 0)."""
    net = build_energy(ModelConfig(channels=(8, 16)), SHAPE, "conv")
    torch.nn.init.normal_(net.theta.weight, generator=torch.Generator().manual_seed(0), std=0.5)
    return net


@pytest.fixture
def x0():
    return torch.rand((12, *SHAPE), generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture
def mask():
    """1 on the entries that move: a random half of the pixels, all channels."""
    spots = torch.rand((12, 1, *SHAPE[1:]), generator=torch.Generator().manual_seed(2)) < 0.5
    return spots.float().expand(12, *SHAPE)


def plain_langevin(score_fn, x0, *, steps, step_size, ref_sigma, clamp, generator, mask=None):
    """ALGORITHMS.md §2 written out the obvious way (the sampler before it was made fast)."""
    x = x0.clone()
    for _ in range(steps):
        grad = score_grad(score_fn, x)
        noise = torch.randn(x.shape, generator=generator)
        x = x + step_size**2 / 2 * (grad - 1 / ref_sigma**2 * x) + step_size * noise
        x = x.clamp(*clamp)
        if mask is not None:
            x = torch.where(mask.bool(), x, x0)
    return x


def run(energy, x0, seed=3, **kwargs):
    return langevin(energy, x0, generator=torch.Generator().manual_seed(seed), **KNOBS, **kwargs)


@pytest.mark.parametrize("masked", [False, True])
def test_default_path_is_the_plain_formula_bit_for_bit(energy, x0, mask, masked):
    m = mask if masked else None
    before = x0.clone()
    fast = run(energy, x0, mask=m)
    plain = plain_langevin(energy, x0, generator=torch.Generator().manual_seed(3), mask=m, **KNOBS)
    assert torch.equal(fast, plain)
    assert not torch.equal(fast, x0)  # the chains did move
    assert torch.equal(x0, before)  # x0 is not modified
    assert fast.is_contiguous() and not fast.requires_grad


def test_noise_stream_is_consumed_like_the_plain_loop(energy, x0):
    """A resumed run continues the generator where the sampler left it: the sampler must draw
    exactly steps × x0.numel() normals, like the plain loop."""
    gen_fast, gen_plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = langevin(energy, x0, generator=gen_fast, **KNOBS)
    plain_langevin(energy, x0, generator=gen_plain, **KNOBS)
    assert torch.equal(gen_fast.get_state(), gen_plain.get_state())
    again = langevin(energy, x0, generator=torch.Generator().manual_seed(5), **KNOBS)
    assert torch.equal(first, again)


def test_parameters_and_grad_mode_are_left_alone(energy, x0):
    out_default = run(energy, x0)
    with torch.no_grad():
        out_no_grad = run(energy, x0)
    assert torch.equal(out_default, out_no_grad)  # ∇ₓΦ still gets autograd under an outer no_grad
    assert all(p.grad is None for p in energy.parameters())
    assert torch.is_grad_enabled()


def test_loop_reads_no_tensor_back_to_the_host(energy, x0, mask, monkeypatch):
    """No .item(), bool(tensor) or float(tensor) in the loop: each is a device sync on a GPU."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the Langevin loop read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    run(energy, x0, mask=mask)
    with pytest.raises(AssertionError, match="read a tensor value"):  # the guard itself works
        bool(x0.sum() > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync detection needs a GPU")
def test_loop_has_no_cuda_sync(energy, x0, mask):
    device = torch.device("cuda")
    energy, x0, mask = energy.to(device), x0.to(device), mask.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    langevin(energy, x0, generator=gen, **KNOBS, mask=mask)  # warm-up: cuDNN set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        langevin(energy, x0, generator=gen, **KNOBS, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(
    shutil.which(INDUCTOR_CXX) is None,
    reason=f"torch.compile on the CPU needs a C++ compiler ('{INDUCTOR_CXX}' not on PATH)",
)
def test_compile_matches_the_default_path(energy, x0, mask):
    """Compiled ∇ₓΦ differs from eager autograd by float rounding only: |Δ| ≤ 1e-5 after 6 steps."""
    gen = torch.Generator().manual_seed(3)
    compiled = langevin(energy, x0, generator=gen, mask=mask, compile=True, **KNOBS)
    default = run(energy, x0, mask=mask)
    assert torch.allclose(compiled, default, rtol=0, atol=1e-5)
    assert torch.equal(gen.get_state(), _advanced(3, x0))  # the same noise stream
    assert torch.equal(compiled[mask == 0], x0[mask == 0])  # mask semantics kept exactly
    assert all(p.grad is None for p in energy.parameters())


def test_compile_without_a_cpp_compiler_fails_with_the_fix(energy, x0, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(
        RuntimeError, match=r"needs a C\+\+ compiler.*'no-such-compiler\+\+'.*compile=false"
    ):
        run(energy, x0, compile=True)


def test_bf16_autocast_is_close_to_the_default_path(energy, x0, mask):
    """bf16 carries ~1e-2 relative error in ∇ₓΦ; scaled by δ²/2 it moves the chains by far less
    than the noise δ·ε: stated tolerance |Δ| ≤ 1e-2 after 6 steps (measured 1.4e-3)."""
    bf16 = run(energy, x0, mask=mask, autocast="bf16")
    default = run(energy, x0, mask=mask)
    diff = (bf16 - default).abs().max()
    assert bf16.dtype == torch.float32  # the chains stay in float32
    assert 0 < diff <= 1e-2  # > 0: Φ really ran in bfloat16
    assert torch.equal(bf16[mask == 0], x0[mask == 0])


@pytest.mark.parametrize("native", [True, False])
def test_auto_autocast_is_bf16_on_a_native_bf16_cpu_and_float32_elsewhere(energy, x0, mask, monkeypatch, native):
    """autocast="auto" runs exactly the bf16 path where the CPU has bfloat16 in hardware and exactly the
    float32 path where it has not, and never bf16 on the GPU (where it did not pay)."""
    monkeypatch.setattr(langevin_module, "cpu_has_native_bf16", lambda: native)
    auto = run(energy, x0, mask=mask, autocast="auto")
    assert torch.equal(auto, run(energy, x0, mask=mask, autocast="bf16" if native else None))
    assert resolve_autocast("auto", "cpu") == ("bf16" if native else None)
    assert resolve_autocast("auto", "cuda") is None
    assert [resolve_autocast(v, "cuda") for v in ("bf16", None)] == ["bf16", None]  # explicit values stay


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    def cpu(flags: str) -> bool:
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16\n")  # only the flags line counts
        return cpu_has_native_bf16(str(path))

    assert cpu("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni")  # AMD Zen 4, Intel Cooper Lake
    assert cpu("fpu avx512f amx_bf16 amx_tile")  # Intel Sapphire Rapids
    assert not cpu("fpu sse2 avx2 avx512f avx512bw")  # AVX512 without bfloat16: emulated
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))  # not Linux


def test_channels_last_is_close_to_the_default_path(energy, x0, mask):
    """Only the convolution kernels change with the layout: |Δ| ≤ 1e-5 after 6 steps."""
    layouts = []

    def recording_energy(x):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return energy(x)

    gen = torch.Generator().manual_seed(3)
    cl = langevin(recording_energy, x0, generator=gen, mask=mask, channels_last=True, **KNOBS)
    default = run(energy, x0, mask=mask)
    assert layouts == [True] * KNOBS["steps"]  # Φ saw channels-last chains at every step
    assert torch.allclose(cl, default, rtol=0, atol=1e-5)
    assert torch.equal(gen.get_state(), _advanced(3, x0))  # ε per entry as in the default path
    assert torch.equal(cl[mask == 0], x0[mask == 0])
    assert cl.is_contiguous()  # handed back in x0's layout


def _advanced(seed, x0):
    """The state of a generator seeded `seed` after the plain loop's draws."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(KNOBS["steps"]):
        torch.randn(x0.shape, generator=gen)
    return gen.get_state()


def test_bad_options_fail_with_the_cause_and_the_fix(energy, x0):
    with pytest.raises(ValueError, match=r"Unknown Langevin autocast 'fp16'.*\['bf16'\]"):
        run(energy, x0, autocast="fp16")
    with pytest.raises(ValueError, match="keeps the chains in float32.*torch.float64"):
        run(energy.double(), x0.double(), autocast="bf16")
    ring = lambda x: -x.pow(2).sum(1)  # noqa: E731
    with pytest.raises(
        ValueError, match=r"channels_last needs image chains.*\(5, 2\).*channels_last=false"
    ):
        langevin(ring, torch.zeros(5, 2), steps=1, step_size=0.1, ref_sigma=1.0, channels_last=True)


def test_config_carries_the_options_and_rejects_unknown_autocast():
    config = load_config(
        None,
        {"langevin.compile": True, "langevin.autocast": "bf16", "langevin.channels_last": True},
    )
    assert (config.langevin.compile, config.langevin.autocast, config.langevin.channels_last) == (
        True,
        "bf16",
        True,
    )
    assert RunConfig.from_dict(config.to_dict()) == config
    assert LangevinConfig() == LangevinConfig(compile=False, autocast=None, channels_last=False)
    with pytest.raises(
        ConfigError, match=r"langevin.autocast must be null \(float32\), 'bf16' or 'auto', got 'fp16'"
    ):
        load_config(None, {"langevin.autocast": "fp16"})
    with pytest.raises(ConfigError, match="'langevin.compile' must be a bool"):
        load_config(None, {"langevin.compile": "yes please"})


def test_training_sampler_and_inpainting_pass_the_options_through(x0, mask):
    """The run's sampler (training, `debm sample`) and inpaint_langevin hand the config's options to
    the sampler: their results equal a direct call with those options, not the default one."""
    config = load_config(
        None,
        {
            "model.channels": [8, 16],
            "langevin.autocast": "bf16",
            "langevin.channels_last": True,
            "langevin.langevin_steps": 4,
        },
    )
    state = ALGORITHMS["wgcn"].build(
        config,
        SHAPE,
        device=torch.device("cpu"),
        generator=torch.Generator(),
        data_mean=torch.zeros(1, *SHAPE),
    )
    torch.nn.init.normal_(
        state.energy.theta.weight, generator=torch.Generator().manual_seed(0), std=0.5
    )
    knobs = {
        "steps": 4,
        "step_size": config.langevin.step_size,
        "ref_sigma": config.langevin.ref_sigma,
        "clamp": state.data_range,
    }

    def direct(**options):
        return langevin(
            state.energy, x0, generator=torch.Generator().manual_seed(9), **knobs, **options
        )

    through = state.sampler(state.energy, x0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(through, direct(autocast="bf16", channels_last=True))
    assert not torch.equal(through, direct())

    missing = mask[:, :1].contiguous()
    inpainted = {
        options: inpaint_langevin(
            state.energy,
            x0,
            missing,
            generator=torch.Generator().manual_seed(9),
            steps=4,
            step_size=0.2,
            ref_sigma=1.0,
            autocast=options,
        )
        for options in (None, "bf16")
    }
    assert not torch.equal(inpainted[None], inpainted["bf16"])
    assert torch.equal(inpainted["bf16"][mask == 0], x0[mask == 0])
