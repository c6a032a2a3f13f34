/* The apg2 step fused into one pass over memory, forward and backward (float32, CPU).
 *
 * In torch ops the step is 4 kernels forward and ~20 backward, each a pass over an activation-sized tensor, where
 * gd's x + F(x) is one: on ViT-Ti at batch 32 that was 9 ms per block per train step, ~8% of it. Here each direction
 * reads every input once and writes every output once. Threads come from OpenMP: loaded after torch, this library
 * binds to torch's own libgomp (same soname), so it runs on torch's thread pool. Called through ctypes (schemes.py).
 *
 * With a = 1 - t0, b = a / t0 (prox = identity, d = z - x):
 *   forward   d' = (d + F / t0) a,  y' = (y + F) + t1 d'
 *   rebuilt   F  = (y' - y - t1 a d) / (1 + t1 b)   (y and y' are saved anyway, F is not), so d' from y, y', d
 *   backward  g_d' += t1 g_y';  g_F = g_y' + b g_d';  g_d = a g_d';  g_t0 = -sum g_d' (d + F / t0^2);  g_t1 = sum g_y' d'
 * Every product is rounded on its own (-ffp-contract=off), as in the torch ops. A NULL d is d = 0 (the first step).
 * Outputs may be written over the inputs named in each function's comment (every loop reads an index's inputs before
 * it writes there); any other overlap is undefined.
 */
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#define MIN_PER_THREAD 32768  /* below this, waking a thread costs more than it saves */
#define MAX_THREADS 256

static int threads_for(int64_t n, int threads) {
    int most = (int)(n / MIN_PER_THREAD) + 1;
    if (threads > most) threads = most;
    return threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
}

/* F from y, y' and d (c = t1 (1 - t0), inv_scale = 1 / (1 + t1 (1 - t0) / t0)): what backward and the rebuild share */
static inline float rebuilt_f(float y, float y1, float d, float c, float inv_scale) {
    return ((y1 - y) - c * d) * inv_scale;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void forward_chunk(const float *y, const float *fy, const float *d, float *y1, float *d1, float t0, float t1,
                          int64_t lo, int64_t hi) {
    const float a = 1.0f - t0;
#pragma GCC ivdep  /* no overlap across indices: the avx2 and avx512 clones are vectorised too */
    for (int64_t i = lo; i < hi; i++) {
        float yi = y[i], fi = fy[i], dk = d ? d[i] : 0.0f;
        float dn = (dk + fi / t0) * a;
        d1[i] = dn;
        y1[i] = (yi + fi) + dn * t1;
    }
}

/* y' and d' from y, F(y) and d. y1 may be y, d1 may be d. */
void apg2_forward(const float *y, const float *fy, const float *d, float *y1, float *d1, int64_t n, float t0,
                  float t1, int threads) {
    int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int c = 0; c < nt; c++) forward_chunk(y, fy, d, y1, d1, t0, t1, n * c / nt, n * (c + 1) / nt);
}

#define REBUILD_BLOCK 4096  /* floats per array in flight: a step's 4 arrays stay in L1/L2 for the next step */

__attribute__((target_clones("avx512f", "avx2", "default")))
static void rebuild_chunk(const float *const *ys, const float *d, float *const *ds, int64_t steps, const float *ts,
                          int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; b += REBUILD_BLOCK) {
        int64_t e = b + REBUILD_BLOCK < hi ? b + REBUILD_BLOCK : hi;
        for (int64_t j = 0; j < steps; j++) {
            const float t0 = ts[j], t1 = ts[j + 1], a = 1.0f - t0, c = t1 * a;
            const float inv_scale = 1.0f / (1.0f + t1 * (a / t0));
            const float *y = ys[j], *y1 = ys[j + 1], *dj = j ? ds[j - 1] : d;
            float *d1 = ds[j];
#pragma GCC ivdep
            for (int64_t i = b; i < e; i++) {
                float dk = dj ? dj[i] : 0.0f;
                d1[i] = (dk + rebuilt_f(y[i], y1[i], dk, c, inv_scale) / t0) * a;
            }
        }
    }
}

/* d_{a+1}..d_{a+steps} into ds[0..steps-1], forward from d = d_a (NULL: 0) through ys[0..steps] = y_a..y_{a+steps}
 * and ts[0..steps] = t_a..t_{a+steps}, F rebuilt at each step: backward's d's of one segment, from the d the driver
 * kept. Done block by block through all the steps, so each y comes from memory once and each d is written once. */
void apg2_rebuild(const float *const *ys, const float *d, float *const *ds, int64_t steps, const float *ts, int64_t n,
                  int threads) {
    int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int c = 0; c < nt; c++) rebuild_chunk(ys, d, ds, steps, ts, n * c / nt, n * (c + 1) / nt);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void backward_chunk(const float *y, const float *y1, const float *d, const float *gy1, const float *gd1,
                           float *gfy, float *gd, float t0, float t1, double *sums, int64_t lo, int64_t hi) {
    const float a = 1.0f - t0, b = a / t0, c = t1 * a, inv_scale = 1.0f / (1.0f + t1 * b), t0sq = t0 * t0;
    double s0 = 0.0, s1 = 0.0;
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t i = lo; i < hi; i++) {
        float dk = d ? d[i] : 0.0f;
        float f = rebuilt_f(y[i], y1[i], dk, c, inv_scale);
        float g = (gd1 ? gd1[i] : 0.0f) + t1 * gy1[i];
        s0 += (double)(g * (dk + f / t0sq));
        s1 += (double)(gy1[i] * ((dk + f / t0) * a));
        gfy[i] = gy1[i] + g * b;
        if (gd) gd[i] = g * a;
    }
    sums[0] = s0;
    sums[1] = s1;
}

/* Gradients of F(y) into `gfy` and of d into `gd` (NULL: not needed), from those of y' and d' (`gd1` NULL: d' is
 * unused, the last step); grad_t[0], grad_t[1] get those of t0, t1. gd may be gd1, gfy may be d.
 * Per-thread sums are added in thread order, so a run is repeatable for a given thread count. */
void apg2_backward(const float *y, const float *y1, const float *d, const float *gy1, const float *gd1, float *gfy,
                   float *gd, int64_t n, float t0, float t1, int threads, double *grad_t) {
    double sums[MAX_THREADS][2];
    int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int c = 0; c < nt; c++)
        backward_chunk(y, y1, d, gy1, gd1, gfy, gd, t0, t1, sums[c], n * c / nt, n * (c + 1) / nt);
    grad_t[0] = grad_t[1] = 0.0;
    for (int c = 0; c < nt; c++) {
        grad_t[0] -= sums[c][0];
        grad_t[1] += sums[c][1];
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_apg2", "apg2_forward(), apg2_rebuild(), apg2_backward(): see _apg2.c",
                                    -1, NULL};

PyMODINIT_FUNC PyInit__apg2(void) { return PyModule_Create(&module); }
