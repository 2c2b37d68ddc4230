/* One epoch of many small ReLU networks (the members of a population), on the CPU.
 *
 * Each member is a dense ReLU network with its own widths, batch size, learning rate and row
 * order; it trains one epoch of mini-batch Adam on mean binary cross-entropy (logits out),
 * then is evaluated on the whole table. This is the arithmetic of study.trainer.train with
 * torch.optim.Adam (fused, torch's betas and eps, no weight decay), written out for networks
 * of a few thousand parameters, where a framework spends its time dispatching, not computing.
 * Members are independent: the loop over members runs on `threads` OpenMP threads.
 *
 * Layout of a member's parameters (and of its Adam moments), from offsets[k] on: for each
 * layer l = 1..L, the weight as (fan_in, fan_out) row-major, then the bias (fan_out).
 * Float32 throughout, as torch on the CPU. Built by study/native.py with the machine's C
 * compiler; the Python side falls back to torch when it cannot be built.
 *
 * Where the time goes, for widths of a few dozen: the dense products run as tiles of 4 rows x
 * 8 columns whose sums stay in registers (GCC's vector extension, multiply-adds fused); the
 * loss's exp and log run through the C library's vector versions where it has them
 * (STUDY_VECTOR_MATH, glibc's libmvec); what is left is mostly Adam's square root and
 * division. Results equal torch's up to float rounding (a few ulp per step).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIMS 34 /* input, up to 32 hidden layers, output */
#define BETA1 0.9f
#define BETA2 0.999f
#define EPS 1e-8f
#define EVAL_ROWS 64 /* rows per forward pass when evaluating */
#define SCHEDULE_CONSTANT 0 /* study.population.SCHEDULE_CODES */
#define SCHEDULE_COSINE 1
#define SCHEDULE_ONECYCLE 2

#if defined(STUDY_VECTOR_MATH)
/* glibc's libmvec: vector expf and logf (the compiler picks the width) */
float expf(float) __attribute__((__simd__("notinbranch")));
float logf(float) __attribute__((__simd__("notinbranch")));
#endif

#define BCE_BLOCK 256

/* logits z against targets y (count values): adds the summed BCE to *loss and, when grad is
 * not NULL, writes d(mean BCE)/dz = (sigmoid(z) - y) * scale into grad; counts right bits.
 * Element-wise passes over blocks, so that the compiler vectorises them (expf and logf too,
 * where the C library has vector versions); the sum stays in double, in order. */
static void bce(const float *z, const float *y, int count, float scale, float *grad,
                double *loss, int64_t *right) {
    float e[BCE_BLOCK], term[BCE_BLOCK];
    for (int s = 0; s < count; s += BCE_BLOCK) {
        int c = count - s < BCE_BLOCK ? count - s : BCE_BLOCK;
        const float *zs = z + s, *ys = y + s;
        /* torch's binary_cross_entropy_with_logits, (1 - t) v + log(1 + exp(-v)), written
         * stably as torch does, log(1 + exp(-|v|)); the same exp gives the sigmoid */
        for (int i = 0; i < c; i++) e[i] = expf(-fabsf(zs[i]));
        for (int i = 0; i < c; i++)
            term[i] = (1.0f - ys[i]) * zs[i] + (zs[i] < 0.0f ? -zs[i] : 0.0f) + logf(1.0f + e[i]);
        if (grad != NULL)
            for (int i = 0; i < c; i++)
                grad[s + i] = ((zs[i] >= 0.0f ? 1.0f : e[i]) / (1.0f + e[i]) - ys[i]) * scale;
        if (right != NULL) {
            int64_t r = 0;
            for (int i = 0; i < c; i++) r += (zs[i] > 0.0f) == (ys[i] > 0.5f);
            *right += r;
        }
        double sum[4] = {0.0, 0.0, 0.0, 0.0}; /* four chains of additions, not one */
        int i = 0;
        for (; i + 4 <= c; i += 4)
            for (int k = 0; k < 4; k++) sum[k] += (double)term[i + k];
        for (; i < c; i++) sum[0] += (double)term[i];
        *loss += (sum[0] + sum[1]) + (sum[2] + sum[3]);
    }
}

