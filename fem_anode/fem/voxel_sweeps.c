/* SOR sweeps of the face-neighbour (7-point) operator of a segmented voxel image.
 *
 * A = diag(d) - sum over faces between two rows of g_axis (x: g[0], y: g[1], z: g[2]), rows: the
 * voxels of one phase in C order (z, y, x). The x neighbours of row i are rows i - 1 and i + 1, so
 * only the y and z neighbours are stored (lower[2i]: y, lower[2i+1]: z; likewise upper). mask[i]:
 * bit 0/1/2 x/y/z lower neighbour present, bit 3/4/5 x/y/z upper neighbour present; an absent
 * neighbour's index is any valid row (it is multiplied by zero). dinv[i] = omega / d[i].
 *
 * The recurrence x[i] = r[i] + c[i] x[i-1] keeps x[i-1] in a register, so a sweep's critical path
 * is one fused multiply-add per row; PETSc's general MatSOR reloads it through memory.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

/* x = (D/omega + L)^{-1} b  (forward sweep from a zero initial guess) on the rows lo .. hi - 1,
 * the rows before lo already swept (a range starts at a z layer: no x line continues across) */
void fa_forward(int64_t lo, int64_t hi, const double *b, const double *dinv, const int32_t *lower,
                const uint8_t *mask, const double *g, double *x)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    double prev = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
        const uint8_t m = mask[i];
        const double di = dinv[i];
        double s = b[i];
        if (m & 2) s += gy * x[lower[2 * i]];
        if (m & 4) s += gz * x[lower[2 * i + 1]];
        const double c = (m & 1) ? gx * di : 0.0;
        prev = s * di + c * prev;
        x[i] = prev;
    }
}

/* x = (D/omega + U)^{-1} b  (backward sweep from a zero initial guess) on the rows hi - 1 .. lo,
 * the rows from hi on already swept */
void fa_backward(int64_t lo, int64_t hi, const double *b, const double *dinv, const int32_t *upper,
                 const uint8_t *mask, const double *g, double *x)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    double next = 0.0;
    for (int64_t i = hi - 1; i >= lo; --i) {
        const uint8_t m = mask[i];
        const double di = dinv[i];
        double s = b[i];
        if (m & 16) s += gy * x[upper[2 * i]];
        if (m & 32) s += gz * x[upper[2 * i + 1]];
        const double c = (m & 8) ? gx * di : 0.0;
        next = s * di + c * next;
        x[i] = next;
    }
}

/* y = (D/omega + U) x */
void fa_apply_upper(int64_t n, const double *x, const double *dinv, const int32_t *upper,
                    const uint8_t *mask, const double *g, double *y)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t m = mask[i];
        double s = x[i] / dinv[i];
        if (m & 8) s -= gx * x[i + 1];
        if (m & 16) s -= gy * x[upper[2 * i]];
        if (m & 32) s -= gz * x[upper[2 * i + 1]];
        y[i] = s;
    }
}

/* z = (D/omega + L)^{-1} (y + mid d t): the forward sweep of Eisenstat's operator with its middle
 * term computed on the fly (d: the diagonal of A; mid = 1 - 2/omega) */
void fa_forward_eisenstat(int64_t lo, int64_t hi, const double *y, const double *t, const double *d, double mid,
                          const double *dinv, const int32_t *lower, const uint8_t *mask,
                          const double *g, double *z)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    double prev = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
        const uint8_t m = mask[i];
        const double di = dinv[i];
        double s = y[i] + mid * d[i] * t[i];
        if (m & 2) s += gy * z[lower[2 * i]];
        if (m & 4) s += gz * z[lower[2 * i + 1]];
        const double c = (m & 1) ? gx * di : 0.0;
        prev = s * di + c * prev;
        z[i] = prev;
    }
}

/* y = A x = d x - G x (every neighbour within these rows) */
void fa_mult(int64_t n, const double *x, const double *d, const int32_t *lower, const int32_t *upper,
             const uint8_t *mask, const double *g, double *y)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t m = mask[i];
        double s = d[i] * x[i];
        if (m & 1) s -= gx * x[i - 1];
        if (m & 8) s -= gx * x[i + 1];
        if (m & 2) s -= gy * x[lower[2 * i]];
        if (m & 16) s -= gy * x[upper[2 * i]];
        if (m & 4) s -= gz * x[lower[2 * i + 1]];
        if (m & 32) s -= gz * x[upper[2 * i + 1]];
        y[i] = s;
    }
}

/* The sweeps of one layer alone, rows first..first+m-1 (the layer's x and y couplings; no z):
 * x = (D/omega + L_layer)^{-1} b (forward) or (D/omega + U_layer)^{-1} b (backward), with b and x
 * the layer's values (length m). */
void fa_forward_layer(int64_t first, int64_t m, const double *b, const double *dinv,
                      const int32_t *lower, const uint8_t *mask, const double *g, double *x)
{
    const double gx = g[0], gy = g[1];
    double prev = 0.0;
    for (int64_t k = 0; k < m; ++k) {
        const int64_t i = first + k;
        const uint8_t f = mask[i];
        const double di = dinv[i];
        double s = b[k];
        if (f & 2) s += gy * x[lower[2 * i] - first];
        const double c = (f & 1) ? gx * di : 0.0;
        prev = s * di + c * prev;
        x[k] = prev;
    }
}

void fa_backward_layer(int64_t first, int64_t m, const double *b, const double *dinv,
                       const int32_t *upper, const uint8_t *mask, const double *g, double *x)
{
    const double gx = g[0], gy = g[1];
    double next = 0.0;
    for (int64_t k = m - 1; k >= 0; --k) {
        const int64_t i = first + k;
        const uint8_t f = mask[i];
        const double di = dinv[i];
        double s = b[k];
        if (f & 16) s += gy * x[upper[2 * i] - first];
        const double c = (f & 8) ? gx * di : 0.0;
        next = s * di + c * next;
        x[k] = next;
    }
}

/* One iteration of conjugate gradients on Eisenstat's operator in three passes instead of PETSc's
 * eight (see fem_anode/fem/diffusion/finite_volume.py, _FusedEisenstatCG): the preconditioner is
 * the diagonal d, so z = d r is never stored. */

