/*
 * custseg._forest: the compiled-forest kernel (see custseg/scoring/forest.py for the layout and why).
 *
 * walk(matrix, nodes, values, roots, depths, out) scores the rows of `matrix` (float32, C order, one
 * column per encoded feature) through every tree and writes the sum of the leaf values, tree after tree,
 * to `out` (float64, rows x classes). `nodes` is int32 pairs: (left child << 4 | feature, float32
 * threshold bits); a leaf has threshold +inf and points to itself. `values` is float64 (nodes x width),
 * width >= classes. What the sums become (a mean for forests, a softmax for boosting) is
 * `CompiledForest.aggregate`'s job, in Python.
 *
 * walk64(...) is the same walk in double precision: `matrix` float64 and `nodes` int64 pairs
 * (left child << 4 | feature, float64 threshold bits), for models that compare float64 inputs with
 * float64 thresholds (HistGradientBoosting).
 *
 * Every index is checked before the walk, so a malformed forest raises ValueError instead of reading
 * outside its arrays. The walk itself runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define MAX_COLUMNS 16
#define MAX_WIDTH 8
#define SMALL_CALL_ROWS 4 /* up to this many rows a call keeps the GIL (the API scores one row at a time) */

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
    /* int64 is 'l' or 'q' depending on the platform: compare the item size for it */
    int same = strcmp(buf->view.format, format) == 0 ||
               (strcmp(format, "q") == 0 && strcmp(buf->view.format, "l") == 0 && buf->view.itemsize == 8);
    if (buf->view.ndim != ndim || !same) {
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

/* One walk per precision: REAL is the input and threshold type, WORD the node word of the same width. */
#define DEFINE_WALK(NAME, REAL, WORD)                                                                        \
    static void NAME(const REAL *matrix, Py_ssize_t n, Py_ssize_t n_columns, const WORD *nodes,             \
                     const double *values, Py_ssize_t width, const int32_t *roots, const int32_t *depths,   \
                     Py_ssize_t n_trees, double *out, Py_ssize_t n_classes) {                               \
        double sums[BLOCK * MAX_WIDTH];                                                                      \
        WORD node[BLOCK];                                                                                    \
        REAL columns[MAX_COLUMNS * BLOCK]; /* the block transposed: one feature's values adjacent */        \
        for (Py_ssize_t start = 0; start < n; start += BLOCK) {                                              \
            Py_ssize_t rows = n - start < BLOCK ? n - start : BLOCK;                                         \
            for (Py_ssize_t r = 0; r < rows; r++) {                                                          \
                for (Py_ssize_t j = 0; j < n_columns; j++) {                                                 \
                    columns[j * BLOCK + r] = matrix[(start + r) * n_columns + j];                            \
                }                                                                                            \
            }                                                                                                \
            memset(sums, 0, sizeof(sums));                                                                   \
            for (Py_ssize_t tree = 0; tree < n_trees; tree++) {                                              \
                WORD root = roots[tree];                                                                     \
                for (Py_ssize_t r = 0; r < rows; r++) {                                                      \
                    node[r] = root;                                                                          \
                }                                                                                            \
                /* Branch-free: rows at a leaf stay there, so every row takes the tree's depth in steps. */ \
                for (int32_t step = 0; step < depths[tree]; step++) {                                        \
                    for (Py_ssize_t r = 0; r < rows; r++) {                                                  \
                        const WORD *pair = nodes + 2 * (int64_t)node[r];                                     \
                        REAL threshold;                                                                      \
                        memcpy(&threshold, pair + 1, sizeof threshold);                                      \
                        node[r] = (pair[0] >> 4) + (columns[(pair[0] & 15) * BLOCK + r] > threshold);        \
                    }                                                                                        \
                }                                                                                            \
                /* Summed in tree order, as scikit-learn does with one job. */                              \
                for (Py_ssize_t r = 0; r < rows; r++) {                                                      \
                    const double *leaf = values + (int64_t)node[r] * width;                                  \
                    for (Py_ssize_t c = 0; c < width; c++) {                                                 \
                        sums[r * MAX_WIDTH + c] += leaf[c];                                                  \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
            for (Py_ssize_t r = 0; r < rows; r++) {                                                          \
                for (Py_ssize_t c = 0; c < n_classes; c++) {                                                 \
                    out[(start + r) * n_classes + c] = sums[r * MAX_WIDTH + c];                              \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_WALK(walk_rows32, float, int32_t)
DEFINE_WALK(walk_rows64, double, int64_t)

/* NULL when the forest is well formed for `n_columns` inputs, else the reason. */
#define DEFINE_CHECK(NAME, REAL, WORD)                                                                       \
    static const char *NAME(const WORD *nodes, Py_ssize_t n_nodes, Py_ssize_t n_columns,                    \
                            const int32_t *roots, const int32_t *depths, Py_ssize_t n_trees) {              \
        for (Py_ssize_t i = 0; i < n_nodes; i++) {                                                           \
            WORD word = nodes[2 * i];                                                                        \
            REAL threshold;                                                                                  \
            memcpy(&threshold, nodes + 2 * i + 1, sizeof threshold);                                         \
            int64_t left = (int64_t)(word >> 4);                                                             \
            if (isnan(threshold)) {                                                                          \
                return "a node threshold is NaN";                                                            \
            }                                                                                                \
            if ((word & 15) >= n_columns) {                                                                  \
                return "a node reads a column the input does not have";                                      \
            }                                                                                                \
            if (isinf(threshold) && threshold > 0) {                                                         \
                if (left != i) {                                                                             \
                    return "a leaf does not point to itself";                                                \
                }                                                                                            \
            } else if (left < 0 || left + 1 >= n_nodes) {                                                    \
                return "a node's children lie outside the forest";                                           \
            }                                                                                                \
        }                                                                                                    \
        for (Py_ssize_t t = 0; t < n_trees; t++) {                                                           \
            if (roots[t] < 0 || roots[t] >= n_nodes || depths[t] < 0) {                                      \
                return "a tree's root lies outside the forest";                                              \
            }                                                                                                \
        }                                                                                                    \
        return NULL;                                                                                         \
    }

DEFINE_CHECK(check_forest32, float, int32_t)
DEFINE_CHECK(check_forest64, double, int64_t)

static PyObject *walk_any(PyObject *args, int wide) {
    PyObject *objects[6];
    Buffer matrix = {0}, nodes = {0}, values = {0}, roots = {0}, depths = {0}, out = {0};
    PyObject *result = NULL;
    Py_ssize_t n, n_columns, n_nodes, width, n_trees, n_classes;
    const char *problem;
    if (!PyArg_ParseTuple(args, wide ? "OOOOOO:walk64" : "OOOOOO:walk", &objects[0], &objects[1], &objects[2],
                          &objects[3], &objects[4], &objects[5])) {
        return NULL;
    }
    if (get_buffer(objects[0], &matrix, "matrix", wide ? "d" : "f", 2, 0) ||
        get_buffer(objects[1], &nodes, "nodes", wide ? "q" : "i", 1, 0) ||
        get_buffer(objects[2], &values, "values", "d", 2, 0) || get_buffer(objects[3], &roots, "roots", "i", 1, 0) ||
        get_buffer(objects[4], &depths, "depths", "i", 1, 0) || get_buffer(objects[5], &out, "out", "d", 2, 1)) {
        goto done;
    }
    n = matrix.view.shape[0];
    n_columns = matrix.view.shape[1];
    n_nodes = nodes.view.shape[0] / 2;
    width = values.view.shape[1];
    n_trees = roots.view.shape[0];
    n_classes = out.view.shape[1];
    if (n_columns > MAX_COLUMNS || width > MAX_WIDTH || nodes.view.shape[0] % 2 != 0 ||
        values.view.shape[0] != n_nodes || depths.view.shape[0] != n_trees || out.view.shape[0] != n ||
        n_classes > width || n_trees < 1) {
        PyErr_SetString(PyExc_ValueError, "walk: array shapes do not fit together");
        goto done;
    }
    problem = wide ? check_forest64(nodes.view.buf, n_nodes, n_columns, roots.view.buf, depths.view.buf, n_trees)
                   : check_forest32(nodes.view.buf, n_nodes, n_columns, roots.view.buf, depths.view.buf, n_trees);
    if (problem != NULL) {
        PyErr_Format(PyExc_ValueError, "malformed forest: %s", problem);
        goto done;
    }
    /* The API's few rows keep the GIL: releasing it would let another thread (the prediction log's writer)
     * in mid-request, and the request would wait for it to hand the GIL back. */
    PyThreadState *released = n > SMALL_CALL_ROWS ? PyEval_SaveThread() : NULL;
    if (wide) {
        walk_rows64(matrix.view.buf, n, n_columns, nodes.view.buf, values.view.buf, width, roots.view.buf,
                    depths.view.buf, n_trees, out.view.buf, n_classes);
    } else {
        walk_rows32(matrix.view.buf, n, n_columns, nodes.view.buf, values.view.buf, width, roots.view.buf,
                    depths.view.buf, n_trees, out.view.buf, n_classes);
    }
    if (released != NULL) {
        PyEval_RestoreThread(released);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    release(&matrix);
    release(&nodes);
    release(&values);
    release(&roots);
    release(&depths);
    release(&out);
    return result;
}

static PyObject *walk(PyObject *Py_UNUSED(self), PyObject *args) { return walk_any(args, 0); }

static PyObject *walk64(PyObject *Py_UNUSED(self), PyObject *args) { return walk_any(args, 1); }

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS,
     "walk(matrix, nodes, values, roots, depths, out): sums of the leaf values of every row over the trees "
     "(float32 inputs and thresholds)."},
    {"walk64", walk64, METH_VARARGS,
     "walk64(matrix, nodes, values, roots, depths, out): walk with float64 inputs and thresholds."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_forest", "custseg's compiled-forest kernel.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__forest(void) { return PyModule_Create(&module); }
