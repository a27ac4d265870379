/*
 * Round-robin (dispatcher/policies/round_robin.py), compiled: the same
 * counting, and ``deal``, which chooses for a whole accepted batch in one call.
 *
 * Why in C: the policy runs once per connection the master accepts, and
 * profiles of the master under the lightest handler show its Python (a
 * deque, three dicts, two loops over the free workers) as a large part of
 * what the master spends per connection beyond its system calls. The
 * pure-Python class in round_robin.py is the reference: it is what runs
 * without this module or with DISPATCHER_PURE_PYTHON=1, and the tests drive
 * both with the same random sequences of calls and require the same answers
 * (tests/test_policies.py).
 *
 * No fds and no Python objects are held: a worker is its key (a C long long)
 * and four counts. Worker records live in one array and never move while
 * attached, so the line of free workers holds their indices.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* round_robin._SLACK; round_robin.py checks they agree. */
#define SLACK 1

typedef struct {
    long long key;
    long long credit;   /* free window slots */
    long long load;     /* what it last reported holding */
    long long estimate; /* load + un-acked hand-offs */
    int attached;
} Worker;

typedef struct {
    PyObject_HEAD
    long long window;
    Worker *workers;    /* records, attached or free for reuse */
    Py_ssize_t size;    /* records in use or used before */
    Py_ssize_t capacity;
    Py_ssize_t *line;   /* indices of workers with a free slot, first in line first; each once */
    Py_ssize_t line_len;
    Py_ssize_t attached;
} RoundRobin;

static Py_ssize_t
find(RoundRobin *self, long long key)
{
    for (Py_ssize_t i = 0; i < self->size; i++) {
        if (self->workers[i].attached && self->workers[i].key == key)
            return i;
    }
    return -1;
}

static void
line_remove_at(RoundRobin *self, Py_ssize_t pos)
{
    memmove(self->line + pos, self->line + pos + 1, sizeof(Py_ssize_t) * (size_t)(self->line_len - pos - 1));
    self->line_len--;
}

static void
line_remove(RoundRobin *self, Py_ssize_t index)
{
    for (Py_ssize_t pos = 0; pos < self->line_len; pos++) {
        if (self->line[pos] == index) {
            line_remove_at(self, pos);
            return;
        }
    }
}

/* The line never holds more entries than there are records, so it has room. */
static void
line_append(RoundRobin *self, Py_ssize_t index)
{
    self->line[self->line_len++] = index;
}

/* choose() on indices: the worker's index, or -1 if none is free. */
static Py_ssize_t
choose_index(RoundRobin *self)
{
    Py_ssize_t len = self->line_len;
    if (len == 0)
        return -1;
    Worker *workers = self->workers;
    Py_ssize_t *line = self->line;
    Py_ssize_t pos = 0;
    if (len > 1) {
        /* The first in line that holds at most SLACK more than the least loaded. */
        long long least = workers[line[0]].estimate;
        for (Py_ssize_t i = 1; i < len; i++) {
            if (workers[line[i]].estimate < least)
                least = workers[line[i]].estimate;
        }
        long long limit = least + SLACK;
        while (workers[line[pos]].estimate > limit)
            pos++;
    }
    Py_ssize_t index = line[pos];
    line_remove_at(self, pos);
    Worker *worker = &workers[index];
    worker->estimate++;
    worker->credit--;
    if (worker->credit)
        line_append(self, index);
    return index;
}