/* eight floats: GCC's vector extension, one AVX register (or half of an AVX-512 one) */
typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* z = a W + b for `rows` rows (b NULL: no bias); then, when `out` is not NULL, out = relu(z)
 * (or a copy of z without `relu`). a is rows x n, W is n x m, all row-major. Tiles of 4 rows x
 * 8 columns keep their sums in registers: four independent chains of multiply-adds. */
static void dense(const float *a, const float *W, const float *b, float *z, int rows, int n,
                  int m, int relu, float *out) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *a0 = a + (int64_t)r * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
        float *z0 = z + (int64_t)r * m, *z1 = z0 + m, *z2 = z1 + m, *z3 = z2 + m;
        int j = 0;
        for (; j + 8 <= m; j += 8) {
            v8 c0 = {0}, c1, c2, c3;
            if (b != NULL) c0 = load8(b + j);
            c1 = c0, c2 = c0, c3 = c0;
            for (int i = 0; i < n; i++) {
                v8 w = load8(W + (int64_t)i * m + j);
                c0 += a0[i] * w, c1 += a1[i] * w, c2 += a2[i] * w, c3 += a3[i] * w;
            }
            store8(z0 + j, c0), store8(z1 + j, c1), store8(z2 + j, c2), store8(z3 + j, c3);
        }
        for (; j < m; j++) {
            float c0 = b != NULL ? b[j] : 0.0f, c1 = c0, c2 = c0, c3 = c0;
            for (int i = 0; i < n; i++) {
                float w = W[(int64_t)i * m + j];
                c0 += a0[i] * w, c1 += a1[i] * w, c2 += a2[i] * w, c3 += a3[i] * w;
            }
            z0[j] = c0, z1[j] = c1, z2[j] = c2, z3[j] = c3;
        }
    }
    for (; r < rows; r++) {
        const float *ar = a + (int64_t)r * n;
        float *zr = z + (int64_t)r * m;
        int j = 0;
        for (; j + 8 <= m; j += 8) {
            v8 c = {0};
            if (b != NULL) c = load8(b + j);
            for (int i = 0; i < n; i++) c += ar[i] * load8(W + (int64_t)i * m + j);
            store8(zr + j, c);
        }
        for (; j < m; j++) {
            float c = b != NULL ? b[j] : 0.0f;
            for (int i = 0; i < n; i++) c += ar[i] * W[(int64_t)i * m + j];
            zr[j] = c;
        }
    }
    if (out != NULL)
        for (int64_t k = 0; k < (int64_t)rows * m; k++)
            out[k] = relu && z[k] < 0.0f ? 0.0f : z[k];
}

/* gw = a^T g (n x m) and gb = the column sums of g, over `rows` rows: a is rows x n, g is
 * rows x m. Tiles of 4 weight rows x 8 columns, summed over the batch in registers. */
static void weight_grad(const float *a, const float *g, float *gw, float *gb, int rows, int n,
                        int m) {
    memset(gb, 0, sizeof(float) * m);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < m; j++) gb[j] += g[(int64_t)r * m + j];
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        int j = 0;
        for (; j + 8 <= m; j += 8) {
            v8 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
            for (int r = 0; r < rows; r++) {
                const float *ar = a + (int64_t)r * n + i;
                v8 gr = load8(g + (int64_t)r * m + j);
                c0 += ar[0] * gr, c1 += ar[1] * gr, c2 += ar[2] * gr, c3 += ar[3] * gr;
            }
            float *w = gw + (int64_t)i * m + j;
            store8(w, c0), store8(w + m, c1), store8(w + 2 * m, c2), store8(w + 3 * m, c3);
        }
        for (; j < m; j++)
            for (int k = 0; k < 4; k++) {
                float c = 0.0f;
                for (int r = 0; r < rows; r++) c += a[(int64_t)r * n + i + k] * g[(int64_t)r * m + j];
                gw[(int64_t)(i + k) * m + j] = c;
            }
    }
    for (; i < n; i++)
        for (int j = 0; j < m; j++) {
            float c = 0.0f;
            for (int r = 0; r < rows; r++) c += a[(int64_t)r * n + i] * g[(int64_t)r * m + j];
            gw[(int64_t)i * m + j] = c;
        }
}

