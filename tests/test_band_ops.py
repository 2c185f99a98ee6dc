"""Multi-band pixels after reading: crop / resize / flip in the native dtype against a float64 reference and against
torchvision, the nodata fill, per-band statistics against numpy, and the per-band device normalisation against
today's ImageNet ``normalize``."""

import math

import numpy as np
import pytest
import torch
from fastmae.train.data import decode, resample
from fastmae.train.data.bandstats import band_statistics, sample_files
from fastmae.train.data.normalize import band_affine, normalize_bands
from fastmae.train.data.rasters import read_raster
from fastmae.train.data.resample import (
    crop_resize_flip,
    crop_resize_flip_reference,
    eval_resize_crop,
    fill_nodata,
    resize_matrix,
)

from fastmae import FastMAEError

NATIVE = (torch.uint16, torch.int16, torch.float32)
FAST = ("compiled", "matmul")  # the two fast paths; "compiled" must be built where the tests run (a C compiler)
# (box x, y, w, h), flip, size on a 37 x 45 image: shrink, enlarge, aspect change, thin, whole, 1 px, odd sizes
BOXES = [((3, 5, 40, 30), True, 17), ((0, 0, 45, 37), False, 45), ((10, 2, 13, 31), False, 29), ((7, 0, 2, 37),
         True, 9), ((44, 36, 1, 1), False, 3), ((1, 1, 43, 35), True, 97)]  # fmt: skip


def _smooth(dtype, c=13, h=37, w=45, seed=0):
    """A smooth field with noise over most of the dtype's range (real images are mostly smooth)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (3 + b) + b) * np.cos(y / (4 + b)) for b in range(c)])
    if dtype == torch.float32:
        return torch.from_numpy((base * 3000 + rng.normal(0, 50, base.shape)).astype(np.float32))
    lo, hi = (0, 65535) if dtype == torch.uint16 else (-32768, 32767) if dtype == torch.int16 else (0, 255)
    mid, amp = (lo + hi) / 2, (hi - lo) / 2
    vals = np.clip(mid + amp * 0.9 * base + rng.normal(0, amp * 0.02, base.shape), lo, hi)
    return torch.from_numpy(np.rint(vals).astype({torch.uint16: np.uint16, torch.int16: np.int16,
                                                  torch.uint8: np.uint8}[dtype]))  # fmt: skip


# ----------------------------------------------------------------------------------------- crop / resize / flip
def _layout(img: torch.Tensor, layout: str) -> torch.Tensor:
    """``img [C, H, W]`` as band planes, or as a view of pixel-interleaved memory (``H x W x C``, as .npy and TIFF
    files hold it)."""
    return img if layout == "planes" else img.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def _assert_rounded_once(got: torch.Tensor, img: torch.Tensor, box, flip: bool, size: int):
    """An integer result against the exact (float64) resampling: at most 1 apart, and only where the exact value is
    within float32's summation error of a rounding boundary (x.5): one rounding, at the end."""
    x, y, w, h = box
    exact = torch.einsum("oy,cyx,px->cop", torch.from_numpy(resize_matrix(h, size).copy()),
                         img[:, y : y + h, x : x + w].double(),
                         torch.from_numpy(resize_matrix(w, size, flip).copy()))  # fmt: skip
    lo, hi = resample._INT_RANGE[img.dtype]
    want = torch.floor(exact + 0.5).clamp(lo, hi)
    off = got.double() != want
    assert (got.double() - want).abs().max() <= 1, (box, flip, size)
    slack = 8 * 2.0**-23 * float(img.double().abs().max())  # 8 float32 epsilons of the largest value
    assert ((exact - torch.floor(exact) - 0.5).abs()[off] <= slack).all(), (box, flip, size, exact[off])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", NATIVE)