/* p = d r + beta p, then t = (D/omega + U)^{-1} p (the backward sweep of Eisenstat's operator),
 * on the rows hi - 1 .. lo; with y (else NULL) first y += alpha p on each row before p changes
 * there: CG's solution update deferred from the previous iteration (fa_cg_update_residual), bit for
 * bit the update of fa_cg_update */
void fa_cg_direction_backward(int64_t lo, int64_t hi, const double *r, const double *d, double beta, double *p,
                              double alpha, double *y, const double *dinv, const int32_t *upper,
                              const uint8_t *mask, const double *g, double *t)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    double next = 0.0;
    for (int64_t i = hi - 1; i >= lo; --i) {
        const uint8_t m = mask[i];
        const double di = dinv[i];
        if (y) y[i] += alpha * p[i];
        const double pi = d[i] * r[i] + beta * p[i];
        p[i] = pi;
        double s = pi;
        if (m & 16) s += gy * t[upper[2 * i]];
        if (m & 32) s += gz * t[upper[2 * i + 1]];
        const double c = (m & 8) ? gx * di : 0.0;
        next = s * di + c * next;
        t[i] = next;
    }
}

/* z = (D/omega + L)^{-1} (p + mid d t) and w = z + t, i.e. w = (Eisenstat's operator) p; z
 * overwrites t row by row (each t[i] is read first). Rows lo .. hi - 1; returns the sum of p[i] w[i]
 * over them. */
double fa_cg_forward_product(int64_t lo, int64_t hi, const double *p, double *t, const double *d, double mid,
                             const double *dinv, const int32_t *lower, const uint8_t *mask,
                             const double *g, double *w)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    double prev = 0.0, pw = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
        const uint8_t m = mask[i];
        const double di = dinv[i];
        const double ti = t[i];
        double s = p[i] + mid * d[i] * ti;
        if (m & 2) s += gy * t[lower[2 * i]];
        if (m & 4) s += gz * t[lower[2 * i + 1]];
        const double c = (m & 1) ? gx * di : 0.0;
        prev = s * di + c * prev;
        t[i] = prev;
        const double wi = prev + ti;
        w[i] = wi;
        pw += p[i] * wi;
    }
    return pw;
}

/* y += alpha p, r -= alpha w; returns the sum of d[i] r[i]^2 (r.z of the new residual, z = d r) */
double fa_cg_update(int64_t n, double alpha, const double *p, const double *w, const double *d, double *y,
                    double *r)
{
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int k = 0; k < 4; ++k) {
            y[i + k] += alpha * p[i + k];
            const double ri = r[i + k] - alpha * w[i + k];
            r[i + k] = ri;
            acc[k] += d[i + k] * ri * ri;
        }
    }
    for (; i < n; ++i) {
        y[i] += alpha * p[i];
        const double ri = r[i] - alpha * w[i];
        r[i] = ri;
        acc[0] += d[i] * ri * ri;
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* sum of a[i] d[i] b[i] */
double fa_weighted_dot(int64_t n, const double *a, const double *d, const double *b)
{
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; ++k) acc[k] += a[i + k] * d[i + k] * b[i + k];
    for (; i < n; ++i) acc[0] += a[i] * d[i] * b[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* ---------------------------------------------------------------------------------------------
 * The same sweeps and fused CG passes for a general sparse matrix in CSR form (one rank's rows and
 * columns: PETSc's SeqAIJ arrays, column indices sorted in every row): the P1/P2 matrices of the
 * voxel meshes. diag[i] is the position of row i's diagonal entry in indices/data, so the strictly
 * lower part of row i is indptr[i] .. diag[i] - 1 and the strictly upper part diag[i] + 1 ..
 * indptr[i + 1] - 1; dinv[i] = omega / a_ii. Each sweep reads its half of the matrix once.
 */

/* sum of data[k] x[indices[k]] for k in [k, end), in four partial sums: a row's 10-15 products
 * then take a quarter of the latency of one serial chain (the sweeps' recurrences wait on it) */
static inline double fa_csr_dot(const double *data, const int32_t *indices, const double *x, int32_t k,
                                const int32_t end)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (; k + 4 <= end; k += 4) {
        s0 += data[k] * x[indices[k]];
        s1 += data[k + 1] * x[indices[k + 1]];
        s2 += data[k + 2] * x[indices[k + 2]];
        s3 += data[k + 3] * x[indices[k + 3]];
    }
    for (; k < end; ++k) s0 += data[k] * x[indices[k]];
    return (s0 + s1) + (s2 + s3);
}

/* diag[i] = the position of a_ii; returns the number of rows without a diagonal entry */
int64_t fa_csr_diagonal_positions(int64_t n, const int32_t *indptr, const int32_t *indices, int32_t *diag)
{
    int64_t missing = 0;
    for (int64_t i = 0; i < n; ++i) {
        int32_t k = indptr[i];
        const int32_t end = indptr[i + 1];
        while (k < end && indices[k] < i) ++k;
        if (k < end && indices[k] == i) {
            diag[i] = k;
        } else {
            diag[i] = -1;
            ++missing;
        }
    }
    return missing;
}

/* x = (D/omega + L)^{-1} b */
void fa_csr_forward(int64_t n, const double *b, const double *dinv, const int32_t *indptr,
                    const int32_t *indices, const double *data, const int32_t *diag, double *x)
{
    for (int64_t i = 0; i < n; ++i) {
        x[i] = (b[i] - fa_csr_dot(data, indices, x, indptr[i], diag[i])) * dinv[i];
    }
}

/* x = (D/omega + U)^{-1} b */
void fa_csr_backward(int64_t n, const double *b, const double *dinv, const int32_t *indptr,
                     const int32_t *indices, const double *data, const int32_t *diag, double *x)
{
    for (int64_t i = n - 1; i >= 0; --i) {
        x[i] = (b[i] - fa_csr_dot(data, indices, x, diag[i] + 1, indptr[i + 1])) * dinv[i];
    }
}

/* y = (D/omega + U) x */
void fa_csr_apply_upper(int64_t n, const double *x, const double *dinv, const int32_t *indptr,
                        const int32_t *indices, const double *data, const int32_t *diag, double *y)
{
    for (int64_t i = 0; i < n; ++i) {
        y[i] = x[i] / dinv[i] + fa_csr_dot(data, indices, x, diag[i] + 1, indptr[i + 1]);
    }
}

/* z = (D/omega + L)^{-1} (y + mid d t + q) (as fa_forward_eisenstat; q: the couplings to other
 * ranks' rows, O t, in block-Jacobi SSOR, or NULL) */
void fa_csr_forward_eisenstat(int64_t n, const double *y, const double *t, const double *d, double mid,
                              const double *q, const double *dinv, const int32_t *indptr,
                              const int32_t *indices, const double *data, const int32_t *diag, double *z)
{
    for (int64_t i = 0; i < n; ++i) {
        const double s = y[i] + mid * d[i] * t[i] + (q ? q[i] : 0.0);
        z[i] = (s - fa_csr_dot(data, indices, z, indptr[i], diag[i])) * dinv[i];
    }
}

/* p = d r + beta p, then t = (D/omega + U)^{-1} p (as fa_cg_direction_backward) */
void fa_csr_cg_direction_backward(int64_t n, const double *r, const double *d, double beta, double *p,
                                  const double *dinv, const int32_t *indptr, const int32_t *indices,
                                  const double *data, const int32_t *diag, double *t)
{
    for (int64_t i = n - 1; i >= 0; --i) {
        const double pi = d[i] * r[i] + beta * p[i];
        p[i] = pi;
        t[i] = (pi - fa_csr_dot(data, indices, t, diag[i] + 1, indptr[i + 1])) * dinv[i];
    }
}

/* z = (D/omega + L)^{-1} (p + mid d t + q), w = z + t, z overwriting t; returns the sum of p[i] w[i]
 * (as fa_cg_forward_product; q as in fa_csr_forward_eisenstat, or NULL) */
double fa_csr_cg_forward_product(int64_t n, const double *p, double *t, const double *d, double mid,
                                 const double *q, const double *dinv, const int32_t *indptr,
                                 const int32_t *indices, const double *data, const int32_t *diag, double *w)
{
    double pw = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double ti = t[i];
        const double s = p[i] + mid * d[i] * ti + (q ? q[i] : 0.0);
        const double zi = (s - fa_csr_dot(data, indices, t, indptr[i], diag[i])) * dinv[i];
        t[i] = zi;
        const double wi = zi + ti;
        w[i] = wi;
        pw += p[i] * wi;
    }
    return pw;
}

/* The operator K + s M split into its strict lower part, diagonal and strict upper part (arrays
 * of their own, rows in order, so each sweep streams only its half of the matrix): kr and m share
 * the CSR pattern indptr/diag (diag[i]: the position of a_ii), lower_values and upper_values have
 * the entries of each row's lower and upper part in row order, d the diagonal. */
void fa_csr_split_values(int64_t n, const int32_t *indptr, const int32_t *diag, const double *kr,
                         const double *m, double s, double *lower_values, double *upper_values, double *d)
{
    int64_t lo = 0, up = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int32_t k_diag = diag[i], end = indptr[i + 1];
        for (int32_t k = indptr[i]; k < k_diag; ++k) lower_values[lo++] = kr[k] + s * m[k];
        d[i] = kr[k_diag] + s * m[k_diag];
        for (int32_t k = k_diag + 1; k < end; ++k) upper_values[up++] = kr[k] + s * m[k];
    }
}

