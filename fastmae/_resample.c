/* fastmae._resample: crop, resize (separable, antialiased bicubic taps) and flip of one multi-band image in its own
 * dtype, for the loader's workers. Python's side (train/data/resample.py) makes the taps, checks every shape, stride
 * and pointer, and owns the buffers; this file only computes.
 *
 * One image: the crop [C, h, w] (uint8 / uint16 / int16 / float32, any element strides) -> out [C, S_h, S_w] of the
 * same dtype (any element strides). Three passes over memory that stays in the core's caches:
 *   1. load: the crop as float32, pixel-interleaved [h, w, C] (one read of the crop, cast on the way); nodata
 *      pixels replaced by their band's fill.
 *   2. vertical: tmp[o] = sum_k wy[o, k] * buf[ylo[o] + k], each row [w * C] contiguous (vectorised).
 *   3. horizontal: out[:, o, p] = sum_k wx[p, k] * tmp[o, xlo[p] + k, :], the bands contiguous (vectorised over C),
 *      each output row gathered as [S_w, C] floats, then rounded half up, clamped to the dtype and written band by
 *      band ([S_w] contiguous per band, mirrored when flipping).
 * float32 throughout, no rounding between the passes; the tap weights are the rows of the float64 resampling matrix
 * cast to float32, as the matrix path uses them.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

enum { DT_U8 = 0, DT_U16 = 1, DT_I16 = 2, DT_F32 = 3 };

typedef ptrdiff_t ssize; /* Py_ssize_t's type */

/* The hot loops are compiled twice on x86-64: for AVX2 + FMA (x86-64-v3) and for the baseline; the loader picks
 * one when the module loads (GCC's function multi-versioning). Elsewhere, the compiler's defaults. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 &&                             \
    !defined(FASTMAE_RESAMPLE_ONE_ISA)
#define FASTMAE_CLONES 1 /* GCC 11 knows x86-64-v3 */
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* The horizontal pass sums `cp` floats per pixel: the band count rounded up to 8 (whole AVX2 registers) from 5 bands
 * on, reading past a pixel's last band into the next pixel (or the row's zeroed slack, SLACK floats) and ignoring
 * those lanes; the band count itself for 1 to 4 bands (the padding would be most of the work). */
#define SLACK 8
static int padded(int c) { return c <= 4 ? c : (c + 7) / 8 * 8; }

/* ----------------------------------------------------------------------------------------------- 1. load */
#define LOAD(T)                                                                                                       \
    HOT static void load_##T(const T *src, ssize sc, ssize sy, ssize sx, int c, int h, int w, float *buf) {          \
        ssize n = (ssize)w * c;                                                                                       \
        for (int y = 0; y < h; y++) {                                                                                 \
            float *dst = buf + y * n;                                                                                 \
            if (sc == 1 && sx == c) { /* pixel-interleaved rows: one contiguous run */                               \
                const T *row = src + y * sy;                                                                          \
                for (ssize j = 0; j < n; j++) dst[j] = (float)row[j];                                                 \
            } else { /* band planes (any strides): each band's row read along x, written every c floats */          \
                for (int b = 0; b < c; b++) {                                                                         \
                    const T *row = src + b * sc + y * sy;                                                             \
                    for (int x = 0; x < w; x++) dst[(ssize)x * c + b] = (float)row[x * sx];                           \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
    }
LOAD(uint8_t)
LOAD(uint16_t)
LOAD(int16_t)
LOAD(float)

static void fill_nodata(float *buf, ssize pixels, int c, const uint8_t *has, const float *nodata, const float *fill) {
    for (ssize i = 0; i < pixels; i++) {
        float *px = buf + i * c;
        for (int b = 0; b < c; b++) {
            if (!has[b]) continue;
            float v = px[b];
            if (v == nodata[b] || (nodata[b] != nodata[b] && v != v)) px[b] = fill[b]; /* NaN matches NaN */
        }
    }
}

/* -------------------------------------------------------------------------------------------- 2. vertical */
/* dst[j] (= 0 when init) + the sum of up to 4 taps w[t] * r[t][j]: one load and store of dst per 4 taps */
HOT static void taps4(float *restrict dst, int init, const float *const *r, const float *w, int k, ssize n) {
    if (k == 4) {
        const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
        float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
        if (init)
            for (ssize j = 0; j < n; j++) dst[j] = w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j];
        else
            for (ssize j = 0; j < n; j++) dst[j] += w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j];
    } else if (k >= 2) {
        const float *r0 = r[0], *r1 = r[1];
        float w0 = w[0], w1 = w[1];
        if (init)
            for (ssize j = 0; j < n; j++) dst[j] = w0 * r0[j] + w1 * r1[j];
        else
            for (ssize j = 0; j < n; j++) dst[j] += w0 * r0[j] + w1 * r1[j];
        if (k == 3) taps4(dst, 0, r + 2, w + 2, 1, n);
    } else {
        const float *r0 = r[0];
        float w0 = w[0];
        if (init)
            for (ssize j = 0; j < n; j++) dst[j] = w0 * r0[j];
        else
            for (ssize j = 0; j < n; j++) dst[j] += w0 * r0[j];
    }
}

