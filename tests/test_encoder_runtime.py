"""The SAM image encoder's precision and backend (issue 19): ``auto`` resolved per device, the compiled
encoder against eager fp32 on the tiny random-weight SAM, batching against one slice at a time, and the
fall-back to eager when compiling fails. No wall-clock asserts (speed: benchmarks/generalist_speed.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.config import SamConfig
from pipeline.generalist import encoder_runtime
from pipeline.generalist.base import SlicePrompt
from pipeline.generalist.encoder_runtime import EncoderBackendChanged, EncoderRunner, resolve_sam_config
from pipeline.generalist.sam import SamGeneralist, load_sam, sam_embedding_cache

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it here


def _slices(b: int = 3, h: int = 40, w: int = 32) -> np.ndarray:
    """float32 (b, h, w): an ellipse on noise, shifted per slice."""
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(0)
    return np.stack([50 + 10 * rng.normal(size=(h, w)) + 300 * (((yy - 15 - s) / 9) ** 2 + ((xx - 12) / 6) ** 2 <= 1)
                     for s in range(b)]).astype(np.float32)


def _gen(checkpoint, **kw) -> SamGeneralist:
    cfg = SamConfig(variant="tiny", checkpoint=str(checkpoint), **kw)
    return SamGeneralist(load_sam(cfg, CPU), cfg, CPU)


# -- the config ---------------------------------------------------------------------------------------------
def test_the_new_fields_validate():
    cfg = SamConfig()
    assert (cfg.precision, cfg.encoder_backend) == ("auto", "auto")
    assert SamConfig(encoder_backend="compile", precision="bf16").encoder_backend == "compile"
    with pytest.raises(ValidationError, match="encoder_backend"):
        SamConfig(encoder_backend="onnx")
    with pytest.raises(ValidationError, match="precision"):
        SamConfig(precision="int8")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_resolves_per_device_and_variant(monkeypatch, native_bf16):
    monkeypatch.setattr(encoder_runtime, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(encoder_runtime, "openvino_available", lambda: False)
    lite = SamConfig(variant="lite_medsam")
    on_cpu = resolve_sam_config(lite, CPU)
    assert (on_cpu.precision, on_cpu.encoder_backend) == ("bf16" if native_bf16 else "fp32", "compile")
    monkeypatch.setattr(encoder_runtime, "openvino_available", lambda: True)
    assert resolve_sam_config(lite, CPU).encoder_backend == "openvino"  # the optional extra, where installed
    assert resolve_sam_config(lite, CUDA).encoder_backend == "eager"
    monkeypatch.setattr(encoder_runtime, "openvino_available", lambda: False)
    on_cuda = resolve_sam_config(lite, CUDA)
    assert (on_cuda.precision, on_cuda.encoder_backend) == ("fp32", "eager")  # CUDA: as before issue 19
    tiny = resolve_sam_config(SamConfig(variant="tiny"), CPU)
    assert (tiny.precision, tiny.encoder_backend) == ("fp32", "eager")  # the test model stays eager fp32
    explicit = resolve_sam_config(SamConfig(variant="vit_b", precision="fp16", encoder_backend="eager"), CPU)
    assert (explicit.precision, explicit.encoder_backend) == ("fp16", "eager")  # explicit values are kept


def test_the_runner_refuses_auto():
    with pytest.raises(ValueError, match="resolve_sam_config"):
        EncoderRunner(torch.nn.Identity(), CPU, "auto", "eager")


# -- batching -----------------------------------------------------------------------------------------------
def test_batching_gives_the_embeddings_of_one_slice_at_a_time(tiny_sam_checkpoint):
    vol = _slices(5)
    batched = _gen(tiny_sam_checkpoint, embed_batch_size=4).embed(vol)  # a batch of 4 and one of 1
    single = _gen(tiny_sam_checkpoint, embed_batch_size=1).embed(vol)
    assert batched.shape == single.shape == (5, 32, 8, 8)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


# -- the compiled encoder against eager fp32 ----------------------------------------------------------------
@pytest.fixture(scope="module")
def embeddings(tiny_sam_checkpoint) -> dict[str, np.ndarray]:
    """(3, 32, 8, 8) embeddings of ``_slices()`` per path; the compiled ones with embed_batch_size 3."""
    vol = _slices()
    out = {"eager fp32": _gen(tiny_sam_checkpoint, precision="fp32", encoder_backend="eager").embed(vol)}
    for precision in ("fp32", "bf16"):
        g = _gen(tiny_sam_checkpoint, precision=precision, encoder_backend="compile", embed_batch_size=3)
        out[f"compile {precision}"] = g.embed(vol)
        assert g.encoder.backend == "compile"  # it compiled (a C++ compiler is here), no fall-back
    return out


def test_compiled_fp32_matches_eager_fp32(embeddings):
    np.testing.assert_allclose(embeddings["compile fp32"], embeddings["eager fp32"], rtol=1e-4, atol=1e-4)


def test_compiled_bf16_is_close_to_eager_fp32(embeddings):
    ref, got = embeddings["eager fp32"], embeddings["compile bf16"]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 2e-2  # bf16 keeps 8 significant bits: ~0.4% per rounding; measured ~1%
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999


def test_compiled_bf16_masks_agree_with_eager_fp32(embeddings, tiny_sam_checkpoint):
    dec = _gen(tiny_sam_checkpoint, precision="fp32", encoder_backend="eager")
    vol = _slices()
    box = SlicePrompt(1, np.zeros((0, 2), np.float32), np.zeros(0, np.int32), np.array([6, 6, 18, 26], np.float32))
    for s in range(len(vol)):
        ref = dec.decode(embeddings["eager fp32"][s], vol[s].shape, [box])
        got = dec.decode(embeddings["compile bf16"][s], vol[s].shape, [box])
        np.testing.assert_allclose(got.logits, ref.logits, atol=0.05 * np.abs(ref.logits).max())
        assert (got.masks == ref.masks).mean() > 0.98


# -- when compiling fails -----------------------------------------------------------------------------------
@pytest.fixture
def broken_compile(monkeypatch):
    def compile_(module, **kw):
        def run(x):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", compile_)


def test_a_failed_compile_falls_back_to_eager(broken_compile, tiny_sam_checkpoint, caplog):
    g = _gen(tiny_sam_checkpoint, precision="fp32", encoder_backend="compile")
    vol = _slices(2)
    with caplog.at_level(logging.WARNING, logger="pipeline.generalist.encoder_runtime"):
        with pytest.raises(EncoderBackendChanged, match="eager"):
            g.embed(vol)  # the call that found it out returns nothing: its caller keys embeddings by backend
    assert g.encoder.backend == g.cfg.encoder_backend == "eager"
    assert any("no C++ compiler found" in r.getMessage() for r in caplog.records)
    out = g.embed(vol)  # and the next call runs eager
    eager = _gen(tiny_sam_checkpoint, precision="fp32", encoder_backend="eager").embed(vol)
    np.testing.assert_allclose(out, eager, rtol=1e-6, atol=1e-6)


def test_after_a_failed_compile_the_cache_key_names_eager(broken_compile, tiny_sam_checkpoint, tmp_path):
    """Eager embeddings never land under the compiled backend's key: the cache stays empty through the
    failing call, and the cache built after it (as the SAM worker rebuilds it) has the eager key."""
    g = _gen(tiny_sam_checkpoint, precision="fp32", encoder_backend="compile")
    compiled = sam_embedding_cache(tmp_path, g.cfg, 0, "float16")
    vol = _slices(2)
    with pytest.raises(EncoderBackendChanged):
        compiled.get("case_a", vol, [0, 1], g.embed)
    assert not list((tmp_path / compiled.key).glob("case_a/*"))  # nothing stored under the compiled key
    rebuilt = sam_embedding_cache(tmp_path, g.cfg, 0, "float16")
    assert rebuilt.key != compiled.key
    eager_cfg = SamConfig(variant="tiny", checkpoint=str(tiny_sam_checkpoint), precision="fp32", encoder_backend="eager")
    assert rebuilt.key == sam_embedding_cache(tmp_path, eager_cfg, 0, "float16").key
    got, cached = rebuilt.get("case_a", vol, [0, 1], g.embed)
    assert not cached and sorted(got) == [0, 1]