/* The column indices of each row's strict lower and upper parts (the pattern of fa_csr_split_values) */
void fa_csr_split_pattern(int64_t n, const int32_t *indptr, const int32_t *indices, const int32_t *diag,
                          int32_t *lower_indices, int32_t *upper_indices)
{
    int64_t lo = 0, up = 0;
    for (int64_t i = 0; i < n; ++i) {
        for (int32_t k = indptr[i]; k < diag[i]; ++k) lower_indices[lo++] = indices[k];
        for (int32_t k = diag[i] + 1; k < indptr[i + 1]; ++k) upper_indices[up++] = indices[k];
    }
}

/* ---------------------------------------------------------------------------------------------
 * The same sweeps and fused CG passes for a P1 matrix on a voxel grid stored by row types (see
 * GridStencilKernel in voxel_sweeps.py). Rows are the dofs in grid order; a regular row's
 * couplings are to the primary dofs of the 26 neighbouring grid nodes and of its own node, and its
 * 27 values depend only on the local geometry: they are stored once per row type (lower: the 13
 * neighbours before the row in grid order, upper: the 13 after). map[grid[i] + offset[k]] is the
 * row of the neighbour (padded grid: every neighbour position exists; an absent neighbour maps to
 * any row, its coefficient is 0). Rows where the geometry is not a plain stencil (nodes split by
 * face connectivity and their neighbours) are "special" (type 0xFFFF) and keep CSR rows of their
 * own, in row order, columns sorted (s_diag[c]: the position of the diagonal entry).
 */
typedef struct {
    int64_t lo, hi;        /* the rows swept: lo .. hi - 1 */
    int64_t c_lo, c_hi;    /* the special rows before lo and before hi (the cursors' starts) */
    const uint16_t *type;
    const int32_t *grid;
    const int32_t *map;
    const int64_t *offset; /* 26 linear offsets of the neighbours in the padded grid: 13 lower, 13 upper */
    const double *lower;   /* per type: 13 coefficients of the lower neighbours */
    const double *upper;   /* per type: 13 coefficients of the upper neighbours */
    const double *diag;    /* per type: a_ii */
    const double *dinv;    /* per type: omega / a_ii */
    const int32_t *s_indptr;
    const int32_t *s_diag;
    const int32_t *s_cols;
    const double *s_values;
    const double *s_dinv;
    int64_t run_type;      /* the row type of the runs (-1: no runs) */
    int64_t r_lo, r_hi;    /* the runs within lo .. hi - 1: run_lo[r_lo .. r_hi - 1] */
    const int64_t *run_lo; /* runs: kernel rows run_lo[k] .. run_hi[k] - 1 (see fa_it) */
    const int64_t *run_hi;
} fa_stencil;

