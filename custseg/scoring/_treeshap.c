/*
 * custseg.scoring._treeshap: exact path-dependent Tree SHAP for compiled tree ensembles
 * (see custseg/scoring/explainer.py for the layout, the maths and why it is exact).
 *
 * explain(matrix, trees, inner_feature, inner_threshold, inner_children, leaf_path, leaf_table,
 *         leaf_value, path_column, path_zero, tables, column_slot, out)
 *
 * For every row and tree: one pass over the tree's inner nodes (parents before children) gives each
 * leaf the set of features whose conditions on the leaf's path the row fails (a bitmask over the
 * encoded columns). The leaf's share of each path feature's Shapley value then follows from that mask
 * alone: a lookup in the leaf's precomputed table (2^d values over the subsets of its d path features),
 * or, for leaves without a table, the same quantity from the elementary symmetric polynomials of the
 * path's zero fractions (O(d^2)). Contributions are added to out (float64, rows x classes x slots);
 * `column_slot` maps an encoded column to its output slot (both gender indicators to one slot).
 *
 * Model.build_tables (see "signature tables" below) precomputes, for bulk calls, each tree's sums for every
 * combination of sides of its thresholds; a row then costs one read per tree.
 *
 * Every index is checked before the work starts, so a malformed explainer raises ValueError instead of
 * reading outside its arrays. The work itself runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_COLUMNS 32 /* failed-feature sets are uint32 bitmasks over the encoded columns */
#define MAX_PATH 16    /* unique features on one leaf's path */
#define MAX_CLASSES 16
#define MAX_SLOTS 32
/* The row loops vectorise; on x86-64 the hot function is also built for AVX2 + FMA (x86-64-v3) and the
 * loader picks the version the processor runs (about twice as fast as SSE2 here). */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif
#if defined(__GNUC__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif
#define BLOCK 32 /* rows explained together: each tree's arrays are read once per block */

/* Shapley weights: WEIGHT[d][s] = s! (d - s - 1)! / d!, and WEIGHT[d][d] = 0 (never a real term). */
static double WEIGHT[MAX_PATH + 1][MAX_PATH + 1];

static void init_weights(void) {
    for (int d = 1; d <= MAX_PATH; d++) {
        double binomial = 1.0; /* C(d - 1, s) */
        for (int s = 0; s < d; s++) {
            WEIGHT[d][s] = 1.0 / ((double)d * binomial);
            binomial = binomial * (double)(d - 1 - s) / (double)(s + 1);
        }
        WEIGHT[d][d] = 0.0;
    }
}

typedef struct {
    Py_buffer view;
    int held;
} Buffer;

static int get_buffer(PyObject *obj, Buffer *buf, const char *name, const char *format, int ndim,
                      int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &buf->view, flags) != 0) {
        return -1;
    }
    buf->held = 1;
    /* 'l' and 'q' are both 64-bit on the platforms we build for; numpy reports int64 as either. */
    int format_ok = strcmp(buf->view.format, format) == 0 ||
                    (strcmp(format, "q") == 0 && strcmp(buf->view.format, "l") == 0 && sizeof(long) == 8);
    if (buf->view.ndim != ndim || !format_ok) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous %d-d array of format '%s' (got %d-d '%s')",
                     name, ndim, format, buf->view.ndim, buf->view.format);
        return -1;
    }
    return 0;
}

static void release(Buffer *buf) {
    if (buf->held) {
        PyBuffer_Release(&buf->view);
        buf->held = 0;
    }
}

typedef struct {
    const float *matrix;
    Py_ssize_t n_rows, n_columns;
    const int32_t *trees; /* (T, 4): first inner node, inner nodes, first leaf, leaves */
    Py_ssize_t n_trees;
    const int32_t *inner_feature;
    const float *inner_threshold;
    const int32_t *inner_children; /* (I, 2): left, right as tree-local slots */
    const int32_t *leaf_path;      /* (L, 2): first path entry, path length */
    const int64_t *leaf_table;     /* (L,): offset into tables, or -1 */
    const double *leaf_value;      /* (L, C) */
    Py_ssize_t n_classes;
    const int32_t *path_column;
    const double *path_zero;
    const double *path_ratio; /* (1 - z) / z of each path entry (0 where z = 0), computed once */
    const double *tables;
    const int32_t *column_slot;
    Py_ssize_t n_slots;
    Py_ssize_t max_slots_per_tree;
    const int64_t *row_class; /* (n,): explain only this class of each row (out is n x slots); NULL: all */
    double *out;              /* (n, C, slots), or (n, slots) with row_class */
    const int32_t *tree_slot_start; /* (T + 1): tree t adds to slots tree_slots[start[t] .. start[t + 1]) */
    const int32_t *tree_slots;
    /* Signature tables (see build_tables; sig_offset NULL until built). */
    const int64_t *sig_offset;   /* (T,): tree t's first value in sig_values, or -1: no table */
    const int32_t *sig_count;    /* (T,): tree t's signatures */
    const float *bucket_bounds;  /* every column's distinct thresholds, ascending, column after column */
    const int32_t *bucket_start; /* (columns + 1): column j owns bucket_bounds[start[j] .. start[j + 1]) */
    const int32_t *bucket_lut;   /* (bucket_start[columns] + columns) x T: stride x local bucket */
    const double *sig_values;    /* per tree: (classes, signatures, the tree's slots) */
} Forest;

/* The share s[k] of each path feature for one leaf without a table, before multiplying by its values. */
static void leaf_shares(int d, const double *z, uint32_t satisfied, double outside, double *s) {
    /* No table: H(A) = sum_t WEIGHT[d][|A| - t] e_t(z_A), with e the elementary symmetric polynomials. */
    double e[MAX_PATH + 1];
    double without[MAX_PATH + 1];
    int a = 0;
    e[0] = 1.0;
    for (int k = 0; k < d; k++) {
        if (satisfied & (1u << k)) {
            e[a + 1] = 0.0;
            for (int j = a + 1; j >= 1; j--) {
                e[j] += z[k] * e[j - 1];
            }
            a++;
        }
    }
    const double *w = WEIGHT[d];
    double h = 0.0;
    for (int t = 0; t <= a; t++) {
        h += w[a - t] * e[t];
    }
    double absent = -outside * h;
    for (int k = 0; k < d; k++) {
        if (!(satisfied & (1u << k))) {
            s[k] = absent;
            continue;
        }
        /* Divide the polynomial by (1 + z_k y): stable, every z lies in [0, 1]. */
        without[0] = 1.0;
        for (int j = 1; j < a; j++) {
            without[j] = e[j] - z[k] * without[j - 1];
        }
        double hk = 0.0;
        for (int t = 0; t < a; t++) {
            hk += w[a - 1 - t] * without[t];
        }
        s[k] = (1.0 - z[k]) * outside * hk;
    }
}

