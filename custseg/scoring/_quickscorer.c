/*
 * custseg._quickscorer: a compiled forest evaluated without walking it node by node (see
 * custseg/scoring/quickscorer.py for how the arrays are built from a CompiledForest, and why).
 *
 * sums(matrix, bounds, bound_offsets, tables, tree_words, leaf_offsets, values, out)
 *
 * - matrix:        float32 or float64 (rows x columns), C order: the encoded inputs;
 * - bounds:        the same type, every feature's distinct thresholds in ascending order, feature after
 *                  feature; feature f owns bounds[bound_offsets[f] .. bound_offsets[f + 1]);
 * - bound_offsets: int32 (columns + 1);
 * - tables:        uint16 (bound_offsets[columns] + columns) x words. Feature f's value x falls in bucket
 *                  b = #{its thresholds t with x > t}, and row (bound_offsets[f] + f + b) holds, for every
 *                  tree, the bitmask of the leaves that x alone does not rule out (QuickScorer's masks of
 *                  the nodes whose test x fails, ANDed in advance). Leaf i of a tree is bit i % 16 of
 *                  its word i / 16; bits past a tree's last leaf are zero;
 * - tree_words:    int32 (trees + 1): tree t owns words [tree_words[t], tree_words[t + 1]);
 * - leaf_offsets:  int32 (trees + 1): tree t's leaves, left to right, are rows leaf_offsets[t].. of values;
 * - values:        float64 (leaves x 4 or 8): the classes' values, padded with zeros;
 * - out:           float64 (rows x classes), written with the SUM of every tree's exit-leaf values, added
 *                  tree after tree from 0.0 (the order scikit-learn adds them in). The caller turns sums
 *                  into a mean (forests) or whatever the model does.
 *
 * A row's exit leaf in a tree is the lowest bit left after ANDing the masks of all its features: the
 * leftmost leaf no failed test removes. Per row that is one binary search per feature and one AND of
 * a table row per feature (vectorised across all trees), then per tree a count of trailing zeros and the
 * leaf's values: no data-dependent chain of node loads.
 * The sums go four rows at a time, each row's running sums in registers: per tree and row one load of
 * the tree's words (trees of up to 64 leaves without a branch), a count of trailing zeros and one vector add.
 *
 * Shapes and offsets are checked before scoring (O(columns + trees)); the tables are built by
 * quickscorer.py from a checked forest, and an exit leaf is always one of its tree's leaves (`exit_leaf`),
 * so even a wrong table cannot read outside the arrays. The scoring runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_COLUMNS 64
#define MAX_CLASSES 8
#define MASK_BYTES 16384 /* a block's masks: about a third of L1 */
#define MAX_BLOCK 64
#define SMALL_CALL_ROWS 4 /* up to this many rows a call keeps the GIL (the API scores one row at a time) */

typedef struct {
    Py_buffer view;
    int held;
} Buffer;

static int get_buffer(PyObject *obj, Buffer *buf, const char *name, const char *formats, int ndim, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &buf->view, flags) != 0) {
        return -1;
    }
    buf->held = 1;
    const char *format = buf->view.format;
    if (format[0] == '=' || format[0] == '<' || format[0] == '@') {
        format++;
    }
    if (buf->view.ndim != ndim || strlen(format) != 1 || strchr(formats, format[0]) == NULL) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous %d-d array of format '%s' (got %d-d '%s')", name,
                     ndim, formats, buf->view.ndim, buf->view.format);
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
    Py_ssize_t n, n_columns, n_words, n_trees, n_classes, width;
    const int32_t *bound_offsets;
    const uint16_t *tables;
    const int32_t *tree_words;
    const int32_t *leaf_offsets;
    const double *values;
    double *out;
} Forest;

typedef double double4 __attribute__((vector_size(32), aligned(8)));

/* The exit leaf of a row in a tree of words [first, last) with `leaves` leaves: the lowest bit left among
 * its leaves but the last, else the last. A well-built table never clears the last leaf's bit (that leaf is
 * in no node's left subtree), so this is the lowest bit left; in a wrong table it still names a leaf of
 * the tree. A tree of up to 64 leaves (four words) is one 64-bit load ORed with its last leaf's bit: no
 * branch on the row's bits and no clamp on the way from the load to the leaf's values (the clamp this
 * replaced cost ~25% of the evaluator's time). The masks are allocated with 3 spare words at the end for
 * that load, so it stays inside them from any word of any row. */