@pytest.mark.parametrize("bands", [1, 2, 5, 13, 17])
def test_crop_resize_flip_matches_the_float64_reference(backend, dtype, bands):
    """Both fast paths, band counts on each side of the compiled path's 4- and 8-lane blocks, band planes and
    pixel-interleaved memory."""
    for layout in ("planes", "interleaved"):
        img = _layout(_smooth(dtype, bands), layout)
        for box, flip, size in BOXES:
            got = crop_resize_flip(img, box, flip, size, backend=backend)
            assert got.dtype == dtype and got.shape == (bands, size, size) and got.is_contiguous()
            if dtype == torch.float32:  # float32 products of ~1e3 values: a few ulps of the values
                ref = crop_resize_flip_reference(img, box, flip, size)
                assert (got.double() - ref.double()).abs().max() <= 1e-5 * ref.double().abs().max() + 1e-4, box
            else:
                _assert_rounded_once(got, img, box, flip, size)
            assert torch.equal(got, crop_resize_flip(img, box, flip, size, backend=backend))  # deterministic


def test_the_compiled_path_on_uint8_and_any_output_strides():
    """uint8 (what the loader sends it with nodata) rounds once, unlike the uint8 path's two 8-bit passes; the output
    may be a channels-last batch's slot or any strided view; a wrong output is refused before any C runs."""
    img = _smooth(torch.uint8, 3)
    for box, flip, size in BOXES:
        _assert_rounded_once(crop_resize_flip(img, box, flip, size, backend="compiled"), img, box, flip, size)
    f32 = _smooth(torch.float32, 13)
    want = crop_resize_flip(f32, (1, 2, 30, 20), True, 24, backend="compiled")
    slot = torch.zeros(2, 24, 24, 13).permute(0, 3, 1, 2)  # channels-last
    got = crop_resize_flip(f32, (1, 2, 30, 20), True, 24, out=slot[1], backend="compiled")
    assert got.data_ptr() == slot[1].data_ptr() and torch.equal(slot[1], want) and not slot[0].any()
    wide = torch.zeros(13, 24, 50)
    crop_resize_flip(f32, (1, 2, 30, 20), True, 24, out=wide[:, :, 3:27], backend="compiled")
    assert torch.equal(wide[:, :, 3:27], want) and not wide[:, :, :3].any() and not wide[:, :, 27:].any()
    with pytest.raises(FastMAEError, match=r"the output \[13, 24, 23\] torch.float32 does not take"):
        crop_resize_flip(f32, (1, 2, 30, 20), True, 24, out=torch.empty(13, 24, 23), backend="compiled")
    with pytest.raises(FastMAEError, match="does not take a 13 x 24 x 24 torch.float32"):
        crop_resize_flip(f32, (1, 2, 30, 20), True, 24, out=torch.empty(13, 24, 24, dtype=torch.uint16),
                         backend="compiled")  # fmt: skip


def test_the_compiled_path_refuses_what_it_cannot_take():
    """Tensors off the CPU (a device pointer handed to C would crash the process) and a fill that an integer image
    cannot hold are one-line errors; ``fast`` leaves tensors off the CPU to torch."""
    img = _smooth(torch.int16, 3)
    meta = torch.empty(3, 8, 8, dtype=torch.int16, device="meta")
    with pytest.raises(FastMAEError, match=r"works on CPU tensors \(the image is on meta\)"):
        crop_resize_flip(meta, (0, 0, 8, 8), False, 4, backend="compiled")
    with pytest.raises(FastMAEError, match=r"the image is on cpu, the output on meta\)"):
        crop_resize_flip(img, (0, 0, 8, 8), False, 4, out=meta[:, :4, :4], backend="compiled")
    assert resample._float_path("fast", img, None) == "compiled" and resample._float_path("fast", meta) == "matmul"
    for backend in ("compiled", "matmul", "reference"):
        with pytest.raises(FastMAEError, match=r"the nodata fill \[nan, 1.0, 1.0\] of a torch.int16 image must be"):
            crop_resize_flip(img, (0, 0, 8, 8), False, 4, nodata=0, fill=[math.nan, 1, 1], backend=backend)