/* The leaves of one tree for a block of rows, when the leaf has a table T(A) = Z(U\A) H(A): then the
 * share of a failed feature is -T(M) and that of a satisfied feature k is (1 - z_k) / z_k T(M\{k})
 * (T(M\{k}) holds the factor z_k). The row loops are innermost and branch-free so they vectorise.
 * With `cls` (each row's class of interest) phi is slots x width and only that class is added: the same
 * products, added in the same order, as the all-classes pass gives that class. */
ALWAYS_INLINE static inline void tabled_leaf(const Forest *f, int32_t leaf, const uint32_t *restrict fails,
                                             double *restrict phi, const int64_t *cls, const int one,
                                             const int width) {
    int32_t start = f->leaf_path[2 * leaf], d = f->leaf_path[2 * leaf + 1];
    const int32_t *columns = f->path_column + start;
    const double *ratios = f->path_ratio + start;
    const double *restrict table = f->tables + f->leaf_table[leaf];
    const double *v = f->leaf_value + (int64_t)leaf * f->n_classes;
    uint32_t m[BLOCK];
    double absent[BLOCK], s[BLOCK], vr[BLOCK];
    for (int r = 0; r < width; r++) {
        m[r] = 0;
    }
    for (int k = 0; k < d; k++) {
        uint32_t column = (uint32_t)columns[k];
        for (int r = 0; r < width; r++) {
            m[r] |= (((fails[r] >> column) & 1u) ^ 1u) << k;
        }
    }
    for (int r = 0; r < width; r++) {
        absent[r] = -table[m[r]];
    }
    if (one) {
        for (int r = 0; r < width; r++) {
            vr[r] = v[cls[r]];
        }
    }
    for (int k = 0; k < d; k++) {
        uint32_t bit = 1u << k;
        double ratio = ratios[k];
        /* s = bit set ? present : absent, as a bitwise blend: no branch to mispredict (whether a row
         * satisfies a leaf's condition is a coin toss), the row loop vectorises, and the bits are those
         * of the chosen value. */
        for (int r = 0; r < width; r++) {
            double present = ratio * table[m[r] & ~bit];
            uint64_t p_bits, a_bits;
            memcpy(&p_bits, &present, sizeof p_bits);
            memcpy(&a_bits, &absent[r], sizeof a_bits);
            uint64_t take = (uint64_t)0 - (uint64_t)((m[r] >> k) & 1u);
            uint64_t chosen = (p_bits & take) | (a_bits & ~take);
            memcpy(&s[r], &chosen, sizeof chosen);
        }
        if (one) {
            double *restrict p = phi + (int64_t)f->column_slot[columns[k]] * width;
            for (int r = 0; r < width; r++) {
                p[r] += s[r] * vr[r];
            }
            continue;
        }
        double *restrict p = phi + (int64_t)f->column_slot[columns[k]] * f->n_classes * width;
        for (Py_ssize_t c = 0; c < f->n_classes; c++) {
            double vc = v[c];
            double *restrict pc = p + c * width;
            for (int r = 0; r < width; r++) {
                pc[r] += s[r] * vc;
            }
        }
    }
}

/* The same for a leaf without a table, one row at a time (O(d^2) each). */
ALWAYS_INLINE static inline void untabled_leaf(const Forest *f, int32_t leaf, const uint32_t *fails, double *phi,
                                               const int64_t *cls, const int one, const int width) {
    int32_t start = f->leaf_path[2 * leaf], d = f->leaf_path[2 * leaf + 1];
    const int32_t *columns = f->path_column + start;
    const double *z = f->path_zero + start;
    const double *v = f->leaf_value + (int64_t)leaf * f->n_classes;
    double s[MAX_PATH];
    for (int r = 0; r < width; r++) {
        uint32_t satisfied = 0;
        double outside = 1.0; /* product of the zero fractions of the failed path features */
        for (int k = 0; k < d; k++) {
            uint32_t ok = !((fails[r] >> columns[k]) & 1u);
            satisfied |= ok << k;
            outside *= ok ? 1.0 : z[k];
        }
        leaf_shares(d, z, satisfied, outside, s);
        if (one) {
            double vc = v[cls[r]];
            for (int k = 0; k < d; k++) {
                phi[(int64_t)f->column_slot[columns[k]] * width + r] += s[k] * vc;
            }
            continue;
        }
        for (int k = 0; k < d; k++) {
            double *p = phi + (int64_t)f->column_slot[columns[k]] * f->n_classes * width + r;
            for (Py_ssize_t c = 0; c < f->n_classes; c++) {
                p[c * width] += s[k] * v[c];
            }
        }
    }
}

/* Tree t's leaves for a block of `width` rows (xs: columns x width, transposed) added into acc (slots x
 * classes x width, classes = 1 with `one`); failed: (max slots per tree) x width. */
