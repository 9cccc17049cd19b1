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

/* One block of `width` rows (a compile-time constant at each call, so the row loops vectorise).
 * failed: (max slots per tree) x width; phi: slots x classes x width (slots x width with row_class);
 * xs: columns x width. */
ALWAYS_INLINE static inline void explain_block(const Forest *f, Py_ssize_t first, uint32_t *failed, double *phi,
                                               float *xs, const int one, const int width) {
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
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
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
                tabled_leaf(f, first_leaf + j, fails, phi, cls, one, width);
            } else {
                untabled_leaf(f, first_leaf + j, fails, phi, cls, one, width);
            }
        }
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
ALWAYS_INLINE static inline void explain_all(const Forest *f, uint32_t *failed, double *phi, float *xs,
                                             const int one) {
    Py_ssize_t first = 0;
    for (; first + BLOCK <= f->n_rows; first += BLOCK) {
        explain_block(f, first, failed, phi, xs, one, BLOCK);
    }
    for (; first + 4 <= f->n_rows; first += 4) {
        explain_block(f, first, failed, phi, xs, one, 4);
    }
    for (; first < f->n_rows; first++) {
        explain_block(f, first, failed, phi, xs, one, 1);
    }
}

VECTOR_CLONES static void explain_rows(const Forest *f, uint32_t *failed, double *phi, float *xs) {
    if (f->row_class != NULL) {
        explain_all(f, failed, phi, xs, 1);
    } else {
        explain_all(f, failed, phi, xs, 0);
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
    Forest f; /* the model's part: matrix, rows, row_class and out are set per call */
} Model;

static void Model_dealloc(Model *self) {
    for (int i = 0; i < N_MODEL; i++) {
        release(&self->b[i]);
    }
    free(self->path_ratio);
    Py_TYPE(self)->tp_free((PyObject *)self);
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
    return 0;
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
    double *phi = NULL;
    float *xs = NULL;
    Forest f = self->f;
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
        xs = malloc((size_t)f.n_columns * BLOCK * sizeof(float));
        if (failed == NULL || phi == NULL || xs == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        if (f.n_rows <= 4) { /* the API's one row: the hand-off would cost more than the work */
            explain_rows(&f, failed, phi, xs);
        } else {
            Py_BEGIN_ALLOW_THREADS
            explain_rows(&f, failed, phi, xs);
            Py_END_ALLOW_THREADS
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free(failed);
    free(phi);
    free(xs);
    release(&matrix);
    release(&classes);
    release(&out);
    return result;
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