#define FA_SPECIAL 0xFFFF
#define FA_Q(q, i) ((q) ? (q)[(i) - S->lo] : 0.0) /* q holds the swept rows S->lo .. S->hi - 1 */

/* sum over the 13 neighbours of one half of the stencil, four partial sums */
static inline double fa_st_dot(const double *a, const int32_t *map, const int64_t *off, int64_t g,
                               const double *x)
{
    double s0 = a[0] * x[map[g + off[0]]], s1 = a[1] * x[map[g + off[1]]];
    double s2 = a[2] * x[map[g + off[2]]], s3 = a[3] * x[map[g + off[3]]];
    s0 += a[4] * x[map[g + off[4]]];
    s1 += a[5] * x[map[g + off[5]]];
    s2 += a[6] * x[map[g + off[6]]];
    s3 += a[7] * x[map[g + off[7]]];
    s0 += a[8] * x[map[g + off[8]]];
    s1 += a[9] * x[map[g + off[9]]];
    s2 += a[10] * x[map[g + off[10]]];
    s3 += a[11] * x[map[g + off[11]]];
    s0 += a[12] * x[map[g + off[12]]];
    return (s0 + s1) + (s2 + s3);
}

/* row i's strict lower (upper = 0) or upper (1) part applied to x, and omega / a_ii; c: the special
 * rows' cursor (advanced in the sweep's direction dir = +1 or -1) */
static inline double fa_st_half(const fa_stencil *S, int64_t i, int upper, int dir, int64_t *c, const double *x,
                                double *dinv)
{
    const uint16_t t = S->type[i];
    if (t != FA_SPECIAL) {
        *dinv = S->dinv[t];
        if (upper) return fa_st_dot(S->upper + 13 * (int64_t)t, S->map, S->offset + 13, S->grid[i], x);
        return fa_st_dot(S->lower + 13 * (int64_t)t, S->map, S->offset, S->grid[i], x);
    }
    const int64_t k = *c;
    *dinv = S->s_dinv[k];
    const int32_t start = upper ? S->s_diag[k] + 1 : S->s_indptr[k];
    const int32_t end = upper ? S->s_indptr[k + 1] : S->s_diag[k];
    *c = k + dir;
    return fa_csr_dot(S->s_values, S->s_cols, x, start, end);
}

/* Runs: maximal sequences of consecutive rows of one type (the interior type, all 26 neighbours
 * present) at consecutive grid positions whose 26 neighbours are also consecutive rows (checked
 * when the runs are made). Along a run the half-stencil's neighbours form 4 lines of 3 nodes (x - 1,
 * x, x + 1) and one point (x - 1 for the lower half, x + 1 for the upper); moving to the next row
 * shifts each line's window by one, so a row loads 4 new values instead of 13 neighbour rows
 * (from the grid map) and 13 values. fa_it walks the rows of a sweep in its direction and
 * returns each row's half-sum, by the window inside a run, else by fa_st_half. */
typedef struct {
    int64_t c;                 /* the special rows' cursor */
    int64_t ru, next, bound;   /* next run's index, its first row in the sweep, the current run's far end */
    int64_t d[4], dp;          /* row offsets of the 4 lines' centres and of the point */
    double v[4][3];            /* the lines' values at x - 1, x, x + 1 */
    double a[13];              /* the run type's coefficients: a[3k + j] for line k, a[12] for the point */
    double dinv;
} fa_it;

/* the half-stencil's lines: the codes (in S->offset's half of 13) of the lines' x - 1 nodes and of the point */
static const int fa_line_first[2][4] = {{0, 3, 6, 9}, {1, 4, 7, 10}};
static const int fa_line_point[2] = {12, 0};

static inline void fa_it_start(const fa_stencil *S, fa_it *it, int dir)
{
    *it = (fa_it){0};
    it->c = dir > 0 ? S->c_lo : S->c_hi - 1;
    it->ru = dir > 0 ? S->r_lo : S->r_hi - 1;
    if (dir > 0) {
        it->next = it->ru < S->r_hi ? S->run_lo[it->ru] : -1;
        it->bound = -1;
    } else {
        it->next = it->ru >= S->r_lo ? S->run_hi[it->ru] - 1 : -1;
        it->bound = INT64_MAX;
    }
}

/* the 4 lines' part of the half-sum (without the point) */
static inline double fa_it_lines(const fa_it *it)
{
    const double *a = it->a;
    const double s0 = a[0] * it->v[0][0] + a[1] * it->v[0][1] + a[2] * it->v[0][2];
    const double s1 = a[3] * it->v[1][0] + a[4] * it->v[1][1] + a[5] * it->v[1][2];
    const double s2 = a[6] * it->v[2][0] + a[7] * it->v[2][1] + a[8] * it->v[2][2];
    const double s3 = a[9] * it->v[3][0] + a[10] * it->v[3][1] + a[11] * it->v[3][2];
    return (s0 + s1) + (s2 + s3);
}

static inline double fa_it_sum(const fa_it *it, int64_t i, const double *x)
{
    return fa_it_lines(it) + it->a[12] * x[i + it->dp];
}

/* inside a run: move the 4 windows to row i (visited in direction dir).
 * The sweeps that write the vector they read (forward, backward and the fused CG passes) take the
 * rest of a run, after its first row, in an inner loop that keeps the previous row's result (the
 * half-stencil's point: x - 1 forward, x + 1 backward) in a register, so the recurrence along the
 * run is one multiply-add, x_i = (b_i - lines_i) dinv - (a_point dinv) x_prev, instead of a store,
 * a reload and three dependent operations (the same sum up to round-off). */
static inline void fa_it_shift(fa_it *it, int64_t i, int dir, const double *x)
{
    for (int k = 0; k < 4; ++k) {
        const int64_t j = i + it->d[k];
        if (dir > 0) {
            it->v[k][0] = it->v[k][1];
            it->v[k][1] = it->v[k][2];
            it->v[k][2] = x[j + 1];
        } else {
            it->v[k][2] = it->v[k][1];
            it->v[k][1] = it->v[k][0];
            it->v[k][0] = x[j - 1];
        }
    }
}