ALWAYS_INLINE static inline void tree_leaves(const Forest *f, Py_ssize_t t, const float *xs, uint32_t *failed,
                                             double *acc, const int64_t *cls, const int one, const int width) {
    const int32_t *tree = f->trees + 4 * t;
    int32_t first_inner = tree[0], n_inner = tree[1], first_leaf = tree[2], n_leaves = tree[3];
    for (int r = 0; r < width; r++) {
        failed[r] = 0;
    }
    /* Parents come before children: each slot is written once, by its parent, before it is read. */
    for (int32_t i = 0; i < n_inner; i++) {
        int32_t g = first_inner + i;
        uint32_t bit = 1u << f->inner_feature[g];
        float threshold = f->inner_threshold[g];
        const float *restrict x = xs + (int64_t)f->inner_feature[g] * width;
        const uint32_t *restrict here = failed + (int64_t)i * width;
        uint32_t *restrict left = failed + (int64_t)f->inner_children[2 * g] * width;
        uint32_t *restrict right = failed + (int64_t)f->inner_children[2 * g + 1] * width;
        for (int r = 0; r < width; r++) {
            uint32_t goes_right = x[r] > threshold ? bit : 0u;
            left[r] = here[r] | goes_right;
            right[r] = here[r] | (goes_right ^ bit);
        }
    }
    for (int32_t j = 0; j < n_leaves; j++) {
        const uint32_t *fails = failed + (int64_t)(n_inner + j) * width;
        if (f->leaf_table[first_leaf + j] >= 0) {
            tabled_leaf(f, first_leaf + j, fails, acc, cls, one, width);
        } else {
            untabled_leaf(f, first_leaf + j, fails, acc, cls, one, width);
        }
    }
}

/* With the tables built, phi += acc over tree t's slots, and acc back to zeros: every tree's share is
 * summed on its own first (from zero, leaf after leaf), then added to the row's total, tree after tree.
 * The signature tables hold exactly those per-tree sums, so trees with and without a table, blocks and
 * single rows all give the same bits (a different summation order from the no-table pass, which adds every
 * leaf straight into the total: the two differ by float64 rounding, ~1e-15). A single row adds every slot
 * (a few vector adds, no slot list): the other slots' acc is +0.0, and phi, a sum that starts at +0.0, is
 * never -0.0, so adding +0.0 leaves it unchanged, bit for bit. */
ALWAYS_INLINE static inline void flush_tree(const Forest *f, Py_ssize_t t, double *restrict acc,
                                            double *restrict phi, Py_ssize_t n_classes, const int width) {
    if (width == 1) {
        for (Py_ssize_t k = 0; k < f->n_slots * n_classes; k++) {
            phi[k] += acc[k];
            acc[k] = 0.0;
        }
        return;
    }
    for (int32_t i = f->tree_slot_start[t]; i < f->tree_slot_start[t + 1]; i++) {
        int64_t at = (int64_t)f->tree_slots[i] * n_classes * width;
        for (Py_ssize_t k = 0; k < n_classes * width; k++) {
            phi[at + k] += acc[at + k];
            acc[at + k] = 0.0;
        }
    }
}

/* Each row's signature in every tree with a table: sigs[r * T + t] = sum over the tree's columns of
 * stride x (the row's bucket among the tree's thresholds of that column), looked up per column from the
 * row's bucket among all the forest's thresholds of that column. */
ALWAYS_INLINE static inline void signatures(const Forest *f, const float *xs, int32_t *restrict sigs,
                                            const int width) {
    const Py_ssize_t n_trees = f->n_trees;
    for (int r = 0; r < width; r++) {
        int32_t *restrict sv = sigs + (int64_t)r * n_trees;
        for (Py_ssize_t t = 0; t < n_trees; t++) {
            sv[t] = 0;
        }
        for (Py_ssize_t j = 0; j < f->n_columns; j++) {
            const int32_t lo = f->bucket_start[j], count = f->bucket_start[j + 1] - lo;
            if (count == 0) {
                continue;
            }
            const float *bounds = f->bucket_bounds + lo;
            const float value = xs[j * width + r];
            int32_t bucket = 0, len = count; /* how many thresholds the value exceeds (NaN: none) */
            while (len > 1) {
                int32_t half = len / 2;
                bucket = bounds[bucket + half - 1] < value ? bucket + half : bucket;
                len -= half;
            }
            bucket += len == 1 && bounds[bucket] < value;
            const int32_t *restrict row = f->bucket_lut + ((int64_t)lo + j + bucket) * n_trees;
            for (Py_ssize_t t = 0; t < n_trees; t++) {
                sv[t] += row[t];
            }
        }
    }
}

#define PREFETCH_TREES 16 /* how many trees ahead a row's table entries are fetched */

/* Trees [t0, t1), all with tables: each row's entries (its signature, its class) added tree after tree,
 * row by row: a row's reads are independent of each other, so they are fetched ahead and overlap. */
ALWAYS_INLINE static inline void table_run(const Forest *f, Py_ssize_t t0, Py_ssize_t t1, const int32_t *sigs,
                                           const int64_t *cls, double *phi, Py_ssize_t n_classes, const int width) {
    double total[MAX_SLOTS * MAX_CLASSES];
    const Py_ssize_t n_values = f->n_slots * n_classes;
    for (int r = 0; r < width; r++) {
        const int32_t *sv = sigs + (int64_t)r * f->n_trees;
        for (Py_ssize_t v = 0; v < n_values; v++) {
            total[v] = phi[v * width + r];
        }
        for (Py_ssize_t c = 0; c < n_classes; c++) {
            int64_t klass = cls != NULL ? cls[r] : (int64_t)c;
            for (Py_ssize_t t = t0; t < t1; t++) {
                if (t + PREFETCH_TREES < t1) {
                    Py_ssize_t u = t + PREFETCH_TREES;
                    int32_t n_ahead = f->tree_slot_start[u + 1] - f->tree_slot_start[u];
                    __builtin_prefetch(f->sig_values + f->sig_offset[u] +
                                       (klass * f->sig_count[u] + sv[u]) * n_ahead);
                }
                const int32_t start = f->tree_slot_start[t], n_used = f->tree_slot_start[t + 1] - start;
                const int32_t *slots = f->tree_slots + start;
                const double *e = f->sig_values + f->sig_offset[t] + (klass * f->sig_count[t] + sv[t]) * n_used;
                for (int32_t k = 0; k < n_used; k++) {
                    total[slots[k] * n_classes + c] += e[k];
                }
            }
        }
        for (Py_ssize_t v = 0; v < n_values; v++) {
            phi[v * width + r] = total[v];
        }
    }
}

/* One block of `width` rows (a compile-time constant at each call, so the row loops vectorise).
 * failed: (max slots per tree) x width; phi, acc: slots x classes x width (slots x width with row_class);
 * xs: columns x width; sigs: width x trees (used when the tables are built). */
