/*
 * The hand-off's two system-call loops, compiled: accepting a batch of
 * connections as bare fds, and sending one hand-off datagram with its fds.
 *
 * Why in C: profiles of the master under the lightest handler show the
 * interpreter's share of these two steps (a method call, an address tuple
 * built and thrown away for every accepted connection, the datagram and its
 * ancillary list put together object by object) as large as the system calls
 * themselves. shared/hotpath.py is the module the rest of the code imports; it
 * falls back to pure-Python versions that do exactly the same when this one is
 * not built. Both are tested against each other (tests/test_hotpath.py).
 *
 * fd ownership: accept_fds returns new fds, owned by the caller from then on
 * (on an error while building the result, the fd just accepted is closed here
 * and the ones already in the list are closed too, so nothing leaks).
 * send_handoff takes no ownership: the caller keeps its copies whatever
 * happens, as shared.channel.Channel.send_handoff promises.
 *
 * Neither releases the GIL: both work on non-blocking sockets, and a system
 * call that cannot block costs less than handing the GIL over and back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* shared.protocol.MAX_FDS and MessageType.HANDOFF; hotpath.py checks they agree. */
#define MAX_FDS 64
#define HANDOFF_TYPE 3

/* An fd from a Python int: -1 with ValueError set for anything else (not an int,
 * negative, beyond an int), as the pure-Python version raises. */
static int
fd_of(PyObject *value)
{
    long number = PyLong_Check(value) ? PyLong_AsLong(value) : -1;
    if (number == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (number < 0 || number > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "not an fd: %R", value);
        return -1;
    }
    return (int)number;
}

static void
close_all(PyObject *list)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        close((int)PyLong_AsLong(PyList_GET_ITEM(list, i)));
    }
}

/* Both take (socket or fd, one more). Stores the first's fd in *fd and returns 0,
 * or returns -1 with an exception set. A closed socket (fileno() -1) gives -1 as
 * its fd, so the system call fails with EBADF as the pure-Python one does. */
static int
socket_argument(const char *name, PyObject *const *args, Py_ssize_t nargs, int *fd)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    PyObject *number = PyLong_Check(args[0]) ? Py_NewRef(args[0])
                                             : PyObject_CallMethod(args[0], "fileno", NULL);
    if (number == NULL)
        return -1;
    long value = PyLong_AsLong(number);
    Py_DECREF(number);
    if (value == -1 && PyErr_Occurred())
        return -1;
    *fd = (value < 0 || value > INT_MAX) ? -1 : (int)value;
    return 0;
}

PyDoc_STRVAR(accept_fds_doc,
"accept_fds(listener, limit, /) -> (fds, errno)\n\n"
"Accept up to limit connections on the non-blocking listening socket listener\n"
"(a socket object or an fd; accept4, close-on-exec, no address). Returns the\n"
"new fds and the errno that stopped the loop (EAGAIN once the backlog is\n"
"empty), or 0 if limit was reached.");

static PyObject *
accept_fds(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    int listen_fd;
    if (socket_argument("accept_fds", args, nargs, &listen_fd) < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *fds = PyList_New(0);
    if (fds == NULL)
        return NULL;
    int error = 0;
    while (PyList_GET_SIZE(fds) < limit) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            error = errno;
            break;
        }
        PyObject *number = PyLong_FromLong(fd);
        if (number == NULL || PyList_Append(fds, number) < 0) {
            Py_XDECREF(number);
            close(fd);
            close_all(fds);
            Py_DECREF(fds);
            return NULL;
        }
        Py_DECREF(number);
    }
    PyObject *code = PyLong_FromLong(error);
    PyObject *result = code == NULL ? NULL : PyTuple_New(2);
    if (result == NULL) {
        Py_XDECREF(code);
        close_all(fds);
        Py_DECREF(fds);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, fds);
    PyTuple_SET_ITEM(result, 1, code);
    return result;
}

PyDoc_STRVAR(send_handoff_doc,
"send_handoff(sock, fds, /) -> None\n\n"
"Send one hand-off datagram on sock (a socket object or an fd): the hand-off\n"
"type byte, each fd as a network-order uint32 id, and the fds themselves as\n"
"SCM_RIGHTS. The caller keeps its fds. Raises ValueError for no fds, more\n"
"than 64 or one that is not an fd, and OSError (BlockingIOError when the\n"
"socket is full) if the datagram did not go.");

static PyObject *
send_handoff(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    int sock_fd;
    if (socket_argument("send_handoff", args, nargs, &sock_fd) < 0)
        return NULL;
    /* A tuple (the same one if it is one): nothing can change it while it is read. */
    PyObject *seq = PySequence_Tuple(args[1]);
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(seq);
    if (count < 1 || count > MAX_FDS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%zd connection ids: 1 to %d per message", count, MAX_FDS);
        return NULL;
    }
    unsigned char data[1 + 4 * MAX_FDS];
    int fds[MAX_FDS];
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    data[0] = HANDOFF_TYPE;
    for (Py_ssize_t i = 0; i < count; i++) {
        int fd = fd_of(PyTuple_GET_ITEM(seq, i));
        if (fd < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        fds[i] = fd;
        uint32_t id = htonl((uint32_t)fd);
        memcpy(data + 1 + 4 * i, &id, sizeof id);
    }
    Py_DECREF(seq);

    struct iovec iov = {data, (size_t)(1 + 4 * count)};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(&control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * count);
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * count);
    memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * count);
    ssize_t sent;
    do {
        /* MSG_NOSIGNAL: a peer gone is EPIPE, never SIGPIPE (Python ignores it anyway). */
        sent = sendmsg(sock_fd, &msg, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"accept_fds", (PyCFunction)(void (*)(void))accept_fds, METH_FASTCALL, accept_fds_doc},
    {"send_handoff", (PyCFunction)(void (*)(void))send_handoff, METH_FASTCALL, send_handoff_doc},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *module)
{
    if (PyModule_AddIntConstant(module, "MAX_FDS", MAX_FDS) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "HANDOFF_TYPE", HANDOFF_TYPE);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shared._hotpath",
    .m_doc = "The hand-off's system-call loops, compiled (see shared/hotpath.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__hotpath(void)
{
    return PyModuleDef_Init(&module_def);
}