/* row i's half-sum (upper = 0: lower, 1: upper) of x and omega / a_ii, rows visited in direction dir */
static inline double fa_it_half(const fa_stencil *S, fa_it *it, int64_t i, int upper, int dir, const double *x,
                                double *dinv)
{
    if (dir > 0 ? i < it->bound : i >= it->bound) { /* inside a run: shift the windows */
        fa_it_shift(it, i, dir, x);
        *dinv = it->dinv;
        return fa_it_sum(it, i, x);
    }
    if (i != it->next) return fa_st_half(S, i, upper, dir, &it->c, x, dinv);
    /* a run starts: its windows, coefficients and far end */
    const int64_t g = S->grid[i];
    const int64_t *off = S->offset + 13 * upper;
    const double *coeff = (upper ? S->upper : S->lower) + 13 * S->run_type;
    for (int k = 0; k < 4; ++k) {
        const int first = fa_line_first[upper][k];
        const int64_t j = S->map[g + off[first + 1]];
        it->d[k] = j - i;
        for (int m = 0; m < 3; ++m) {
            it->v[k][m] = x[j - 1 + m];
            it->a[3 * k + m] = coeff[first + m];
        }
    }
    it->dp = S->map[g + off[fa_line_point[upper]]] - i;
    it->a[12] = coeff[fa_line_point[upper]];
    it->dinv = S->dinv[S->run_type];
    if (dir > 0) {
        it->bound = S->run_hi[it->ru];
        it->ru += 1;
        it->next = it->ru < S->r_hi ? S->run_lo[it->ru] : -1;
    } else {
        it->bound = S->run_lo[it->ru];
        it->ru -= 1;
        it->next = it->ru >= S->r_lo ? S->run_hi[it->ru] - 1 : -1;
    }
    *dinv = it->dinv;
    return fa_it_sum(it, i, x);
}

/* In every function the rows lo .. hi - 1 are swept (vectors indexed by row); q (or NULL) is added
 * to the right-hand side of each row (apply_upper: to the result): the couplings to rows outside
 * the sweep (other ranks' rows) in block-Jacobi or separator-ordered SSOR. */

/* x = (D/omega + L)^{-1} (b + q) */
void fa_st_forward(const fa_stencil *S, const double *b, const double *q, double *x)
{
    fa_it it;
    fa_it_start(S, &it, 1);
    double dinv;
    int64_t i = S->lo;
    while (i < S->hi) {
        const int starts = i == it.next;
        double xi = (b[i] + FA_Q(q, i) - fa_it_half(S, &it, i, 0, 1, x, &dinv)) * dinv;
        x[i] = xi;
        ++i;
        if (!starts) continue;
        const double c = it.a[12] * it.dinv, di = it.dinv;
        for (const int64_t end = it.bound; i < end; ++i) { /* the rest of the run (see fa_it_shift) */
            fa_it_shift(&it, i, 1, x);
            xi = (b[i] + FA_Q(q, i) - fa_it_lines(&it)) * di - c * xi;
            x[i] = xi;
        }
    }
}

/* x = (D/omega + U)^{-1} (b + q) */
void fa_st_backward(const fa_stencil *S, const double *b, const double *q, double *x)
{
    fa_it it;
    fa_it_start(S, &it, -1);
    double dinv;
    int64_t i = S->hi - 1;
    while (i >= S->lo) {
        const int starts = i == it.next;
        double xi = (b[i] + FA_Q(q, i) - fa_it_half(S, &it, i, 1, -1, x, &dinv)) * dinv;
        x[i] = xi;
        --i;
        if (!starts) continue;
        const double c = it.a[12] * it.dinv, di = it.dinv;
        for (const int64_t end = it.bound; i >= end; --i) { /* the rest of the run (see fa_it_shift) */
            fa_it_shift(&it, i, -1, x);
            xi = (b[i] + FA_Q(q, i) - fa_it_lines(&it)) * di - c * xi;
            x[i] = xi;
        }
    }
}

/* y = (D/omega + U) x + q */
void fa_st_apply_upper(const fa_stencil *S, const double *x, const double *q, double *y)
{
    fa_it it;
    fa_it_start(S, &it, -1);
    double dinv;
    for (int64_t i = S->hi - 1; i >= S->lo; --i) {
        const double s = fa_it_half(S, &it, i, 1, -1, x, &dinv);
        y[i] = x[i] / dinv + s + FA_Q(q, i);
    }
}

/* y = A x (A = L + D + U) */
void fa_st_mult(const fa_stencil *S, const double *x, double *y)
{
    fa_it up, lo;
    fa_it_start(S, &up, -1);
    fa_it_start(S, &lo, 1);
    double dinv;
    /* the special rows' cursor of the upper part runs backward: run the rows backward */
    for (int64_t i = S->hi - 1; i >= S->lo; --i) y[i] = fa_it_half(S, &up, i, 1, -1, x, &dinv);
    for (int64_t i = S->lo; i < S->hi; ++i) {
        const uint16_t t = S->type[i];
        const double sl = fa_it_half(S, &lo, i, 0, 1, x, &dinv);
        const double d = t != FA_SPECIAL ? S->diag[t] : S->s_values[S->s_diag[lo.c - 1]];
        y[i] += sl + d * x[i];
    }
}

/* z = (D/omega + L)^{-1} (y + mid d t + q) */
void fa_st_forward_eisenstat(const fa_stencil *S, const double *y, const double *t, const double *d, double mid,
                             const double *q, double *z)
{
    fa_it it;
    fa_it_start(S, &it, 1);
    double dinv;
    for (int64_t i = S->lo; i < S->hi; ++i) {
        const double s = y[i] + mid * d[i] * t[i] + FA_Q(q, i);
        const double h = fa_it_half(S, &it, i, 0, 1, z, &dinv);
        z[i] = (s - h) * dinv;
    }
}