static int
key_of(PyObject *value, long long *key)
{
    *key = PyLong_AsLongLong(value);
    return (*key == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
RoundRobin_init(RoundRobin *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"window", NULL};
    long long window = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|L:RoundRobin", keywords, &window))
        return -1;
    if (window < 1) {
        PyErr_Format(PyExc_ValueError, "window must be at least 1, not %lld", window);
        return -1;
    }
    if (self->workers != NULL)  /* __init__ called again: start over */
        self->size = self->line_len = self->attached = 0;
    self->window = window;
    return 0;
}

static void
RoundRobin_dealloc(RoundRobin *self)
{
    PyMem_Free(self->workers);
    PyMem_Free(self->line);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
RoundRobin_attach(RoundRobin *self, PyObject *arg)
{
    long long key;
    if (key_of(arg, &key) < 0)
        return NULL;
    if (find(self, key) >= 0) {
        PyErr_Format(PyExc_ValueError, "worker %lld is already attached", key);
        return NULL;
    }
    Py_ssize_t index = -1;
    for (Py_ssize_t i = 0; i < self->size; i++) {
        if (!self->workers[i].attached) {
            index = i;
            break;
        }
    }
    if (index < 0) {
        if (self->size == self->capacity) {
            Py_ssize_t capacity = self->capacity ? self->capacity * 2 : 8;
            Worker *workers = PyMem_Realloc(self->workers, sizeof(Worker) * (size_t)capacity);
            if (workers == NULL)
                return PyErr_NoMemory();
            self->workers = workers;
            Py_ssize_t *line = PyMem_Realloc(self->line, sizeof(Py_ssize_t) * (size_t)capacity);
            if (line == NULL)
                return PyErr_NoMemory();
            self->line = line;
            self->capacity = capacity;
        }
        index = self->size++;
    }
    self->workers[index] = (Worker){.key = key, .credit = self->window, .attached = 1};
    self->attached++;
    line_append(self, index);
    Py_RETURN_NONE;
}

static PyObject *
RoundRobin_detach(RoundRobin *self, PyObject *arg)
{
    long long key;
    if (key_of(arg, &key) < 0)
        return NULL;
    Py_ssize_t index = find(self, key);
    if (index >= 0) {
        line_remove(self, index);
        self->workers[index].attached = 0;
        self->attached--;
    }
    Py_RETURN_NONE;
}

static PyObject *
RoundRobin_choose(RoundRobin *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t index = choose_index(self);
    if (index < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(self->workers[index].key);
}

static PyObject *
RoundRobin_deal(RoundRobin *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "deal() takes a sequence of connections");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    size_t records = (size_t)(self->size ? self->size : 1);
    PyObject *groups = PyList_New(0);
    /* Each worker's list in this deal, by record index; and the counts as they
     * were, put back if building the answer fails (out of memory), so that a
     * deal either happens whole or not at all. */
    PyObject **lists = PyMem_Calloc(records, sizeof(PyObject *));
    Worker *saved_workers = PyMem_Malloc(records * sizeof(Worker));
    Py_ssize_t *saved_line = PyMem_Malloc(records * sizeof(Py_ssize_t));
    Py_ssize_t saved_line_len = self->line_len;
    Py_ssize_t dealt = 0;
    PyObject *result = NULL;
    if (groups == NULL || lists == NULL || saved_workers == NULL || saved_line == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (self->size) {  /* nothing attached yet: no arrays either */
        memcpy(saved_workers, self->workers, sizeof(Worker) * (size_t)self->size);
        memcpy(saved_line, self->line, sizeof(Py_ssize_t) * (size_t)self->line_len);
    }
    for (; dealt < count; dealt++) {
        Py_ssize_t index = choose_index(self);
        if (index < 0)
            break;
        PyObject *list = lists[index];
        if (list == NULL) {
            PyObject *key = PyLong_FromLongLong(self->workers[index].key);
            list = PyList_New(0);
            PyObject *group = (key == NULL || list == NULL) ? NULL : PyTuple_Pack(2, key, list);
            Py_XDECREF(key);
            Py_XDECREF(list);
            if (group == NULL || PyList_Append(groups, group) < 0) {
                Py_XDECREF(group);
                goto undo;
            }
            Py_DECREF(group);  /* groups holds it, and it holds the list */
            lists[index] = list;
        }
        if (PyList_Append(list, items[dealt]) < 0)
            goto undo;
    }
    PyObject *number = PyLong_FromSsize_t(dealt);
    if (number == NULL)
        goto undo;
    result = PyTuple_Pack(2, groups, number);
    Py_DECREF(number);
    if (result != NULL)
        goto done;
undo:
    if (self->size) {
        memcpy(self->workers, saved_workers, sizeof(Worker) * (size_t)self->size);
        memcpy(self->line, saved_line, sizeof(Py_ssize_t) * (size_t)saved_line_len);
    }
    self->line_len = saved_line_len;
done:
    PyMem_Free(lists);
    PyMem_Free(saved_workers);
    PyMem_Free(saved_line);
    Py_XDECREF(groups);
    Py_DECREF(seq);
    return result;
}

/* report and ack run for every ack: positional arguments only, parsed by hand. */
static int
positional(const char *name, Py_ssize_t nargs, Py_ssize_t least, Py_ssize_t most)
{
    if (nargs < least || nargs > most) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd positional arguments (%zd given)", name, least,
                     most, nargs);
        return -1;
    }
    return 0;
}

static PyObject *
RoundRobin_report(RoundRobin *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long key, load;
    if (positional("report", nargs, 2, 2) < 0 || key_of(args[0], &key) < 0 || key_of(args[1], &load) < 0)
        return NULL;
    Py_ssize_t index = find(self, key);
    if (index >= 0) {
        Worker *worker = &self->workers[index];
        worker->estimate += load - worker->load;
        worker->load = load;
    }
    Py_RETURN_NONE;
}

static PyObject *
RoundRobin_ack(RoundRobin *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long key, count = 1;
    /* args[1], accepted: either way the slots come back. */
    if (positional("ack", nargs, 2, 3) < 0 || key_of(args[0], &key) < 0
        || (nargs == 3 && key_of(args[2], &count) < 0))
        return NULL;
    Py_ssize_t index = find(self, key);
    if (index < 0)
        Py_RETURN_NONE;  /* detached meanwhile: its slots went with it */
    Worker *worker = &self->workers[index];
    if (count < 1) {
        PyErr_Format(PyExc_ValueError, "worker %lld acked %lld hand-offs", key, count);
        return NULL;
    }
    if (count > self->window - worker->credit) {  /* credit + count > window, without overflow */
        PyErr_Format(PyExc_ValueError, "worker %lld acked more hand-offs than it was given", key);
        return NULL;
    }
    long long before = worker->credit;
    worker->credit += count;
    worker->estimate -= count;
    if (before == 0)
        line_append(self, index);
    Py_RETURN_NONE;
}

static PyObject *
RoundRobin_hold(RoundRobin *self, PyObject *arg)
{
    long long key;
    if (key_of(arg, &key) < 0)
        return NULL;
    Py_ssize_t index = find(self, key);
    long long credit = 0;
    if (index >= 0 && self->workers[index].credit) {
        Worker *worker = &self->workers[index];
        credit = worker->credit;
        worker->credit = 0;
        worker->estimate += credit;  /* held slots count as un-acked until ack */
        line_remove(self, index);
    }
    return PyLong_FromLongLong(credit);
}

static PyObject *
RoundRobin_in_flight(RoundRobin *self, PyObject *arg)
{
    long long key;
    if (key_of(arg, &key) < 0)
        return NULL;
    Py_ssize_t index = find(self, key);
    if (index < 0)
        return PyErr_Format(PyExc_KeyError, "worker %lld is not attached", key);
    return PyLong_FromLongLong(self->window - self->workers[index].credit);
}

static PyObject *
RoundRobin_get_workers(RoundRobin *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->attached);
}