ALWAYS_INLINE static inline void explain_block(const Forest *f, Py_ssize_t first, uint32_t *failed, double *phi,
                                               double *acc, float *xs, int32_t *sigs, const int one,
                                               const int width) {
    const int64_t *cls = one ? f->row_class + first : NULL;
    Py_ssize_t n_classes = one ? 1 : f->n_classes;
    Py_ssize_t n_values = n_classes * f->n_slots;
    /* The block transposed: one column's values adjacent. */
    for (int r = 0; r < width; r++) {
        for (Py_ssize_t j = 0; j < f->n_columns; j++) {
            xs[j * width + r] = f->matrix[(first + r) * f->n_columns + j];
        }
    }
    memset(phi, 0, (size_t)n_values * (size_t)width * sizeof(double));
    if (f->sig_offset != NULL) {
        signatures(f, xs, sigs, width);
    }
    if (f->sig_offset == NULL) {
        /* No tables (a few rows, as the API's): every leaf adds straight into the row's totals. */
        for (Py_ssize_t t = 0; t < f->n_trees; t++) {
            tree_leaves(f, t, xs, failed, phi, cls, one, width);
        }
    }
    for (Py_ssize_t t = 0; f->sig_offset != NULL && t < f->n_trees;) {
        if (f->sig_offset[t] < 0) {
            tree_leaves(f, t, xs, failed, acc, cls, one, width);
            flush_tree(f, t, acc, phi, n_classes, width);
            t++;
            continue;
        }
        Py_ssize_t end = t + 1;
        while (end < f->n_trees && f->sig_offset[end] >= 0) {
            end++;
        }
        table_run(f, t, end, sigs, cls, phi, n_classes, width);
        t = end;
    }
    for (int r = 0; r < width; r++) {
        double *out = f->out + (first + r) * n_values;
        for (Py_ssize_t slot = 0; slot < f->n_slots; slot++) {
            for (Py_ssize_t c = 0; c < n_classes; c++) {
                out[c * f->n_slots + slot] = phi[(slot * n_classes + c) * width + r];
            }
        }
    }
}

/* Full blocks of BLOCK rows, then blocks of 4, then single rows: a lone row costs one row's work.
 * `one` (a constant at each call) selects the one-class-per-row pass. */
ALWAYS_INLINE static inline void explain_all(const Forest *f, uint32_t *failed, double *phi, double *acc,
                                             float *xs, int32_t *sigs, const int one) {
    Py_ssize_t first = 0;
    for (; first + BLOCK <= f->n_rows; first += BLOCK) {
        explain_block(f, first, failed, phi, acc, xs, sigs, one, BLOCK);
    }
    for (; first + 4 <= f->n_rows; first += 4) {
        explain_block(f, first, failed, phi, acc, xs, sigs, one, 4);
    }
    for (; first < f->n_rows; first++) {
        explain_block(f, first, failed, phi, acc, xs, sigs, one, 1);
    }
}

VECTOR_CLONES static void explain_rows(const Forest *f, uint32_t *failed, double *phi, double *acc, float *xs,
                                       int32_t *sigs) {
    if (f->row_class != NULL) {
        explain_all(f, failed, phi, acc, xs, sigs, 1);
    } else {
        explain_all(f, failed, phi, acc, xs, sigs, 0);
    }
}

/* NULL when the arrays form trees the kernel can walk without leaving them, else the reason. */
static const char *check_forest(const Forest *f, Py_ssize_t n_inner_all, Py_ssize_t n_leaves_all,
                                Py_ssize_t n_path, Py_ssize_t n_table, Py_ssize_t *max_slots) {
    Py_ssize_t most = 1;
    for (Py_ssize_t i = 0; i < f->n_columns; i++) {
        if (f->column_slot[i] < 0 || f->column_slot[i] >= f->n_slots) {
            return "a column maps to an output slot that does not exist";
        }
    }
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        const int32_t *tree = f->trees + 4 * t;
        if (tree[0] < 0 || tree[1] < 0 || (int64_t)tree[0] + tree[1] > n_inner_all) {
            return "a tree's inner nodes lie outside the node arrays";
        }
        if (tree[2] < 0 || tree[3] != tree[1] + 1 || (int64_t)tree[2] + tree[3] > n_leaves_all) {
            return "a tree's leaves lie outside the leaf arrays or do not number its inner nodes + 1";
        }
        if (tree[1] + tree[3] > most) {
            most = tree[1] + tree[3];
        }
    }
    for (Py_ssize_t g = 0; g < n_inner_all; g++) {
        if (f->inner_feature[g] < 0 || f->inner_feature[g] >= f->n_columns) {
            return "a node reads a column the input does not have";
        }
        if (isnan(f->inner_threshold[g])) {
            return "a node threshold is NaN";
        }
    }
    for (Py_ssize_t leaf = 0; leaf < n_leaves_all; leaf++) {
        int32_t start = f->leaf_path[2 * leaf], d = f->leaf_path[2 * leaf + 1];
        if (start < 0 || d < 0 || d > MAX_PATH || (int64_t)start + d > n_path) {
            return "a leaf's path lies outside the path arrays or is too long";
        }
        uint32_t seen = 0;
        for (int32_t k = 0; k < d; k++) {
            int32_t column = f->path_column[start + k];
            if (column < 0 || column >= f->n_columns || (seen >> column) & 1u) {
                return "a leaf's path names a column twice or one the input does not have";
            }
            seen |= 1u << column;
        }
        int64_t offset = f->leaf_table[leaf];
        if (offset < -1 || (offset >= 0 && offset + ((int64_t)1 << d) > n_table)) {
            return "a leaf's table lies outside the tables";
        }
    }
    *max_slots = most;
    return NULL;
}