static int train_member(int nd, const int32_t *d, float *p, float *mom1, float *mom2,
                        int64_t *step, float lr, int schedule, int64_t warmup, float floor_share,
                        int64_t total_steps, int batch,
                        int rows, const float *x,
                        const float *y, const int64_t *order, float *train_loss,
                        float *eval_loss, float *eval_acc) {
    int L = nd - 1, n_in = d[0], n_out = d[L];
    int64_t off[MAX_DIMS], size = 0, width = 0;
    for (int l = 1; l <= L; l++) {
        off[l] = size;
        size += (int64_t)d[l - 1] * d[l] + d[l];
    }
    for (int l = 0; l <= L; l++) width += d[l];
    int chunk = batch > EVAL_ROWS ? batch : EVAL_ROWS;
    /* activations a_l and pre-activations z_l of every layer for one batch, gradients */
    float *a = malloc(sizeof(float) * (size_t)chunk * (size_t)width);
    float *z = malloc(sizeof(float) * (size_t)chunk * (size_t)width);
    float *g = malloc(sizeof(float) * (size_t)chunk * (size_t)width * 2);
    float *grad = malloc(sizeof(float) * (size_t)size);
    float *wt = malloc(sizeof(float) * (size_t)size); /* a transposed weight */
    float *yb = malloc(sizeof(float) * (size_t)chunk * (size_t)n_out); /* a batch's targets */
    if (!a || !z || !g || !grad || !wt || !yb) {
        free(a), free(z), free(g), free(grad), free(wt), free(yb);
        return -1;
    }
    int64_t at[MAX_DIMS]; /* offset of layer l's rows in a, z */
    at[0] = 0;
    for (int l = 1; l <= L; l++) at[l] = at[l - 1] + (int64_t)chunk * d[l - 1];
    float *g_next = g + (size_t)chunk * (size_t)width;

    double loss_sum = 0.0;
    int steps = 0;
    for (int start = 0; start < rows; start += batch, steps++) {
        int bs = rows - start < batch ? rows - start : batch;
        /* --- forward */
        for (int r = 0; r < bs; r++) {
            memcpy(a + (int64_t)r * n_in, x + order[start + r] * n_in, sizeof(float) * n_in);
            memcpy(yb + (int64_t)r * n_out, y + order[start + r] * n_out, sizeof(float) * n_out);
        }
        for (int l = 1; l <= L; l++)
            dense(a + at[l - 1], p + off[l], p + off[l] + (int64_t)d[l - 1] * d[l], z + at[l],
                  bs, d[l - 1], d[l], l < L, l < L ? a + at[l] : NULL);
        /* --- loss and its gradient (mean over the batch's rows and outputs) */
        double loss = 0.0;
        float *gl = g;
        bce(z + at[L], yb, bs * n_out, 1.0f / (float)(bs * n_out), gl, &loss, NULL);
        loss_sum += loss / (double)(bs * n_out);
        /* --- backward: weight, bias and (but for the first layer) the layer below */
        for (int l = L; l >= 1; l--) {
            int n = d[l - 1], m = d[l];
            float *gw = grad + off[l], *gb = grad + off[l] + (int64_t)n * m;
            const float *W = p + off[l], *al = a + at[l - 1];
            weight_grad(al, gl, gw, gb, bs, n, m);
            if (l > 1) { /* through W and the ReLU below (relu'(0) = 0) */
                /* g_next = gl W^T: W transposed once, then the same tiles as the forward */
                for (int j = 0; j < m; j++)
                    for (int i = 0; i < n; i++) wt[(int64_t)j * n + i] = W[(int64_t)i * m + j];
                dense(gl, wt, NULL, g_next, bs, m, n, 0, NULL);
                const float *zl = z + at[l - 1];
                for (int64_t k = 0; k < (int64_t)bs * n; k++)
                    g_next[k] = zl[k] > 0.0f ? g_next[k] : 0.0f;
                float *swap = gl;
                gl = g_next;
                g_next = swap;
            }
        }
        /* --- Adam (torch's fused kernel: lerp for the first moment) */
        /* the schedule as study.trainer's LambdaLR applies it: optimiser step s (from 0) at
         * lr x (s + 1) / W during a warm-up of W steps, then lr x (f + (1 - f) d(t)) with
         * t = min(s - W, T - W) / max(1, T - W) over T = epochs x steps per epoch, d the
         * decay (1 constant, (1 + cos(pi t)) / 2 cosine, 1 - t onecycle) and f the floor */
        double rate = lr;
        if (*step < warmup) {
            rate = lr * (double)(*step + 1) / (double)warmup;
        } else if (schedule != SCHEDULE_CONSTANT) {
            int64_t span = total_steps - warmup > 1 ? total_steps - warmup : 1;
            int64_t done = *step - warmup < total_steps - warmup ? *step - warmup
                                                                 : total_steps - warmup;
            double t = (double)(done > 0 ? done : 0) / (double)span;
            double decay = schedule == SCHEDULE_COSINE
                               ? 0.5 * (1.0 + cos(3.14159265358979323846 * t))
                               : 1.0 - t;
            rate = lr * (floor_share + (1.0 - floor_share) * decay);
        }
        *step += 1;
        float bc1 = 1.0f - powf(BETA1, (float)*step);
        float bc2_sqrt = sqrtf(1.0f - powf(BETA2, (float)*step));
        float step_size = (float)rate / bc1;
        for (int64_t i = 0; i < size; i++) {
            float gi = grad[i];
            mom1[i] += (gi - mom1[i]) * (1.0f - BETA1);
            mom2[i] = mom2[i] * BETA2 + (1.0f - BETA2) * gi * gi;
            p[i] -= step_size * mom1[i] / (sqrtf(mom2[i]) / bc2_sqrt + EPS);
        }
        g_next = g + (size_t)chunk * (size_t)width; /* reset the ping-pong pair */
    }
    *train_loss = (float)(loss_sum / steps);

    /* --- evaluation on the whole table, EVAL_ROWS rows at a time */
    double total = 0.0;
    int64_t right = 0;
    for (int start = 0; start < rows; start += chunk) {
        int bs = rows - start < chunk ? rows - start : chunk;
        memcpy(a, x + (int64_t)start * n_in, sizeof(float) * (size_t)bs * n_in);
        for (int l = 1; l <= L; l++)
            dense(a + at[l - 1], p + off[l], p + off[l] + (int64_t)d[l - 1] * d[l], z + at[l],
                  bs, d[l - 1], d[l], l < L, l < L ? a + at[l] : NULL);
        bce(z + at[L], y + (int64_t)start * n_out, bs * n_out, 0.0f, NULL, &total, &right);
    }
    *eval_loss = (float)(total / ((double)rows * n_out));
    *eval_acc = (float)((double)right / ((double)rows * n_out));
    free(a), free(z), free(g), free(grad), free(wt), free(yb);
    return 0;
}

/* One epoch of every active member; returns 0, or -1 when memory ran out. */
int population_epoch(int32_t members, const uint8_t *active, const int32_t *ndims,
                     const int32_t *dims, const int64_t *offsets, float *params,
                     float *exp_avg, float *exp_avg_sq, int64_t *steps, const float *lr,
                     const uint8_t *schedule, const int64_t *warmup, const float *floor_share,
                     const int64_t *total_steps,
                     const int32_t *batch, int32_t rows, const float *x, const float *y,
                     const int64_t *orders, float *train_loss, float *eval_loss,
                     float *eval_acc, int32_t threads) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : failed)
    for (int k = 0; k < members; k++) {
        if (!active[k]) continue;
        int64_t o = offsets[k];
        failed |= train_member(ndims[k], dims + (int64_t)k * MAX_DIMS, params + o, exp_avg + o,
                               exp_avg_sq + o, steps + k, lr[k], schedule[k], warmup[k],
                               floor_share[k], total_steps[k],
                               batch[k], rows, x, y,
                               orders + (int64_t)k * rows, train_loss + k, eval_loss + k,
                               eval_acc + k);
    }
    return failed ? -1 : 0;
}