static inline __attribute__((always_inline)) int32_t exit_leaf(const uint16_t *m, int32_t first, int32_t last,
                                                               int32_t leaves) {
    if (leaves <= 64) {
        uint64_t bits;
        memcpy(&bits, m + first, sizeof bits);
        return __builtin_ctzll(bits | ((uint64_t)1 << (leaves - 1)));
    }
    int32_t w = first;
    while (w + 1 < last && m[w] == 0) {
        w++;
    }
    const int32_t leaf = (w - first) * 16 + __builtin_ctz((uint32_t)m[w] | 0x10000u);
    return leaf < leaves ? leaf : leaves - 1;
}

#define LANES 4 /* rows summed together: independent chains of additions, kept in registers */

/* The exit leaves of `lanes` consecutive rows (masks from `m`, sums to `sums`) in every tree, their values
 * summed in tree order. `values` rows are `width` wide (classes padded with zeros) and added as vectors of
 * four: lane by lane the same IEEE additions, from 0.0 and tree after tree, as one class at a time. Each
 * row has its own accumulators, so that the additions of one row wait on one another but not those of the
 * others. Always inlined with constant `lanes` and `width`. */
static inline __attribute__((always_inline)) void sum_rows(const Forest *f, const uint16_t *m, double *sums,
                                                           const int lanes, const int width) {
    const Py_ssize_t nw = f->n_words;
    const int vectors = width / 4;
    double4 acc[LANES][2] = {{{0}}};
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        const int32_t first = f->tree_words[t], last = f->tree_words[t + 1];
        const int32_t leaves = f->leaf_offsets[t + 1] - f->leaf_offsets[t];
        const double *base = f->values + (int64_t)f->leaf_offsets[t] * width;
#pragma GCC unroll 4
        for (int k = 0; k < lanes; k++) {
            const int32_t leaf = exit_leaf(m + k * nw, first, last, leaves);
            const double4 *v = (const double4 *)(base + (int64_t)leaf * width);
#pragma GCC unroll 2
            for (int c = 0; c < vectors; c++) {
                acc[k][c] += v[c];
            }
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < lanes; k++) {
        double4 *s = (double4 *)(sums + k * MAX_CLASSES);
#pragma GCC unroll 2
        for (int c = 0; c < vectors; c++) {
            s[c] = acc[k][c];
        }
    }
}

/* Every row of the block: LANES rows at a time, then the last few one by one. */
static inline __attribute__((always_inline)) void sum_leaves(const Forest *f, const uint16_t *masks,
                                                             Py_ssize_t rows, double *sums, const int width) {
    Py_ssize_t r = 0;
    for (; r + LANES <= rows; r += LANES) {
        sum_rows(f, masks + r * f->n_words, sums + r * MAX_CLASSES, LANES, width);
    }
    for (; r < rows; r++) {
        sum_rows(f, masks + r * f->n_words, sums + r * MAX_CLASSES, 1, width);
    }
}

/* Each row's table row for each feature: the row of the feature's bucket, b = how many of its thresholds
 * x exceeds (NaN exceeds none, as in the node walk); -1 for a feature no tree tests, whose one row only
 * clears padding bits (the first feature's row is always used: it starts the mask). A pass of its own
 * before the ANDs: the rows' binary searches are independent of one another and overlap. */