def test_the_compiled_path_in_threads_gives_the_serial_results():
    """The C code runs without the GIL, each thread with its own work buffers (the loader's thread pools)."""
    from concurrent.futures import ThreadPoolExecutor

    imgs = [_layout(_smooth(torch.uint16, 13, 60, 70, seed=s), "interleaved") for s in range(4)]
    jobs = [(imgs[i % 4], (i % 9, i % 7, 40 + i % 20, 35 + i % 15), bool(i % 2), 32 + i % 5) for i in range(48)]
    serial = [crop_resize_flip(*job, backend="compiled") for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: crop_resize_flip(*job, backend="compiled"), jobs))
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded, strict=True))


def test_the_reference_is_torchvisions_antialiased_bicubic():
    """On float32, torchvision's resized_crop + hflip (what a plain pipeline runs) computes the same resampling."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    img = _smooth(torch.float32, 5)
    for (x, y, w, h), flip, size in BOXES:
        tv = F.resized_crop(img, y, x, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
        tv = tv.flip(-1) if flip else tv
        ours = crop_resize_flip_reference(img, (x, y, w, h), flip, size)
        assert (tv.double() - ours.double()).abs().max() <= 1e-3 * img.abs().max()


@pytest.mark.parametrize("bands", [1, 3, 4])
def test_uint8_takes_todays_uint8_path_bit_for_bit(bands):
    img = _smooth(torch.uint8, bands)
    for box, flip, size in BOXES:
        got = crop_resize_flip(img, box, flip, size)
        assert torch.equal(got, decode.crop_resize_flip(img, box, flip, size))
        # today's path rounds to 8 bits between its passes (Pillow's), the reference once: a few levels apart
        assert (got.int() - crop_resize_flip_reference(img, box, flip, size).int()).abs().max() <= 3
    assert torch.equal(eval_resize_crop(img, 24), decode.eval_resize_crop(img, 24))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", NATIVE)
def test_eval_view_is_resize_then_centre_crop(backend, dtype):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    for h, w in [(37, 45), (45, 37), (30, 30)]:
        img = _smooth(dtype, 4, h, w)
        got = eval_resize_crop(img, 24, backend=backend)
        ref = eval_resize_crop(img, 24, backend="reference")
        assert got.shape == (4, 24, 24) and got.dtype == dtype
        assert (got.double() - ref.double()).abs().max() <= (1 if dtype != torch.float32 else 0.05)
        if dtype == torch.float32:  # torchvision's Resize(int) + CenterCrop geometry
            tv = F.center_crop(F.resize(img, [int(24 / 0.875)], InterpolationMode.BICUBIC, antialias=True), [24, 24])
            assert (tv - got).abs().max() <= 1e-3 * img.abs().max()


def test_backend_switch_and_refusals(monkeypatch):
    img = _smooth(torch.uint16, 3)
    monkeypatch.setenv("FASTMAE_RESAMPLE", "reference")
    assert torch.equal(crop_resize_flip(img, (1, 2, 20, 30), True, 16),
                       crop_resize_flip_reference(img, (1, 2, 20, 30), True, 16))  # fmt: skip
    assert resample.backend_label() == "float64 reference (FASTMAE_RESAMPLE=reference)"
    monkeypatch.setenv("FASTMAE_RESAMPLE", "fastest")
    with pytest.raises(FastMAEError, match="unknown resample backend 'fastest'"):
        crop_resize_flip(img, (1, 2, 20, 30), True, 16)
    monkeypatch.setenv("FASTMAE_RESAMPLE", "matmul")
    assert torch.equal(crop_resize_flip(img, (1, 2, 20, 30), True, 16),
                       crop_resize_flip(img, (1, 2, 20, 30), True, 16, backend="matmul"))  # fmt: skip
    monkeypatch.delenv("FASTMAE_RESAMPLE")
    assert resample.backend_label().startswith("compiled taps (")  # fast = compiled where it is built
    assert torch.equal(crop_resize_flip(img, (1, 2, 20, 30), True, 16),
                       crop_resize_flip(img, (1, 2, 20, 30), True, 16, backend="compiled"))  # fmt: skip
    monkeypatch.setattr(resample, "_compiled", None)  # as where no C compiler was found at install
    monkeypatch.setattr(resample, "COMPILED_MISSING", "fastmae's compiled resampler is not built (no module)")
    assert torch.equal(crop_resize_flip(img, (1, 2, 20, 30), True, 16),
                       crop_resize_flip(img, (1, 2, 20, 30), True, 16, backend="matmul"))  # fmt: skip
    assert resample.backend_label() == "torch matmul (fastmae's compiled resampler is not built (no module))"
    with pytest.raises(FastMAEError, match=r"resample backend 'compiled' \(FASTMAE_RESAMPLE\): fastmae's compiled"):
        crop_resize_flip(img, (1, 2, 20, 30), True, 16, backend="compiled")
    monkeypatch.undo()
    monkeypatch.setattr(resample, "COMPILED_ISA", "x86-64")  # a CPU without AVX2: the baseline clone, not faster
    assert resample._float_path("fast", img) == "matmul" and resample._float_path("compiled", img) == "compiled"
    assert resample.backend_label().startswith("torch matmul (the compiled taps run x86-64 code on this CPU")
    assert resample.backend_label("compiled") == "compiled taps (x86-64)"
    with pytest.raises(FastMAEError, match="dtype torch.int32"):
        crop_resize_flip(img.int(), (0, 0, 4, 4), False, 4)


@pytest.mark.parametrize("backend", FAST)
def test_integers_are_rounded_half_up_and_clamped(backend):
    """A constant image stays constant exactly; overshoot at a sharp edge is clamped to the dtype's range."""
    for dtype, (lo, hi) in [(torch.uint16, (0, 65535)), (torch.int16, (-32768, 32767))]:
        flat = torch.full((2, 20, 20), 1234, dtype=dtype)
        assert torch.equal(crop_resize_flip(flat, (3, 3, 11, 13), True, 29, backend=backend),
                           torch.full((2, 29, 29), 1234, dtype=dtype))  # fmt: skip
        edge = torch.full((1, 20, 20), lo, dtype=dtype)
        edge[:, :, 10:] = hi  # bicubic rings past both ends here
        out = crop_resize_flip(edge, (0, 0, 20, 20), False, 57, backend=backend)
        ref = torch.einsum("oy,cyx,px->cop", torch.from_numpy(resize_matrix(20, 57).copy()), edge.double(),
                           torch.from_numpy(resize_matrix(20, 57).copy()))  # fmt: skip
        assert ref.max() > hi and ref.min() < lo  # it does ring
        assert int(out.int().max()) == hi and int(out.int().min()) == lo
    assert resize_matrix(9, 4).sum(1) == pytest.approx(np.ones(4))
    assert np.array_equal(resize_matrix(9, 4, True), resize_matrix(9, 4)[::-1])