/* p = d r + beta p, then t = (D/omega + U)^{-1} (p + q) */
void fa_st_cg_direction_backward(const fa_stencil *S, const double *r, const double *d, double beta, double *p,
                                 const double *q, double *t)
{
    fa_it it;
    fa_it_start(S, &it, -1);
    double dinv;
    int64_t i = S->hi - 1;
    while (i >= S->lo) {
        const int starts = i == it.next;
        double pi = d[i] * r[i] + beta * p[i];
        p[i] = pi;
        const double h = fa_it_half(S, &it, i, 1, -1, t, &dinv);
        double ti = (pi + FA_Q(q, i) - h) * dinv;
        t[i] = ti;
        --i;
        if (!starts) continue;
        const double c = it.a[12] * it.dinv, di = it.dinv;
        for (const int64_t end = it.bound; i >= end; --i) { /* the rest of the run (see fa_it_shift) */
            fa_it_shift(&it, i, -1, t);
            pi = d[i] * r[i] + beta * p[i];
            p[i] = pi;
            ti = (pi + FA_Q(q, i) - fa_it_lines(&it)) * di - c * ti;
            t[i] = ti;
        }
    }
}

/* z = (D/omega + L)^{-1} (p + mid d t + q), w = z + t, z overwriting t; returns the sum of p[i] w[i] */
double fa_st_cg_forward_product(const fa_stencil *S, const double *p, double *t, const double *d, double mid,
                                const double *q, double *w)
{
    fa_it it;
    fa_it_start(S, &it, 1);
    double dinv, pw = 0.0;
    int64_t i = S->lo;
    while (i < S->hi) {
        const int starts = i == it.next;
        const double ti = t[i];
        const double s = p[i] + mid * d[i] * ti + FA_Q(q, i);
        const double h = fa_it_half(S, &it, i, 0, 1, t, &dinv);
        double zi = (s - h) * dinv;
        t[i] = zi;
        w[i] = zi + ti;
        pw += p[i] * (zi + ti);
        ++i;
        if (!starts) continue;
        const double c = it.a[12] * it.dinv, di = it.dinv;
        for (const int64_t end = it.bound; i < end; ++i) { /* the rest of the run (see fa_it_shift) */
            fa_it_shift(&it, i, 1, t);
            const double tj = t[i];
            zi = (p[i] + mid * d[i] * tj + FA_Q(q, i) - fa_it_lines(&it)) * di - c * zi;
            t[i] = zi;
            w[i] = zi + tj;
            pw += p[i] * (zi + tj);
        }
    }
    return pw;
}

/* The row keys that group a CSR matrix pair (K, M) of one pattern into row types (rows as given,
 * e.g. one rank's diagonal block): two independent keys per row, key[r][i] (r = 0, 1) the sum over
 * row i's entries of mult[r][code] * rint(k / scale_k) + mult[r][27 + code] * rint(m / scale_m)
 * (wrapping 64-bit arithmetic), code = the entry's neighbour offset (0..26, x fastest) from the
 * columns' linear grid positions lin (offsets27: the 27 linear offsets in code order, strides
 * 1, s1, s2 with s1 >= 3 and s2 >= 3 s1: a padded grid). special[i] is set to 1 for a row with a
 * column that is not primary (not the first dof of its grid node). Returns the number of entries
 * whose offset is not one of the 27 (then the matrix is not a voxel stencil). */
int64_t fa_st_row_keys(int64_t n, const int32_t *indptr, const int32_t *indices, const double *k, const double *m,
                       const int64_t *lin, const uint8_t *primary, const int64_t *offsets27, double scale_k,
                       double scale_m, const uint64_t *mult, uint64_t *key0, uint64_t *key1, uint8_t *special)
{
    const int64_t s1 = offsets27[12] - offsets27[9], s2 = offsets27[13] - offsets27[4];
    const uint64_t *mult1 = mult + 54;
    int64_t outside = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint64_t h0 = 0, h1 = 0;
        uint8_t sp = 0;
        for (int32_t e = indptr[i]; e < indptr[i + 1]; ++e) {
            const int32_t j = indices[e];
            const int64_t off = lin[j] - lin[i];
            /* decode (dx, dy, dz) in {-1, 0, 1}^3 from off = dx + s1 dy + s2 dz */
            const int dz = off > s2 / 2 ? 1 : (off < -(s2 / 2) ? -1 : 0);
            const int64_t rest = off - dz * s2;
            const int dy = rest > s1 / 2 ? 1 : (rest < -(s1 / 2) ? -1 : 0);
            const int code = (int)(rest - dy * s1) + 1 + 3 * (dy + 1) + 9 * (dz + 1);
            if (code < 0 || code > 26 || offsets27[code] != off) { ++outside; continue; }
            if (!primary[j]) sp = 1;
            const uint64_t qk = (uint64_t)(int64_t)llrint(k[e] / scale_k), qm = (uint64_t)(int64_t)llrint(m[e] / scale_m);
            h0 += mult[code] * qk + mult[27 + code] * qm;
            h1 += mult1[code] * qk + mult1[27 + code] * qm;
        }
        key0[i] = h0;
        key1[i] = h1;
        special[i] |= sp;
    }
    return outside;
}

/* q[rows[i]] = sum of data[k] x[indices[k]] over row i's entries k = indptr[i] .. indptr[i + 1] - 1,
 * summed in order (as a CSR product by SciPy): the couplings of a rank's rows to other ranks' values */
void fa_csr_rows_product(int64_t nrows, const int64_t *indptr, const int32_t *indices, const double *data,
                         const double *x, const int32_t *rows, double *q)
{
    for (int64_t i = 0; i < nrows; ++i) {
        double s = 0.0;
        for (int64_t k = indptr[i]; k < indptr[i + 1]; ++k) s += data[k] * x[indices[k]];
        q[rows[i]] = s;
    }
}

/* dst[i] = src[order[i]] (into a permuted order, or back by the inverse permutation) */
void fa_gather(int64_t n, const int32_t *order, const double *src, double *dst)
{
    for (int64_t i = 0; i < n; ++i) dst[i] = src[order[i]];
}


/* The start of the fused CG (rows lo .. hi - 1, one rank or the first rows of a separator order,
 * no couplings outside the sweep) in one pass instead of three: y = (D/omega + U) x (the
 * transformed initial guess), bh = (D/omega + L)^{-1} b (the transformed right-hand side) and
 * z = (D/omega + L)^{-1} (y + mid d x); returns the sum of bh[i] d[i] bh[i]. */