/* NULL when every tree is a tree: slot 0 is the root, every other slot has exactly one parent, earlier. */
static const char *check_shapes(const Forest *f, int32_t *parents) {
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        const int32_t *tree = f->trees + 4 * t;
        int32_t n_slots = tree[1] + tree[3];
        memset(parents, 0, (size_t)n_slots * sizeof(int32_t));
        for (int32_t i = 0; i < tree[1]; i++) {
            for (int side = 0; side < 2; side++) {
                int32_t child = f->inner_children[2 * ((int64_t)tree[0] + i) + side];
                if (child <= i || child >= n_slots) {
                    return "a node's child lies outside its tree or before the node";
                }
                parents[child]++;
            }
        }
        for (int32_t slot = 1; slot < n_slots; slot++) {
            if (parents[slot] != 1) {
                return "a tree node has no parent or more than one";
            }
        }
    }
    return NULL;
}

/* A validated model: the explainer's arrays, checked once (every index the kernel follows), held for the
 * object's life. Explaining then checks only the rows and the output. */
enum { N_MODEL = 11 };
static const char *MODEL_NAMES[N_MODEL] = {"trees",     "inner_feature", "inner_threshold", "inner_children",
                                           "leaf_path", "leaf_table",    "leaf_value",      "path_column",
                                           "path_zero", "tables",        "column_slot"};
static const char *MODEL_FORMATS[N_MODEL] = {"i", "i", "f", "i", "i", "q", "d", "i", "d", "d", "i"};
static const int MODEL_DIMS[N_MODEL] = {2, 1, 1, 2, 2, 1, 2, 1, 1, 1, 1};

typedef struct {
    PyObject_HEAD
    Buffer b[N_MODEL];
    double *path_ratio;
    int32_t *tree_slot_start, *tree_slots;
    /* The signature tables (build_tables), owned here, NULL until built; never freed before the Model. */
    int64_t *sig_offset;
    int32_t *sig_count, *bucket_start, *bucket_lut;
    float *bucket_bounds;
    double *sig_values;
    Py_ssize_t table_bytes, table_trees;
    Forest f; /* the model's part: matrix, rows, row_class and out are set per call */
} Model;

static void free_tables(Model *self) {
    free(self->sig_offset);
    free(self->sig_count);
    free(self->bucket_start);
    free(self->bucket_lut);
    free(self->bucket_bounds);
    free(self->sig_values);
    self->sig_offset = NULL;
    self->sig_count = self->bucket_start = self->bucket_lut = NULL;
    self->bucket_bounds = NULL;
    self->sig_values = NULL;
}