def test_resize_matrices_are_the_gpu_kernels():
    """The same taps and weights as the crop kernel's reference (fastmae.kernels.crop_resize), built per output row
    there: one resampling for the CPU and GPU paths."""
    from fastmae.kernels.crop_resize import _coeffs

    for n_in, n_out in [(1, 3), (2, 9), (37, 17), (264, 224), (118, 224), (45, 97), (7, 1), (500, 3)]:
        for flip in (False, True):
            ours, kernel = resize_matrix(n_in, n_out, flip), _coeffs(n_in, n_out, flip).numpy()
            assert np.array_equal(ours != 0, kernel != 0) and np.abs(ours - kernel).max() <= 1e-15


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", NATIVE)
def test_results_survive_the_next_call(backend, dtype):
    """The work buffers are reused from call to call; what a call returned is not among them."""
    first = crop_resize_flip(_smooth(dtype, 3, seed=1), (2, 3, 30, 20), False, 16, backend=backend)
    kept = first.clone()
    crop_resize_flip(_smooth(dtype, 3, seed=2) * (2 if dtype == torch.float32 else 1), (0, 0, 45, 37), True, 16,
                     backend=backend)  # fmt: skip
    view = eval_resize_crop(_smooth(dtype, 3, seed=3), 16, backend=backend)
    kept_view = view.clone()
    eval_resize_crop(_smooth(dtype, 3, seed=4), 16, backend=backend)
    assert torch.equal(first, kept) and torch.equal(view, kept_view)