double fa_st_cg_start(const fa_stencil *S, const double *b, const double *x, const double *d, double mid,
                      double *y, double *bh, double *z)
{
    fa_it iu, ib, iz;
    fa_it_start(S, &iu, 1);
    fa_it_start(S, &ib, 1);
    fa_it_start(S, &iz, 1);
    double acc = 0.0;
    for (int64_t i = S->lo; i < S->hi; ++i) {
        double dinv;
        const double up = fa_it_half(S, &iu, i, 1, 1, x, &dinv);
        const double lb = fa_it_half(S, &ib, i, 0, 1, bh, &dinv);
        const double lz = fa_it_half(S, &iz, i, 0, 1, z, &dinv);
        const double yi = x[i] / dinv + up;
        y[i] = yi;
        const double bi = (b[i] - lb) * dinv;
        bh[i] = bi;
        acc += bi * d[i] * bi;
        z[i] = (yi + mid * d[i] * x[i] - lz) * dinv;
    }
    return acc;
}


/* Squared Euclidean distance transform (Felzenszwalb and Huttenlocher, Theory of Computing 8, 2012),
 * in place: f holds 0 at the targets and INFINITY elsewhere on an nz x ny x nx grid (x fastest) with
 * voxel edges hz, hy, hx; on return f holds the squared distance to the nearest target (INFINITY if
 * there is none). One exact lower-envelope pass per axis; scratch of 4 (n + 1) values per pass. */
static void fa_edt_line(double *f, int64_t n, int64_t stride, double w, double *g, int64_t *v, double *z)
{
    int64_t k = -1;
    for (int64_t q = 0; q < n; ++q) g[q] = f[q * stride];
    for (int64_t q = 0; q < n; ++q) {
        if (isinf(g[q])) continue;
        if (k < 0) {
            k = 0;
            v[0] = q;
            z[0] = -INFINITY;
            z[1] = INFINITY;
            continue;
        }
        double s;
        for (;;) {
            const int64_t p = v[k];
            s = ((g[q] + w * (double)q * (double)q) - (g[p] + w * (double)p * (double)p)) / (2.0 * w * (double)(q - p));
            if (s > z[k]) break;
            --k; /* z[0] = -inf: stops at k = 0 */
        }
        ++k;
        v[k] = q;
        z[k] = s;
        z[k + 1] = INFINITY;
    }
    if (k < 0) return; /* no target on the line: the values stay infinite */
    int64_t j = 0;
    for (int64_t q = 0; q < n; ++q) {
        while (z[j + 1] < (double)q) ++j;
        const double d = (double)(q - v[j]);
        f[q * stride] = w * d * d + g[v[j]];
    }
}

int64_t fa_edt_squared(int64_t nz, int64_t ny, int64_t nx, double hz, double hy, double hx, double *f)
{
    const int64_t most = nz > ny ? (nz > nx ? nz : nx) : (ny > nx ? ny : nx);
    double *g = (double *)malloc(sizeof(double) * (size_t)(2 * most + 2));
    int64_t *v = (int64_t *)malloc(sizeof(int64_t) * (size_t)(most + 1));
    if (g == NULL || v == NULL) {
        free(g);
        free(v);
        return -1;
    }
    double *z = g + most + 1;
    double *line = (double *)malloc(sizeof(double) * (size_t)most);
    if (line == NULL) {
        free(g);
        free(v);
        return -1;
    }
    const int64_t plane = ny * nx;
    for (int64_t k = 0; k < nz; ++k) /* along x: contiguous lines */
        for (int64_t j = 0; j < ny; ++j) fa_edt_line(f + k * plane + j * nx, nx, 1, hx * hx, line, v, z);
    for (int64_t k = 0; k < nz; ++k) /* along y */
        for (int64_t i = 0; i < nx; ++i) fa_edt_line(f + k * plane + i, ny, nx, hy * hy, line, v, z);
    for (int64_t j = 0; j < ny; ++j) /* along z */
        for (int64_t i = 0; i < nx; ++i) fa_edt_line(f + j * nx + i, nz, plane, hz * hz, line, v, z);
    free(line);
    free(g);
    free(v);
    return 0;
}


/* The start of the fused CG on the voxel stencil in one pass instead of seven (the three sweeps,
 * two vector updates and two dot products of EisenstatCG.solve's start), for one rank or one slab
 * of the separator order before its separator correction:
 *   y  = (D/omega + U) x, plus q on the first nq rows (the couplings to the slab below),
 *   bh = (D/omega + L)^{-1} b                 (the transformed right-hand side),
 *   z  = (D/omega + L)^{-1} (y + mid d x)      (so that z + x = Eisenstat's operator applied to y),
 *   r  = bh - (z + x)                          (the initial residual of the transformed system);
 * sums[0] = sum of bh d bh and sums[1] = sum of r d r over the rows below nsum, in the four partial
 * sums of fa_weighted_dot (the same values bit for bit). Each row does exactly the arithmetic of
 * fa_apply_upper, fa_forward, fa_forward_eisenstat and the two updates. */
void fa_cg_start(int64_t n, const double *b, const double *x, const double *d, double mid,
                 const double *dinv, const int32_t *lower, const int32_t *upper, const uint8_t *mask,
                 const double *g, int64_t nq, const double *q, int64_t nsum,
                 double *y, double *bh, double *z, double *r, double *sums)
{
    const double gx = g[0], gy = g[1], gz = g[2];
    double accb[4] = {0.0, 0.0, 0.0, 0.0}, accr[4] = {0.0, 0.0, 0.0, 0.0};
    const int64_t blocks = nsum - nsum % 4;
    double prev_b = 0.0, prev_z = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t m = mask[i];
        const double di = dinv[i];
        double yi = x[i] / di;
        if (m & 8) yi -= gx * x[i + 1];
        if (m & 16) yi -= gy * x[upper[2 * i]];
        if (m & 32) yi -= gz * x[upper[2 * i + 1]];
        if (i < nq) yi += q[i];
        y[i] = yi;
        const double c = (m & 1) ? gx * di : 0.0;
        double s = b[i];
        if (m & 2) s += gy * bh[lower[2 * i]];
        if (m & 4) s += gz * bh[lower[2 * i + 1]];
        prev_b = s * di + c * prev_b;
        bh[i] = prev_b;
        s = yi + mid * d[i] * x[i];
        if (m & 2) s += gy * z[lower[2 * i]];
        if (m & 4) s += gz * z[lower[2 * i + 1]];
        prev_z = s * di + c * prev_z;
        z[i] = prev_z;
        const double ri = prev_b - (prev_z + x[i]);
        r[i] = ri;
        if (i < nsum) {
            const int k = i < blocks ? (int)(i & 3) : 0;
            accb[k] += prev_b * d[i] * prev_b;
            accr[k] += ri * d[i] * ri;
        }
    }
    sums[0] = (accb[0] + accb[1]) + (accb[2] + accb[3]);
    sums[1] = (accr[0] + accr[1]) + (accr[2] + accr[3]);
}