static PyMethodDef RoundRobin_methods[] = {
    {"attach", (PyCFunction)RoundRobin_attach, METH_O, "attach(key): worker key is ready for connections."},
    {"detach", (PyCFunction)RoundRobin_detach, METH_O, "detach(key): worker key takes no more connections."},
    {"choose", (PyCFunction)RoundRobin_choose, METH_NOARGS,
     "choose() -> key or None: the worker for the next connection; its slot is taken until ack."},
    {"deal", (PyCFunction)RoundRobin_deal, METH_O,
     "deal(conns) -> ([(key, [conn, ...]), ...], dealt): choose for each of conns in turn, as choose()\n"
     "would, until none is free; each worker's connections in order, workers in the order first chosen."},
    {"report", (PyCFunction)(void (*)(void))RoundRobin_report, METH_FASTCALL,
     "report(key, load): worker key said it holds load connections."},
    {"ack", (PyCFunction)(void (*)(void))RoundRobin_ack, METH_FASTCALL,
     "ack(key, accepted, count=1): worker key answered count hand-offs, freeing their slots."},
    {"hold", (PyCFunction)RoundRobin_hold, METH_O,
     "hold(key) -> int: take all of worker key's free slots until ack; return how many."},
    {"in_flight", (PyCFunction)RoundRobin_in_flight, METH_O,
     "in_flight(key) -> int: worker key's taken slots (its window less its free ones)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef RoundRobin_members[] = {
    {"window", T_LONGLONG, offsetof(RoundRobin, window), READONLY, "Slots per worker."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef RoundRobin_getset[] = {
    {"workers", (getter)RoundRobin_get_workers, NULL, "How many workers are attached.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RoundRobinType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dispatcher.policies._round_robin.RoundRobin",
    .tp_doc = "Round-robin with a window of slots per worker, compiled (see round_robin.py).",
    .tp_basicsize = sizeof(RoundRobin),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RoundRobin_init,
    .tp_dealloc = (destructor)RoundRobin_dealloc,
    .tp_methods = RoundRobin_methods,
    .tp_members = RoundRobin_members,
    .tp_getset = RoundRobin_getset,
};

static int
exec_module(PyObject *module)
{
    if (PyType_Ready(&RoundRobinType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "RoundRobin", (PyObject *)&RoundRobinType) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "SLACK", SLACK);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dispatcher.policies._round_robin",
    .m_doc = "Round-robin, compiled (see dispatcher/policies/round_robin.py).",
    .m_size = 0,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__round_robin(void)
{
    return PyModuleDef_Init(&module_def);
}