def test_output_is_contiguous_or_written_into_a_batch_slot():
    img = _smooth(torch.uint16, 13)
    out = crop_resize_flip(img, (0, 0, 45, 37), False, 24)
    assert out.is_contiguous()
    batch = torch.zeros(2, 13, 24, 24, dtype=torch.uint16)
    written = crop_resize_flip(img, (0, 0, 45, 37), False, 24, out=batch[1])  # straight into the slot
    assert written.data_ptr() == batch[1].data_ptr() and torch.equal(batch[1], out) and not batch[0].any()
    f32 = _smooth(torch.float32, 3)
    slot = torch.empty(1, 24, 24, 3).permute(0, 3, 1, 2)  # a channels-last batch takes it too
    assert torch.equal(crop_resize_flip(f32, (1, 2, 30, 20), True, 24, out=slot[0]),
                       crop_resize_flip(f32, (1, 2, 30, 20), True, 24))  # fmt: skip


# ------------------------------------------------------------------------------------------------------ nodata
def test_fill_nodata_per_band_nan_and_integer_rounding():
    img = torch.tensor([[[0, 5], [7, 0]], [[3, 0], [0, 9]]], dtype=torch.uint16)
    out = fill_nodata(img, 0, [10.4, 20.6])
    assert out.tolist() == [[[10, 5], [7, 10]], [[3, 21], [21, 9]]] and img[0, 0, 0] == 0  # a copy
    assert fill_nodata(img, [0, 9], [1, 2]).tolist() == [[[1, 5], [7, 1]], [[3, 0], [0, 2]]]
    assert fill_nodata(img, -5, 1).tolist() == img.tolist()  # no uint16 equals -5
    f = torch.tensor([[[math.nan, 1.0], [2.0, math.nan]]])
    assert fill_nodata(f, math.nan, 0.5).tolist() == [[[0.5, 1.0], [2.0, 0.5]]]
    i16 = torch.tensor([[[-9999, 3]]], dtype=torch.int16)
    assert fill_nodata(i16, -9999, 70000.0).tolist() == [[[32767, 3]]]  # clamped to the dtype
    with pytest.raises(FastMAEError, match="1 or 2 values"):
        fill_nodata(img, [0, 0, 0], 1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int16, torch.float32])
def test_the_fast_paths_fill_as_fill_nodata_does(dtype):
    """Both fast paths fill nodata on their float copy of the crop: the same pixels as fill_nodata then the resize,
    per band, with values the dtype cannot hold matching nothing and integer fills rounded and clamped."""
    img = _layout(_smooth(dtype, 4, seed=5), "interleaved").clone()
    if dtype == torch.float32:
        img[0, 3:9, 4:20], img[1, 10:12] = math.nan, 5.0
        nodata, fill = [math.nan, 5.0, math.nan, 7.25], [10.5, -3.0, 0.0, 1.0]
    else:
        lo, hi = resample._INT_RANGE[dtype]
        img[0, 3:9, 4:20], img[1, 10:12], img[3, 20:] = 9, lo, hi
        nodata, fill = [9, lo, -0.5 if lo == 0 else 0.5, hi], [20.6, 1e9, 3, -1e9]  # band 2: nothing matches
    for backend in FAST:
        for box, flip, size in BOXES:
            got = crop_resize_flip(img, box, flip, size, nodata=nodata, fill=fill, backend=backend)
            if dtype == torch.uint8 and backend == "matmul":  # uint8 without nodata takes the 8-bit (Pillow) path
                want = crop_resize_flip(fill_nodata(img, nodata, fill), box, flip, size, backend="compiled")
                assert (got.int() - want.int()).abs().max() <= 1, (backend, box)
                continue
            want = crop_resize_flip(fill_nodata(img, nodata, fill), box, flip, size, backend=backend)
            assert torch.equal(got, want), (backend, box)