#define DEFINE_TABLE_ROWS(NAME, REAL)                                                                        \
    static inline __attribute__((always_inline)) void NAME(const Forest *f, const REAL *matrix,            \
                                                           const REAL *bounds, Py_ssize_t rows,             \
                                                           int32_t *table_rows) {                           \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                             \
            const REAL *x = matrix + r * f->n_columns;                                                      \
            int32_t *out = table_rows + r * f->n_columns;                                                   \
            for (Py_ssize_t j = 0; j < f->n_columns; j++) {                                                 \
                const int32_t lo = f->bound_offsets[j], count = f->bound_offsets[j + 1] - lo;               \
                if (count == 0 && j > 0) {                                                                  \
                    out[j] = -1;                                                                            \
                    continue;                                                                               \
                }                                                                                           \
                const REAL *t = bounds + lo;                                                                \
                const REAL value = x[j];                                                                    \
                int32_t bucket = 0, len = count;                                                            \
                while (len > 1) { /* branch-free lower bound: the compiler emits a conditional move */      \
                    int32_t half = len / 2;                                                                 \
                    bucket = t[bucket + half - 1] < value ? bucket + half : bucket;                         \
                    len -= half;                                                                            \
                }                                                                                           \
                bucket += len == 1 && t[bucket] < value;                                                    \
                out[j] = lo + (int32_t)j + bucket;                                                          \
            }                                                                                               \
        }                                                                                                   \
    }

DEFINE_TABLE_ROWS(table_rows32, float)
DEFINE_TABLE_ROWS(table_rows64, double)

/* Each row's mask of possible leaves: the AND of its features' table rows, vectorised across all trees. */
static inline __attribute__((always_inline)) void and_masks(const Forest *f, const int32_t *table_rows,
                                                            Py_ssize_t rows, uint16_t *masks) {
    const Py_ssize_t nw = f->n_words;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const int32_t *own = table_rows + r * f->n_columns;
        uint16_t *restrict m = masks + r * nw;
        memcpy(m, f->tables + (int64_t)own[0] * nw, (size_t)nw * sizeof *m);
        for (Py_ssize_t j = 1; j < f->n_columns; j++) {
            if (own[j] < 0) {
                continue;
            }
            const uint16_t *restrict row = f->tables + (int64_t)own[j] * nw;
            for (Py_ssize_t w = 0; w < nw; w++) {
                m[w] &= row[w];
            }
        }
    }
}

/* Compiled twice (AVX2 and plain x86-64 SSE2), the processor's best picked at load time: the same IEEE
 * operations either way, only wider. */
__attribute__((target_clones("avx2", "default"))) static void score(const Forest *f, const void *matrix, const void *bounds, int doubles, uint16_t *masks,
                  Py_ssize_t block) {
    double sums[MAX_BLOCK * MAX_CLASSES];
    int32_t table_rows[MAX_BLOCK * MAX_COLUMNS];
    for (Py_ssize_t start = 0; start < f->n; start += block) {
        Py_ssize_t rows = f->n - start < block ? f->n - start : block;
        if (doubles) {
            table_rows64(f, (const double *)matrix + start * f->n_columns, bounds, rows, table_rows);
        } else {
            table_rows32(f, (const float *)matrix + start * f->n_columns, bounds, rows, table_rows);
        }
        and_masks(f, table_rows, rows, masks);
        if (f->width == 4) {
            sum_leaves(f, masks, rows, sums, 4);
        } else {
            sum_leaves(f, masks, rows, sums, 8);
        }
        for (Py_ssize_t r = 0; r < rows; r++) {
            memcpy(f->out + (start + r) * f->n_classes, sums + r * MAX_CLASSES, (size_t)f->n_classes * sizeof(double));
        }
    }
}

/* NULL when the arrays fit together, else the reason. */
static const char *check(const Forest *f, Py_ssize_t n_bounds, Py_ssize_t n_table_rows, Py_ssize_t n_leaves) {
    const int32_t *bo = f->bound_offsets;
    if (bo[0] != 0 || bo[f->n_columns] != n_bounds) {
        return "bound offsets do not span the thresholds";
    }
    for (Py_ssize_t j = 0; j < f->n_columns; j++) {
        if (bo[j + 1] < bo[j]) {
            return "bound offsets decrease";
        }
    }
    if (n_table_rows != n_bounds + f->n_columns) {
        return "the tables do not have one row per bucket";
    }
    if (f->tree_words[0] != 0 || f->tree_words[f->n_trees] != f->n_words || f->leaf_offsets[0] != 0 ||
        f->leaf_offsets[f->n_trees] != n_leaves) {
        return "tree offsets do not span the words or the leaves";
    }
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        int64_t words = (int64_t)f->tree_words[t + 1] - f->tree_words[t];
        int64_t leaves = (int64_t)f->leaf_offsets[t + 1] - f->leaf_offsets[t];
        if (words < 1 || leaves < 1 || leaves > 16 * words) {
            return "a tree's words do not fit its leaves";
        }
    }
    return NULL;
}