/* tmp[o] (rows of nt floats) = sum_t wt[o, t] * buf[lo[o] + t] (rows of n floats), in strips of STRIP floats: each
 * input row is read by ~k outputs, and a strip of every input row (h x 1 KB) stays in the core's L2 meanwhile. */
#define STRIP 256
static void vertical(const float *buf, ssize n, const int32_t *lo, const float *wt, int k, int s_h, float *tmp,
                     ssize nt) {
    const float *r[4];
    for (ssize j0 = 0; j0 < n; j0 += STRIP) {
        ssize len = n - j0 < STRIP ? n - j0 : STRIP;
        for (int o = 0; o < s_h; o++) {
            const float *w = wt + (ssize)o * k;
            int used = k;
            while (used > 1 && w[used - 1] == 0.0f) used--; /* the padding taps of the shorter rows */
            for (int t = 0; t < used; t += 4) {
                int m = used - t < 4 ? used - t : 4;
                for (int i = 0; i < m; i++) r[i] = buf + (ssize)(lo[o] + t + i) * n + j0;
                taps4(tmp + o * nt + j0, t == 0, r, w + t, m, len);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ 3. horizontal */
/* line[p] ([cp] floats) = sum_t wt[p, t] * row[lo[p] + t] (pixels of c floats). Each sum is a chain of k dependent
 * multiply-adds; 8 lanes at a time, with four output pixels in flight so that the chains overlap (one pixel at a
 * time measured ~1.15x slower on a 13-band crop; two and four alike). */
typedef float v8f __attribute__((vector_size(32)));

/* always inlined: a 32-byte vector returned from a baseline copy into the AVX2 clone would take another ABI */
static inline __attribute__((always_inline)) v8f load8(const float *p) {
    v8f v;
    __builtin_memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

HOT static void hrow_wide(const float *row, int c, int cp, const int32_t *lo, const float *wt, int k, int s_w,
                          float *restrict line) {
    for (int p0 = 0; p0 < s_w; p0 += 4) {
        int p[4];
        const float *w[4], *f[4];
        for (int i = 0; i < 4; i++) {
            p[i] = p0 + i < s_w ? p0 + i : s_w - 1; /* past the end: the last pixel again */
            w[i] = wt + (ssize)p[i] * k;
            f[i] = row + (ssize)lo[p[i]] * c;
        }
        for (int b0 = 0; b0 < cp; b0 += 8) {
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int t = 0; t < k; t++) {
                ssize off = (ssize)t * c + b0;
                a0 += w[0][t] * load8(f[0] + off);
                a1 += w[1][t] * load8(f[1] + off);
                a2 += w[2][t] * load8(f[2] + off);
                a3 += w[3][t] * load8(f[3] + off);
            }
            __builtin_memcpy(line + (ssize)p[0] * cp + b0, &a0, sizeof a0);
            __builtin_memcpy(line + (ssize)p[1] * cp + b0, &a1, sizeof a1);
            __builtin_memcpy(line + (ssize)p[2] * cp + b0, &a2, sizeof a2);
            __builtin_memcpy(line + (ssize)p[3] * cp + b0, &a3, sizeof a3);
        }
    }
}

#define HROW(N)                                                                                                       \
    for (int p = 0; p < s_w; p++) {                                                                                   \
        const float *w = wt + (ssize)p * k;                                                                           \
        const float *first = row + (ssize)lo[p] * c;                                                                  \
        float a[N] = {0};                                                                                             \
        for (int t = 0; t < k; t++)                                                                                   \
            for (int i = 0; i < (N); i++) a[i] += w[t] * first[(ssize)t * c + i];                                     \
        for (int i = 0; i < (N); i++) line[(ssize)p * cp + i] = a[i];                                                 \
    }

HOT static void horizontal_row(const float *row, int c, int cp, const int32_t *lo, const float *wt, int k, int s_w,
                               float *restrict line) {
    switch (cp) {
    case 1: HROW(1) break;
    case 2: HROW(2) break;
    case 3: HROW(3) break;
    case 4: HROW(4) break;
    default: hrow_wide(row, c, cp, lo, wt, k, s_w, line); break;
    }
}

/* Rounded half up and clamped once, at the end: floor(v + 0.5) within the dtype's range, computed as a truncating
 * cast of a non-negative value (v + 0.5 - LO, clamped to [0, HI - LO], then + LO as an integer). */
#define STORE_INT(T, LO, HI)                                                                                          \
    HOT static void store_##T(const float *line, int c, int cp, int s_w, int flip, T *out, ssize osc, ssize osx) {  \
        for (int b = 0; b < c; b++) {                                                                                 \
            T *dst = out + b * osc;                                                                                   \
            for (int p = 0; p < s_w; p++) {                                                                           \
                float v = line[(ssize)p * cp + b] + (0.5f - (LO));                                                    \
                v = !(v > 0.0f) ? 0.0f : (v > (HI) - (LO) ? (HI) - (LO) : v); /* NaN -> LO: never cast */             \
                dst[(flip ? s_w - 1 - p : p) * osx] = (T)((int32_t)v + (int32_t)(LO));                                \
            }                                                                                                         \
        }                                                                                                             \
    }
STORE_INT(uint8_t, 0.0f, 255.0f)
STORE_INT(uint16_t, 0.0f, 65535.0f)
STORE_INT(int16_t, -32768.0f, 32767.0f)

HOT static void store_float(const float *line, int c, int cp, int s_w, int flip, float *out, ssize osc, ssize osx) {
    for (int b = 0; b < c; b++) {
        float *dst = out + b * osc;
        for (int p = 0; p < s_w; p++) dst[(flip ? s_w - 1 - p : p) * osx] = line[(ssize)p * cp + b];
    }
}

/* ------------------------------------------------------------------------------------------------ entry */
#ifndef FASTMAE_RESAMPLE_NO_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyDoc_STRVAR(resample_doc,
    "resample(src, dtype, C, h, w, sc, sy, sx, ylo, yw, ky, S_h, xlo, xw, kx, S_w, flip, out, osc, osy, osx, work,\n"
    "         has, nodata, fill)\n\n"
    "Addresses (ints) and element strides, all checked by fastmae.train.data.resample: the crop src [C, h, w] of\n"
    "dtype 0 uint8 / 1 uint16 / 2 int16 / 3 float32, the taps (ylo int32 [S_h], yw float32 [S_h, ky]; xlo, xw\n"
    "alike), out [C, S_h, S_w] of the same dtype, work float32 [work_floats(C, h, w, S_h, S_w)], and has\n"
    "(uint8 [C]), nodata, fill (float32 [C]) or has = 0 for no nodata. The GIL is released while it computes.");

static PyObject *resample(PyObject *self, PyObject *args) {
    ssize src, sc, sy, sx, ylo, yw, xlo, xw, out, osc, osy, osx, work, has, nodata, fill;
    int dtype, c, h, w, ky, s_h, kx, s_w, flip;
    (void)self;
    if (!PyArg_ParseTuple(args, "niiiinnnnniinniipnnnnnnnn", &src, &dtype, &c, &h, &w, &sc, &sy, &sx, &ylo, &yw, &ky,
                          &s_h, &xlo, &xw, &kx, &s_w, &flip, &out, &osc, &osy, &osx, &work, &has, &nodata, &fill))
        return NULL;
    if (dtype < DT_U8 || dtype > DT_F32 || c < 1 || h < 1 || w < 1 || ky < 1 || kx < 1 || s_h < 1 || s_w < 1) {
        PyErr_SetString(PyExc_ValueError, "resample: bad dtype code or size");
        return NULL;
    }
    int cp = padded(c);
    ssize n = (ssize)w * c, nt = n + SLACK;
    float *buf = (float *)work, *tmp = buf + (ssize)h * n, *line = tmp + (ssize)s_h * nt;
    Py_BEGIN_ALLOW_THREADS
    switch (dtype) {
    case DT_U8: load_uint8_t((const uint8_t *)src, sc, sy, sx, c, h, w, buf); break;
    case DT_U16: load_uint16_t((const uint16_t *)src, sc, sy, sx, c, h, w, buf); break;
    case DT_I16: load_int16_t((const int16_t *)src, sc, sy, sx, c, h, w, buf); break;
    default: load_float((const float *)src, sc, sy, sx, c, h, w, buf); break;
    }
    if (has)
        fill_nodata(buf, (ssize)h * w, c, (const uint8_t *)has, (const float *)nodata, (const float *)fill);
    for (int o = 0; o < s_h; o++)
        for (int i = 0; i < SLACK; i++) tmp[o * nt + n + i] = 0.0f; /* read, never used */
    vertical(buf, n, (const int32_t *)ylo, (const float *)yw, ky, s_h, tmp, nt);
    for (int o = 0; o < s_h; o++) {
        horizontal_row(tmp + o * nt, c, cp, (const int32_t *)xlo, (const float *)xw, kx, s_w, line);
        switch (dtype) {
        case DT_U8: store_uint8_t(line, c, cp, s_w, flip, (uint8_t *)out + o * osy, osc, osx); break;
        case DT_U16: store_uint16_t(line, c, cp, s_w, flip, (uint16_t *)out + o * osy, osc, osx); break;
        case DT_I16: store_int16_t(line, c, cp, s_w, flip, (int16_t *)out + o * osy, osc, osx); break;
        default: store_float(line, c, cp, s_w, flip, (float *)out + o * osy, osc, osx); break;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(work_floats_doc, "work_floats(C, h, w, S_h, S_w): the float32 elements resample's work buffer needs.");

static PyObject *work_floats(PyObject *self, PyObject *args) {
    int c, h, w, s_h, s_w;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiiii", &c, &h, &w, &s_h, &s_w)) return NULL;
    ssize n = (ssize)w * c;
    return PyLong_FromSsize_t((ssize)h * n + (ssize)s_h * (n + SLACK) + (ssize)s_w * padded(c));
}

PyDoc_STRVAR(isa_doc, "isa(): the instruction set the hot loops run with on this CPU.");

static PyObject *isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef FASTMAE_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return PyUnicode_FromString("x86-64-v3");
    return PyUnicode_FromString("x86-64");
#elif defined(__AVX2__) && defined(__FMA__)
    return PyUnicode_FromString("x86-64-v3");
#elif defined(__x86_64__)
    return PyUnicode_FromString("x86-64");
#elif defined(__aarch64__)
    return PyUnicode_FromString("aarch64");
#else
    return PyUnicode_FromString("compiler default");
#endif
}

static PyMethodDef methods[] = {
    {"resample", resample, METH_VARARGS, resample_doc},
    {"work_floats", work_floats, METH_VARARGS, work_floats_doc},
    {"isa", isa, METH_NOARGS, isa_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resample", "fastmae's compiled resampling taps.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__resample(void) { return PyModule_Create(&module); }
#endif