@pytest.mark.parametrize("dtype", [torch.int16, torch.float32])
def test_nodata_filled_before_the_resize_does_not_leak(dtype):
    """A tile of 1000 with a block of nodata (-9999, or NaN for floats): filled with 1000 before resampling, every
    output pixel is exactly 1000; filled after (what a device-side fill would do), the ringing has spread."""
    nodata = math.nan if dtype == torch.float32 else -9999
    img = torch.full((3, 30, 30), 1000, dtype=dtype)
    img[:, 10:18, 5:25] = nodata
    tol = 0 if dtype == torch.int16 else 1e-3  # float32 weights sum to 1 within a few ulps
    for backend in ("compiled", "matmul", "reference"):
        out = crop_resize_flip(img, (2, 2, 26, 26), True, 41, nodata=nodata, fill=1000, backend=backend)
        assert out.dtype == dtype and (out.double() - 1000).abs().max() <= tol
        view = eval_resize_crop(img, 16, nodata=nodata, fill=1000, backend=backend)
        assert view.shape == (3, 16, 16) and (view.double() - 1000).abs().max() <= tol
    raw = crop_resize_flip(img, (2, 2, 26, 26), True, 41)  # no fill before: nodata mixed into its neighbours
    if dtype == torch.float32:  # every output pixel a NaN touches is lost: more than the block's share of them
        assert torch.isnan(raw).double().mean() > 1.2 * (8 * 20) / (26 * 26)
    else:  # -9999 rings into the valid pixels around the block, which a later fill cannot tell apart
        assert ((raw.double() - 1000).abs() > 100).sum() > ((raw == -9999).sum() + 100)


# ------------------------------------------------------------------------------------------------ statistics
def _stat_files(tmp_path, count=5, dtype=np.uint16, nodata=None, nan=False):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        h, w = 9 + i, 11 + 2 * i  # different sizes: the pixel counts weigh each file
        arr = (rng.normal(1000 + 300 * np.arange(4)[:, None, None], 50 + 20 * i, (4, h, w))).astype(dtype)
        if nodata is not None:
            arr[:, : 2 + i % 2, :] = nodata
        if nan:
            arr[1, :, :3] = np.nan
        np.save(tmp_path / f"{i}.npy", arr)
        paths.append(str(tmp_path / f"{i}.npy"))
    return paths


def _numpy_stats(paths, nodata=None):
    arrs = [np.load(p).astype(np.float64) for p in paths]
    means, stds, counts = [], [], []
    for b in range(arrs[0].shape[0]):
        x = np.concatenate([a[b].ravel() for a in arrs])
        x = x[~np.isnan(x)]
        if nodata is not None:
            x = x[x != nodata]
        means.append(x.mean())
        stds.append(x.std())
        counts.append(x.size)
    return np.array(means), np.array(stds), np.array(counts)


@pytest.mark.parametrize("case", ["plain", "nodata", "nan", "int16"])
def test_statistics_equal_numpy_over_all_files_and_pixels(tmp_path, case):
    nodata = 0 if case == "nodata" else None
    dtype = np.float32 if case == "nan" else np.int16 if case == "int16" else np.uint16
    paths = _stat_files(tmp_path, dtype=dtype, nodata=nodata, nan=case == "nan")
    got = band_statistics(paths, nodata=nodata, sample=None)
    mean, std, count = _numpy_stats(paths, nodata)
    np.testing.assert_array_equal(got.count, count)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(got.std, std, rtol=1e-12)
    assert got.mean.dtype == np.float64 and list(got.files) == list(range(len(paths))) and got.failed == ()
    if case == "nodata":  # the nodata rows would pull the means far down
        assert (got.mean > 900).all() and (_numpy_stats(paths)[0] < got.mean).all()


