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

/* logits z (rows x out) against targets y: adds the summed BCE to *loss and, when grad is not
 * NULL, writes d(mean BCE)/dz = (sigmoid(z) - y) / (rows * out) into grad; counts right bits */
static void bce(const float *z, const float *y, int count, float scale, float *grad,
                double *loss, int64_t *right) {
    for (int i = 0; i < count; i++) {
        float v = z[i], t = y[i];
        /* torch's binary_cross_entropy_with_logits, (1 - t) v + log(1 + exp(-v)), written
         * stably as torch does, log(1 + exp(-|v|)); the same exp gives the sigmoid */
        float e = expf(-fabsf(v));
        *loss += (double)((1.0f - t) * v + (v < 0.0f ? -v : 0.0f) + logf(1.0f + e));
        if (grad != NULL) grad[i] = ((v >= 0.0f ? 1.0f : e) / (1.0f + e) - t) * scale;
        if (right != NULL) *right += ((v > 0.0f) == (t > 0.5f));
    }
}

/* z = a W + b for `rows` rows; relu in place when `relu`; a is rows x n, W is n x m */
static void dense(const float *a, const float *W, const float *b, float *z, int rows, int n,
                  int m, int relu, float *out) {
    for (int r = 0; r < rows; r++) {
        float *zr = z + (int64_t)r * m;
        memcpy(zr, b, sizeof(float) * m);
        const float *ar = a + (int64_t)r * n;
        for (int i = 0; i < n; i++) {
            float ai = ar[i]; /* no skipping of zeros: a branch costs more than the FMAs */
            const float *Wi = W + (int64_t)i * m;
            for (int j = 0; j < m; j++) zr[j] += ai * Wi[j];
        }
        if (out != NULL) {
            float *o = out + (int64_t)r * m;
            for (int j = 0; j < m; j++) o[j] = relu && zr[j] < 0.0f ? 0.0f : zr[j];
        }
    }
}

static int train_member(int nd, const int32_t *d, float *p, float *mom1, float *mom2,
                        int64_t *step, float lr, int cosine, int64_t total_steps, int batch,
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
    if (!a || !z || !g || !grad || !wt) {
        free(a), free(z), free(g), free(grad), free(wt);
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
        for (int r = 0; r < bs; r++)
            memcpy(a + (int64_t)r * n_in, x + order[start + r] * n_in, sizeof(float) * n_in);
        for (int l = 1; l <= L; l++)
            dense(a + at[l - 1], p + off[l], p + off[l] + (int64_t)d[l - 1] * d[l], z + at[l],
                  bs, d[l - 1], d[l], l < L, l < L ? a + at[l] : NULL);
        /* --- loss and its gradient (mean over the batch's rows and outputs) */
        double loss = 0.0;
        float *gl = g;
        for (int r = 0; r < bs; r++)
            bce(z + at[L] + (int64_t)r * n_out, y + order[start + r] * n_out, n_out,
                1.0f / (float)(bs * n_out), gl + (int64_t)r * n_out, &loss, NULL);
        loss_sum += loss / (double)(bs * n_out);
        /* --- backward: weight, bias and (but for the first layer) the layer below */
        for (int l = L; l >= 1; l--) {
            int n = d[l - 1], m = d[l];
            float *gw = grad + off[l], *gb = grad + off[l] + (int64_t)n * m;
            const float *W = p + off[l], *al = a + at[l - 1];
            memset(gw, 0, sizeof(float) * (size_t)n * m);
            memset(gb, 0, sizeof(float) * m);
            for (int r = 0; r < bs; r++) {
                const float *gr = gl + (int64_t)r * m, *ar = al + (int64_t)r * n;
                for (int j = 0; j < m; j++) gb[j] += gr[j];
                for (int i = 0; i < n; i++) {
                    float ai = ar[i];
                    float *gwi = gw + (int64_t)i * m;
                    for (int j = 0; j < m; j++) gwi[j] += ai * gr[j];
                }
            }
            if (l > 1) { /* through W and the ReLU below (relu'(0) = 0) */
                /* W transposed once, so that every row is a sum of contiguous vectors */
                for (int i = 0; i < n; i++)
                    for (int j = 0; j < m; j++) wt[(int64_t)j * n + i] = W[(int64_t)i * m + j];
                const float *zl = z + at[l - 1];
                for (int r = 0; r < bs; r++) {
                    const float *gr = gl + (int64_t)r * m, *zr = zl + (int64_t)r * n;
                    float *gn = g_next + (int64_t)r * n;
                    memset(gn, 0, sizeof(float) * n);
                    for (int j = 0; j < m; j++) {
                        float gj = gr[j];
                        const float *wj = wt + (int64_t)j * n;
                        for (int i = 0; i < n; i++) gn[i] += gj * wj[i];
                    }
                    for (int i = 0; i < n; i++) gn[i] = zr[i] > 0.0f ? gn[i] : 0.0f;
                }
                float *swap = gl;
                gl = g_next;
                g_next = swap;
            }
        }
        /* --- Adam (torch's fused kernel: lerp for the first moment) */
        /* cosine schedule as torch's LambdaLR applies it: step s (from 0) at
         * lr * (1 + cos(pi * min(s, T) / T)) / 2 over T = epochs x steps per epoch */
        double rate = lr;
        if (cosine) {
            double t = (double)(*step < total_steps ? *step : total_steps) / (double)total_steps;
            rate = lr * 0.5 * (1.0 + cos(3.14159265358979323846 * t));
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
    free(a), free(z), free(g), free(grad), free(wt);
    return 0;
}

/* One epoch of every active member; returns 0, or -1 when memory ran out. */
int population_epoch(int32_t members, const uint8_t *active, const int32_t *ndims,
                     const int32_t *dims, const int64_t *offsets, float *params,
                     float *exp_avg, float *exp_avg_sq, int64_t *steps, const float *lr,
                     const uint8_t *cosine, const int64_t *total_steps,
                     const int32_t *batch, int32_t rows, const float *x, const float *y,
                     const int64_t *orders, float *train_loss, float *eval_loss,
                     float *eval_acc, int32_t threads) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : failed)
    for (int k = 0; k < members; k++) {
        if (!active[k]) continue;
        int64_t o = offsets[k];
        failed |= train_member(ndims[k], dims + (int64_t)k * MAX_DIMS, params + o, exp_avg + o,
                               exp_avg_sq + o, steps + k, lr[k], cosine[k], total_steps[k],
                               batch[k], rows, x, y,
                               orders + (int64_t)k * rows, train_loss + k, eval_loss + k,
                               eval_acc + k);
    }
    return failed ? -1 : 0;
}