/* r -= alpha w; returns the sum of d[i] r[i]^2 (fa_cg_update without y's update, which the next
 * fa_cg_direction_backward does; the same sum bit for bit) */
double fa_cg_update_residual(int64_t n, double alpha, const double *w, const double *d, double *r)
{
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int k = 0; k < 4; ++k) {
            const double ri = r[i + k] - alpha * w[i + k];
            r[i + k] = ri;
            acc[k] += d[i + k] * ri * ri;
        }
    }
    for (; i < n; ++i) {
        const double ri = r[i] - alpha * w[i];
        r[i] = ri;
        acc[0] += d[i] * ri * ri;
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* y += alpha p (the last deferred update of a solve) */
void fa_axpy(int64_t n, double alpha, const double *p, double *y)
{
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * p[i];
}


/* Geodesic distances on the 26-neighbour voxel graph (Dijkstra with a binary heap): dist[i]
 * becomes min(dist[i], min over neighbours j of dist[j] + step(j, i)), to the fixed point, over the
 * passable voxels (pass[i] != 0) of the layers first ... last - 1; voxels outside those layers keep
 * their values (a neighbour's halo: sources only). steps[27] is the length of the step with offset
 * (dz, dy, dx) in -1..1, at index 9 (dz + 1) + 3 (dy + 1) + (dx + 1). The search starts from the
 * nseeds voxels seeds[] with their current distances (the voxels whose distance fell since the last
 * fixed point, or all finite ones); each value is dist[j] + step, the arithmetic of skimage's
 * MCP_Geometric with unit costs. A voxel is queued again whenever its distance falls and an entry
 * whose key is above the voxel's distance is skipped when popped (no position array: no memory
 * per voxel besides dist). Returns the number of times a distance fell, -1 without memory. */
typedef struct { double key; int64_t index; } fa_heap_item;

static int fa_heap_push(fa_heap_item **heap, int64_t *count, int64_t *capacity, double key, int64_t index)
{
    if (*count == *capacity) {
        fa_heap_item *grown = (fa_heap_item *)realloc(*heap, sizeof(fa_heap_item) * (size_t)(2 * *capacity));
        if (grown == NULL) return -1;
        *heap = grown;
        *capacity *= 2;
    }
    fa_heap_item *h = *heap;
    int64_t k = (*count)++;
    while (k > 0) {
        const int64_t parent = (k - 1) / 2;
        if (h[parent].key <= key) break;
        h[k] = h[parent];
        k = parent;
    }
    h[k].key = key;
    h[k].index = index;
    return 0;
}

static fa_heap_item fa_heap_pop(fa_heap_item *heap, int64_t *count)
{
    const fa_heap_item top = heap[0];
    const fa_heap_item last = heap[--(*count)];
    const int64_t n = *count;
    int64_t k = 0;
    for (;;) {
        int64_t child = 2 * k + 1;
        if (child >= n) break;
        if (child + 1 < n && heap[child + 1].key < heap[child].key) ++child;
        if (last.key <= heap[child].key) break;
        heap[k] = heap[child];
        k = child;
    }
    if (n > 0) heap[k] = last;
    return top;
}

int64_t fa_geodesic(int64_t nz, int64_t ny, int64_t nx, const uint8_t *pass, const double *steps,
                    int64_t first, int64_t last, int64_t nseeds, const int64_t *seeds, double *dist)
{
    const int64_t plane = ny * nx;
    int64_t capacity = nseeds + 1024, count = 0, lowered = 0;
    fa_heap_item *heap = (fa_heap_item *)malloc(sizeof(fa_heap_item) * (size_t)capacity);
    if (heap == NULL) return -1;
    for (int64_t s = 0; s < nseeds; ++s)
        if (dist[seeds[s]] < INFINITY && fa_heap_push(&heap, &count, &capacity, dist[seeds[s]], seeds[s]) != 0) {
            free(heap);
            return -1;
        }
    while (count > 0) {
        const fa_heap_item top = fa_heap_pop(heap, &count);
        if (top.key > dist[top.index]) continue; /* queued again since, with a lower distance */
        const int64_t k = top.index / plane, j = (top.index / nx) % ny, i = top.index % nx;
        for (int64_t dz = -1; dz <= 1; ++dz) {
            const int64_t kk = k + dz;
            if (kk < first || kk >= last) continue;
            for (int64_t dy = -1; dy <= 1; ++dy) {
                const int64_t jj = j + dy;
                if (jj < 0 || jj >= ny) continue;
                for (int64_t dx = -1; dx <= 1; ++dx) {
                    const int64_t ii = i + dx;
                    if (ii < 0 || ii >= nx || (dz == 0 && dy == 0 && dx == 0)) continue;
                    const int64_t m = kk * plane + jj * nx + ii;
                    if (!pass[m]) continue;
                    const double candidate = top.key + steps[9 * (dz + 1) + 3 * (dy + 1) + (dx + 1)];
                    if (!(candidate < dist[m])) continue; /* also every voxel already final */
                    dist[m] = candidate;
                    ++lowered;
                    if (fa_heap_push(&heap, &count, &capacity, candidate, m) != 0) {
                        free(heap);
                        return -1;
                    }
                }
            }
        }
    }
    free(heap);
    return lowered;
}