def test_statistics_sample_is_seeded_and_workers_do_not_change_it(tmp_path):
    paths = _stat_files(tmp_path, count=9)
    a = band_statistics(paths, sample=4, seed=3)
    assert list(a.files) == list(sample_files(9, 4, 3)) and len(set(a.files)) == 4
    np.testing.assert_allclose(a.mean, _numpy_stats([paths[i] for i in a.files])[0], rtol=1e-13)
    b = band_statistics(paths, sample=4, seed=3, workers=2)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std)  # bit for bit
    assert list(band_statistics(paths, sample=4, seed=4).files) != list(a.files)
    sub = band_statistics(paths, sample=None, pixels=30, seed=0)
    assert (sub.count == 30 * 9).all()
    assert np.array_equal(sub.mean, band_statistics(paths, sample=None, pixels=30, seed=0, workers=2).mean)
    np.testing.assert_allclose(sub.mean, _numpy_stats(paths)[0], rtol=0.05)  # a sample of the same pixels


def test_statistics_from_bytes_with_failures_and_refusals(tmp_path):
    paths = _stat_files(tmp_path, count=3)
    data = [open(p, "rb").read() for p in paths] + [b"garbage"]
    got = band_statistics(data, sample=None, read=read_raster)
    np.testing.assert_allclose(got.mean, _numpy_stats(paths)[0], rtol=1e-13)
    assert [p for p, _ in got.failed] == [3] and "not a .npy, TIFF or PNG" in got.failed[0][1]
    np.save(tmp_path / "five.npy", np.zeros((5, 4, 6), np.uint16))
    with pytest.raises(FastMAEError, match="has 5 bands, the first one read 4"):
        band_statistics(paths + [str(tmp_path / "five.npy")], sample=None)
    with pytest.raises(FastMAEError, match="no file of the 1 sampled"):
        band_statistics([b"x"], sample=None)
    blank = np.zeros((2, 3, 3), np.uint16)
    blank[0] = 5
    np.save(tmp_path / "blank.npy", blank)
    empty = band_statistics([str(tmp_path / "blank.npy")], nodata=0, sample=None)
    assert empty.count.tolist() == [9, 0] and math.isnan(empty.std[1]) and empty.mean[0] == 5


# ------------------------------------------------------------------------------------------------ normalisation
def test_normalize_bands_is_todays_imagenet_normalize_bit_for_bit():
    imgs = torch.randint(0, 256, (4, 3, 17, 19), dtype=torch.uint8)
    mean = [m * 255 for m in decode.IMAGENET_MEAN]
    std = [s * 255 for s in decode.IMAGENET_STD]
    assert torch.equal(normalize_bands(imgs, mean, std), decode.normalize(imgs))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int16, torch.float32])
def test_normalize_bands_matches_float64_for_every_native_dtype(dtype):
    x = _smooth(dtype if dtype != torch.uint8 else torch.uint8, 13, 12, 10).unsqueeze(0).repeat(2, 1, 1, 1)
    mean = np.linspace(-50, 2000, 13)
    std = np.linspace(3, 900, 13)
    ref = (x.double() - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    got = normalize_bands(x, mean, std)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-5)
    bf = normalize_bands(x, mean, std, torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), ref, rtol=1e-2, atol=1e-2)
    if dtype == torch.float32:
        assert torch.equal(x, _smooth(torch.float32, 13, 12, 10).unsqueeze(0).repeat(2, 1, 1, 1))  # not modified
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalize_bands(channels_last, mean, std), got)


def test_normalize_bands_refusals():
    x = torch.zeros(1, 2, 3, 3, dtype=torch.uint16)
    with pytest.raises(FastMAEError, match="std \\[0.0\\] at band\\(s\\) \\[1\\]"):
        normalize_bands(x, [0, 0], [1, 0])
    with pytest.raises(FastMAEError, match="batch of 2 bands, statistics of 3"):
        normalize_bands(x, [0, 0, 0], [1, 1, 1])
    with pytest.raises(FastMAEError, match="one value per band"):
        band_affine([0, 0], [1])
    with pytest.raises(FastMAEError, match="torch.float64"):
        normalize_bands(x.double(), [0, 0], [1, 1])
    scale, shift = band_affine([10.0, 20.0], [2.0, 4.0])
    assert scale.flatten().tolist() == [0.5, 0.25] and shift.flatten().tolist() == [-5.0, -5.0]
    assert band_affine([10.0, 20.0], [2.0, 4.0])[0] is scale  # made once per statistics and device