static PyObject *sums(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *o[8];
    Buffer matrix = {0}, bounds = {0}, bound_offsets = {0}, tables = {0}, tree_words = {0}, leaf_offsets = {0},
           values = {0}, out = {0};
    PyObject *result = NULL;
    uint16_t *masks = NULL;
    const char *problem;
    if (!PyArg_ParseTuple(args, "OOOOOOOO:sums", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7])) {
        return NULL;
    }
    if (get_buffer(o[0], &matrix, "matrix", "fd", 2, 0) || get_buffer(o[1], &bounds, "bounds", "fd", 1, 0) ||
        get_buffer(o[2], &bound_offsets, "bound_offsets", "i", 1, 0) ||
        get_buffer(o[3], &tables, "tables", "H", 2, 0) || get_buffer(o[4], &tree_words, "tree_words", "i", 1, 0) ||
        get_buffer(o[5], &leaf_offsets, "leaf_offsets", "i", 1, 0) ||
        get_buffer(o[6], &values, "values", "d", 2, 0) || get_buffer(o[7], &out, "out", "d", 2, 1)) {
        goto done;
    }
    Forest f = {
        .n = matrix.view.shape[0],
        .n_columns = matrix.view.shape[1],
        .n_words = tables.view.shape[1],
        .n_trees = tree_words.view.shape[0] - 1,
        .n_classes = out.view.shape[1],
        .width = values.view.shape[1],
        .bound_offsets = bound_offsets.view.buf,
        .tables = tables.view.buf,
        .tree_words = tree_words.view.buf,
        .leaf_offsets = leaf_offsets.view.buf,
        .values = values.view.buf,
        .out = out.view.buf,
    };
    if (matrix.view.itemsize != bounds.view.itemsize || f.n_columns < 1 || f.n_columns > MAX_COLUMNS ||
        bound_offsets.view.shape[0] != f.n_columns + 1 || f.n_trees < 1 || f.n_words < 1 ||
        leaf_offsets.view.shape[0] != f.n_trees + 1 || f.n_classes < 1 || f.n_classes > f.width ||
        (f.width != 4 && f.width != 8) || out.view.shape[0] != f.n) {
        PyErr_SetString(PyExc_ValueError, "sums: array shapes or types do not fit together");
        goto done;
    }
    problem = check(&f, bounds.view.shape[0], tables.view.shape[0], values.view.shape[0]);
    if (problem != NULL) {
        PyErr_Format(PyExc_ValueError, "malformed quickscorer tables: %s", problem);
        goto done;
    }
    Py_ssize_t block = MASK_BYTES / (2 * f.n_words);
    block = block < 1 ? 1 : (block > MAX_BLOCK ? MAX_BLOCK : block);
    if (block > f.n) {
        block = f.n < 1 ? 1 : f.n;
    }
    /* + 3 words for exit_leaf's 64-bit loads past a row's last tree, zeroed: never read uninitialised */
    masks = PyMem_RawCalloc((size_t)block * (size_t)f.n_words + 3, sizeof *masks);
    if (masks == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (f.n <= SMALL_CALL_ROWS) { /* the API's rows: releasing the GIL would let another thread in mid-request */
        score(&f, matrix.view.buf, bounds.view.buf, matrix.view.itemsize == 8, masks, block);
    } else {
        Py_BEGIN_ALLOW_THREADS
        score(&f, matrix.view.buf, bounds.view.buf, matrix.view.itemsize == 8, masks, block);
        Py_END_ALLOW_THREADS
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(masks);
    release(&matrix);
    release(&bounds);
    release(&bound_offsets);
    release(&tables);
    release(&tree_words);
    release(&leaf_offsets);
    release(&values);
    release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"sums", sums, METH_VARARGS,
     "sums(matrix, bounds, bound_offsets, tables, tree_words, leaf_offsets, values, out): every row's exit-leaf "
     "values summed over the trees, in tree order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_quickscorer", "custseg's bitmask forest evaluator.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__quickscorer(void) { return PyModule_Create(&module); }