static void Model_dealloc(Model *self) {
    for (int i = 0; i < N_MODEL; i++) {
        release(&self->b[i]);
    }
    free(self->path_ratio);
    free(self->tree_slot_start);
    free(self->tree_slots);
    free_tables(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Each tree's output slots (those of the columns its nodes test), ascending: the slots a tree adds to. */
static int tree_slot_lists(Model *self) {
    Forest *f = &self->f;
    Py_ssize_t n_inner_all = self->b[1].view.shape[0];
    self->tree_slot_start = malloc((size_t)(f->n_trees + 1) * sizeof(int32_t));
    self->tree_slots = malloc((size_t)(n_inner_all > 0 ? n_inner_all : 1) * sizeof(int32_t));
    if (self->tree_slot_start == NULL || self->tree_slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int32_t n = 0;
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        const int32_t *tree = f->trees + 4 * t;
        uint32_t used = 0;
        for (int32_t i = 0; i < tree[1]; i++) {
            used |= 1u << f->column_slot[f->inner_feature[tree[0] + i]];
        }
        self->tree_slot_start[t] = n;
        for (int32_t slot = 0; slot < f->n_slots; slot++) {
            if ((used >> slot) & 1u) {
                self->tree_slots[n++] = slot; /* at most one per inner node: n stays within the array */
            }
        }
    }
    self->tree_slot_start[f->n_trees] = n;
    f->tree_slot_start = self->tree_slot_start;
    f->tree_slots = self->tree_slots;
    return 0;
}

/* Take and check the arrays; 0, or -1 with an exception set. */
static int model_setup(Model *self, PyObject **objects, Py_ssize_t n_slots) {
    Buffer *b = self->b;
    for (int i = 0; i < N_MODEL; i++) {
        if (get_buffer(objects[i], &b[i], MODEL_NAMES[i], MODEL_FORMATS[i], MODEL_DIMS[i], 0)) {
            return -1;
        }
    }
    Forest *f = &self->f;
    memset(f, 0, sizeof *f);
    f->trees = b[0].view.buf;
    f->n_trees = b[0].view.shape[0];
    f->inner_feature = b[1].view.buf;
    f->inner_threshold = b[2].view.buf;
    f->inner_children = b[3].view.buf;
    f->leaf_path = b[4].view.buf;
    f->leaf_table = b[5].view.buf;
    f->leaf_value = b[6].view.buf;
    f->n_classes = b[6].view.shape[1];
    f->path_column = b[7].view.buf;
    f->path_zero = b[8].view.buf;
    f->tables = b[9].view.buf;
    f->column_slot = b[10].view.buf;
    f->n_columns = b[10].view.shape[0];
    f->n_slots = n_slots;
    Py_ssize_t n_inner_all = b[1].view.shape[0], n_leaves_all = b[4].view.shape[0];
    if (f->n_columns > MAX_COLUMNS || f->n_classes > MAX_CLASSES || f->n_slots < 1 || f->n_slots > MAX_SLOTS ||
        f->n_trees < 1 || b[0].view.shape[1] != 4 || b[2].view.shape[0] != n_inner_all ||
        b[3].view.shape[0] != n_inner_all || b[3].view.shape[1] != 2 || b[4].view.shape[1] != 2 ||
        b[5].view.shape[0] != n_leaves_all || b[6].view.shape[0] != n_leaves_all ||
        b[8].view.shape[0] != b[7].view.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "explain: array shapes do not fit together");
        return -1;
    }
    const char *problem = check_forest(f, n_inner_all, n_leaves_all, b[7].view.shape[0], b[9].view.shape[0],
                                       &f->max_slots_per_tree);
    if (problem == NULL) {
        int32_t *parents = malloc((size_t)f->max_slots_per_tree * sizeof(int32_t));
        if (parents == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        problem = check_shapes(f, parents);
        free(parents);
    }
    if (problem != NULL) {
        PyErr_Format(PyExc_ValueError, "malformed explainer: %s", problem);
        return -1;
    }
    /* The same division the table formula needs, done once here rather than per row and leaf. */
    Py_ssize_t n_path = b[7].view.shape[0];
    self->path_ratio = malloc((size_t)(n_path > 0 ? n_path : 1) * sizeof(double));
    if (self->path_ratio == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n_path; i++) {
        double z = f->path_zero[i];
        self->path_ratio[i] = z != 0.0 ? (1.0 - z) / z : 0.0; /* tabled leaves have no zero fraction */
    }
    f->path_ratio = self->path_ratio;
    return tree_slot_lists(self);
}

static PyTypeObject ModelType;

static PyObject *Model_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *objects[N_MODEL];
    Py_ssize_t n_slots;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Model takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOn:Model", &objects[0], &objects[1], &objects[2], &objects[3],
                          &objects[4], &objects[5], &objects[6], &objects[7], &objects[8], &objects[9],
                          &objects[10], &n_slots)) {
        return NULL;
    }
    Model *self = (Model *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (model_setup(self, objects, n_slots) != 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* Explain the rows of `matrix` into `out`: every class (class_obj NULL, out n x C x slots) or each row's
 * class in `class_obj` (int64 (n,), out n x slots). */
static PyObject *model_run(Model *self, PyObject *matrix_obj, PyObject *class_obj, PyObject *out_obj) {
    Buffer matrix = {0}, classes = {0}, out = {0};
    PyObject *result = NULL;
    uint32_t *failed = NULL;
    double *phi = NULL, *acc = NULL;
    float *xs = NULL;
    int32_t *sigs = NULL;
    Forest f = self->f; /* a copy: tables built later by another thread do not change this call */
    int one = class_obj != NULL;
    if (get_buffer(matrix_obj, &matrix, "matrix", "f", 2, 0) ||
        (one && get_buffer(class_obj, &classes, "classes", "q", 1, 0)) ||
        get_buffer(out_obj, &out, "out", "d", one ? 2 : 3, 1)) {
        goto done;
    }
    f.matrix = matrix.view.buf;
    f.n_rows = matrix.view.shape[0];
    f.out = out.view.buf;
    if (matrix.view.shape[1] != f.n_columns || out.view.shape[0] != f.n_rows ||
        (one ? (classes.view.shape[0] != f.n_rows || out.view.shape[1] != f.n_slots)
             : (out.view.shape[1] != f.n_classes || out.view.shape[2] != f.n_slots))) {
        PyErr_SetString(PyExc_ValueError, "explain: the rows, classes and output do not fit the model");
        goto done;
    }
    if (one) {
        f.row_class = classes.view.buf;
        for (Py_ssize_t r = 0; r < f.n_rows; r++) {
            if (f.row_class[r] < 0 || f.row_class[r] >= f.n_classes) {
                PyErr_Format(PyExc_ValueError, "explain: row %zd asks for class %lld of %zd", r,
                             (long long)f.row_class[r], f.n_classes);
                goto done;
            }
        }
    }
    if (f.n_rows > 0) {
        failed = malloc((size_t)f.max_slots_per_tree * BLOCK * sizeof(uint32_t));
        phi = malloc((size_t)(f.n_slots * f.n_classes) * BLOCK * sizeof(double));
        acc = calloc((size_t)(f.n_slots * f.n_classes) * BLOCK, sizeof(double));
        xs = malloc((size_t)f.n_columns * BLOCK * sizeof(float));
        sigs = f.sig_offset != NULL ? malloc((size_t)f.n_trees * BLOCK * sizeof(int32_t)) : NULL;
        if (failed == NULL || phi == NULL || acc == NULL || xs == NULL || (f.sig_offset != NULL && sigs == NULL)) {
            PyErr_NoMemory();
            goto done;
        }
        if (f.n_rows <= 4) { /* the API's one row: the hand-off would cost more than the work */
            explain_rows(&f, failed, phi, acc, xs, sigs);
        } else {
            Py_BEGIN_ALLOW_THREADS
            explain_rows(&f, failed, phi, acc, xs, sigs);
            Py_END_ALLOW_THREADS
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free(failed);
    free(phi);
    free(acc);
    free(xs);
    free(sigs);
    release(&matrix);
    release(&classes);
    release(&out);
    return result;
}

/* --- signature tables ------------------------------------------------------------------------------
 * A tree's contributions to a row depend only on which side of each of its thresholds the row's values
 * fall: on the row's bucket among the tree's distinct thresholds of each column it tests. A tree testing
 * columns j1..jm with n1..nm distinct thresholds has (n1 + 1) x ... x (nm + 1) such signatures; for each,
 * build_tables computes the tree's sums (every class, the tree's slots) once, with the same code and in
 * the same order as a tree without a table is summed (tree_leaves from zeros, then flush_tree), so a row
 * then costs one read per tree instead of a pass over its leaves. Trees with too many signatures, or
 * beyond the memory budget, keep the pass over their leaves. Once built, every call uses them (the
 * per-tree sums, whatever the number of rows), so a row's answer does not depend on its batch. */

static int compare_floats(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Sort v[0..n) and drop repeats; returns the count left. */
static Py_ssize_t sorted_unique(float *v, Py_ssize_t n) {
    if (n <= 1) {
        return n;
    }
    qsort(v, (size_t)n, sizeof *v, compare_floats);
    Py_ssize_t kept = 1;
    for (Py_ssize_t i = 1; i < n; i++) {
        if (v[i] != v[kept - 1]) {
            v[kept++] = v[i];
        }
    }
    return kept;
}

/* A representative value of local bucket `b` of a column whose tree thresholds are t[0..count): exceeds
 * exactly the first b of them. */
static inline float bucket_value(const float *t, int32_t count, int64_t b) {
    return b < count ? t[b] : nextafterf(t[count - 1], INFINITY);
}

typedef struct {
    const float *local;        /* the tree's distinct thresholds, column after column */
    const int32_t *local_start; /* (columns + 1) */
    const int64_t *stride;      /* (columns,): 0 for columns the tree does not test */
    int64_t n_sigs;
    int32_t n_used;
    const int32_t *slots;
    double *values; /* (classes, n_sigs, n_used) */
} TreeTable;

ALWAYS_INLINE static inline void fill_block(const Forest *f, Py_ssize_t t, const TreeTable *tt, int64_t first,
                                            uint32_t *failed, double *acc, float *xs, const int width) {
    for (Py_ssize_t j = 0; j < f->n_columns; j++) {
        int32_t lo = tt->local_start[j], count = tt->local_start[j + 1] - lo;
        for (int r = 0; r < width; r++) {
            xs[j * width + r] =
                count > 0 ? bucket_value(tt->local + lo, count, ((first + r) / tt->stride[j]) % (count + 1)) : 0.0f;
        }
    }
    tree_leaves(f, t, xs, failed, acc, NULL, 0, width);
    for (int32_t k = 0; k < tt->n_used; k++) {
        for (Py_ssize_t c = 0; c < f->n_classes; c++) {
            double *a = acc + ((int64_t)tt->slots[k] * f->n_classes + c) * width;
            for (int r = 0; r < width; r++) {
                tt->values[((int64_t)c * tt->n_sigs + first + r) * tt->n_used + k] = a[r];
                a[r] = 0.0;
            }
        }
    }
}

VECTOR_CLONES static void fill_table(const Forest *f, Py_ssize_t t, const TreeTable *tt, uint32_t *failed,
                                     double *acc, float *xs) {
    int64_t first = 0;
    for (; first + BLOCK <= tt->n_sigs; first += BLOCK) {
        fill_block(f, t, tt, first, failed, acc, xs, BLOCK);
    }
    for (; first < tt->n_sigs; first++) {
        fill_block(f, t, tt, first, failed, acc, xs, 1);
    }
}

/* Build the tables (once; the GIL held, so two callers cannot both build). Returns 0 or -1 (exception). */
static int build(Model *self, Py_ssize_t max_bytes, Py_ssize_t max_signatures) {
    Forest *f = &self->f;
    const Py_ssize_t n_trees = f->n_trees, n_columns = f->n_columns, n_classes = f->n_classes;
    const Py_ssize_t n_inner_all = self->b[1].view.shape[0];
    int status = -1;
    int32_t *bucket_start = calloc((size_t)n_columns + 1, sizeof(int32_t));
    float *bounds = malloc((size_t)(n_inner_all > 0 ? n_inner_all : 1) * sizeof(float));
    int64_t *sig_offset = malloc((size_t)n_trees * sizeof(int64_t));
    int32_t *sig_count = calloc((size_t)n_trees, sizeof(int32_t));
    int32_t most_inner = 1;
    for (Py_ssize_t t = 0; t < n_trees; t++) {
        most_inner = f->trees[4 * t + 1] > most_inner ? f->trees[4 * t + 1] : most_inner;
    }
    float *local = malloc((size_t)most_inner * sizeof(float));
    int32_t *local_start = malloc(((size_t)n_columns + 1) * sizeof(int32_t));
    int64_t *stride = malloc((size_t)n_columns * sizeof(int64_t));
    uint32_t *failed = malloc((size_t)f->max_slots_per_tree * BLOCK * sizeof(uint32_t));
    double *acc = calloc((size_t)(f->n_slots * n_classes) * BLOCK, sizeof(double));
    float *xs = malloc((size_t)n_columns * BLOCK * sizeof(float));
    int32_t *lut = NULL;
    double *values = NULL;
    if (!bucket_start || !bounds || !sig_offset || !sig_count || !local || !local_start || !stride || !failed ||
        !acc || !xs) {
        PyErr_NoMemory();
        goto done;
    }
    /* Every column's distinct thresholds over the whole forest: a row's bucket in each is found once. */
    Py_ssize_t n_bounds = 0;
    for (Py_ssize_t j = 0; j < n_columns; j++) {
        bucket_start[j] = (int32_t)n_bounds;
        Py_ssize_t first = n_bounds;
        for (Py_ssize_t g = 0; g < n_inner_all; g++) {
            if (f->inner_feature[g] == j) {
                bounds[n_bounds++] = f->inner_threshold[g];
            }
        }
        n_bounds = first + sorted_unique(bounds + first, n_bounds - first);
    }
    bucket_start[n_columns] = (int32_t)n_bounds;
    /* Which trees get a table, in tree order until the budget is spent. */
    int64_t total = 0;
    for (Py_ssize_t t = 0; t < n_trees; t++) {
        const int32_t *tree = f->trees + 4 * t;
        int64_t sigs = 1;
        for (Py_ssize_t j = 0; j < n_columns && sigs <= max_signatures; j++) {
            Py_ssize_t n = 0;
            for (int32_t i = 0; i < tree[1]; i++) {
                if (f->inner_feature[tree[0] + i] == j) {
                    local[n++] = f->inner_threshold[tree[0] + i];
                }
            }
            sigs *= sorted_unique(local, n) + 1;
        }
        int64_t n_used = f->tree_slot_start[t + 1] - f->tree_slot_start[t];
        int64_t size = sigs * n_classes * n_used;
        sig_offset[t] = -1;
        if (sigs <= max_signatures && (total + size) * (int64_t)sizeof(double) <= (int64_t)max_bytes) {
            sig_offset[t] = total;
            sig_count[t] = (int32_t)sigs;
            total += size;
        }
    }
    lut = calloc((size_t)(n_bounds + n_columns) * (size_t)n_trees, sizeof(int32_t));
    values = malloc((size_t)(total > 0 ? total : 1) * sizeof(double));
    if (lut == NULL || values == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t tabled = 0;
    for (Py_ssize_t t = 0; t < n_trees; t++) {
        if (sig_offset[t] < 0) {
            continue;
        }
        tabled++;
        const int32_t *tree = f->trees + 4 * t;
        int32_t n_local = 0;
        int64_t step = 1;
        for (Py_ssize_t j = 0; j < n_columns; j++) {
            local_start[j] = n_local;
            for (int32_t i = 0; i < tree[1]; i++) {
                if (f->inner_feature[tree[0] + i] == j) {
                    local[n_local++] = f->inner_threshold[tree[0] + i];
                }
            }
            int32_t count = (int32_t)sorted_unique(local + local_start[j], n_local - local_start[j]);
            n_local = local_start[j] + count;
            stride[j] = count > 0 ? step : 1;
            if (count == 0) {
                continue;
            }
            /* A row in global bucket b (above the column's b smallest thresholds) is above those of the
             * tree's thresholds that are among them. */
            const float *global = bounds + bucket_start[j];
            int32_t n_global = bucket_start[j + 1] - bucket_start[j], below = 0;
            for (int32_t b = 0; b <= n_global; b++) {
                while (b > 0 && below < count && local[local_start[j] + below] <= global[b - 1]) {
                    below++;
                }
                lut[((int64_t)bucket_start[j] + j + b) * n_trees + t] = (int32_t)(step * below);
            }
            step *= count + 1;
        }
        local_start[n_columns] = n_local;
        TreeTable tt = {
            .local = local,
            .local_start = local_start,
            .stride = stride,
            .n_sigs = sig_count[t],
            .n_used = f->tree_slot_start[t + 1] - f->tree_slot_start[t],
            .slots = f->tree_slots + f->tree_slot_start[t],
            .values = values + sig_offset[t],
        };
        fill_table(f, t, &tt, failed, acc, xs);
    }
    self->bucket_start = bucket_start;
    self->bucket_bounds = bounds;
    self->bucket_lut = lut;
    self->sig_count = sig_count;
    self->sig_values = values;
    self->sig_offset = sig_offset;
    self->table_bytes = (Py_ssize_t)(total * (int64_t)sizeof(double) + (n_bounds + n_columns) * n_trees * 4);
    self->table_trees = tabled;
    f->bucket_start = bucket_start;
    f->bucket_bounds = bounds;
    f->bucket_lut = lut;
    f->sig_count = sig_count;
    f->sig_values = values;
    f->sig_offset = sig_offset; /* last: the tables are in use from now on */
    bucket_start = NULL, bounds = NULL, lut = NULL, sig_count = NULL, values = NULL, sig_offset = NULL;
    status = 0;
done:
    free(bucket_start);
    free(bounds);
    free(sig_offset);
    free(sig_count);
    free(local);
    free(local_start);
    free(stride);
    free(failed);
    free(acc);
    free(xs);
    free(lut);
    free(values);
    return status;
}

static PyObject *Model_build_tables(Model *self, PyObject *args) {
    Py_ssize_t max_bytes, max_signatures;
    if (!PyArg_ParseTuple(args, "nn:build_tables", &max_bytes, &max_signatures)) {
        return NULL;
    }
    if (max_signatures < 1 || max_signatures > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "build_tables: max_signatures must lie in 1 .. 2**30");
        return NULL;
    }
    if (self->f.sig_offset == NULL && build(self, max_bytes, max_signatures) != 0) {
        return NULL;
    }
    return Py_BuildValue("(nn)", self->table_bytes, self->table_trees);
}

static PyObject *Model_explain(Model *self, PyObject *args) {
    PyObject *matrix, *out;
    if (!PyArg_ParseTuple(args, "OO:explain", &matrix, &out)) {
        return NULL;
    }
    return model_run(self, matrix, NULL, out);
}

static PyObject *Model_explain_class(Model *self, PyObject *args) {
    PyObject *matrix, *classes, *out;
    if (!PyArg_ParseTuple(args, "OOO:explain_class", &matrix, &classes, &out)) {
        return NULL;
    }
    return model_run(self, matrix, classes, out);
}

static PyMethodDef model_methods[] = {
    {"explain", (PyCFunction)Model_explain, METH_VARARGS,
     "explain(matrix, out): every class's contributions of every row, out (rows, classes, slots)."},
    {"explain_class", (PyCFunction)Model_explain_class, METH_VARARGS,
     "explain_class(matrix, classes, out): each row's contributions to its class classes[row] (int64), "
     "out (rows, slots); the same numbers as explain gives that class."},
    {"build_tables", (PyCFunction)Model_build_tables, METH_VARARGS,
     "build_tables(max_bytes, max_signatures): precompute each tree's sums per signature (once; later calls "
     "return at once); explaining then gives the same bits, faster. Returns (bytes, trees with a table)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "custseg.scoring._treeshap.Model",
    .tp_basicsize = sizeof(Model),
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(trees, inner_feature, inner_threshold, inner_children, leaf_path, leaf_table, leaf_value, "
              "path_column, path_zero, tables, column_slot, n_slots): the explainer's arrays, checked once.",
    .tp_methods = model_methods,
    .tp_new = Model_new,
};

/* The one-call form: check the model, explain, let it go. */
static PyObject *explain(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *o[13];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOO:explain", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9], &o[10], &o[11], &o[12])) {
        return NULL;
    }
    Buffer out = {0};
    if (get_buffer(o[12], &out, "out", "d", 3, 1)) {
        release(&out);
        return NULL;
    }
    Py_ssize_t n_slots = out.view.shape[2];
    release(&out);
    /* Model's arrays are the arguments after the matrix, the column slots included. */
    PyObject *slots = PyLong_FromSsize_t(n_slots);
    if (slots == NULL) {
        return NULL;
    }
    PyObject *model_args =
        PyTuple_Pack(12, o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11], slots);
    Py_DECREF(slots);
    if (model_args == NULL) {
        return NULL;
    }
    PyObject *model = Model_new(&ModelType, model_args, NULL);
    Py_DECREF(model_args);
    if (model == NULL) {
        return NULL;
    }
    PyObject *result = model_run((Model *)model, o[0], NULL, o[12]);
    Py_DECREF(model);
    return result;
}

static PyMethodDef methods[] = {
    {"explain", explain, METH_VARARGS,
     "explain(matrix, trees, inner_feature, inner_threshold, inner_children, leaf_path, leaf_table, "
     "leaf_value, path_column, path_zero, tables, column_slot, out): exact path-dependent Tree SHAP "
     "(checks the model on every call; Model checks it once)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_treeshap", "custseg's exact Tree SHAP kernel.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__treeshap(void) {
    init_weights();
    if (PyType_Ready(&ModelType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
