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

/* shared.protocol's MAX_FDS, MessageType.HANDOFF and ACK, and an ack's head (type, accepted
 * flag, uint32 load); hotpath.py checks they agree. */
#define MAX_FDS 64
#define HANDOFF_TYPE 3
#define ACK_TYPE 4
#define ACK_HEAD 6

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

/* Send one hand-off datagram of fds[0..count) on sock_fd: 0, or -1 with errno set. */
static int
send_datagram(int sock_fd, const int *fds, Py_ssize_t count)
{
    unsigned char data[1 + 4 * MAX_FDS];
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    data[0] = HANDOFF_TYPE;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t id = htonl((uint32_t)fds[i]);
        memcpy(data + 1 + 4 * i, &id, sizeof id);
    }
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
    return sent < 0 ? -1 : 0;
}

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
    int fds[MAX_FDS];
    for (Py_ssize_t i = 0; i < count; i++) {
        int fd = fd_of(PyTuple_GET_ITEM(seq, i));
        if (fd < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        fds[i] = fd;
    }
    Py_DECREF(seq);
    if (send_datagram(sock_fd, fds, count) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(send_dealt_doc,
"send_dealt(groups, accepted_at, targets, chunk, /) -> [(sent, datagrams, errno), ...]\n\n"
"Send each group (key, fds) of a deal to its worker: targets[key] is (channel\n"
"socket, in-flight dict). The fds go in hand-off datagrams of at most chunk, in\n"
"order; each one sent is in the in-flight dict with accepted_at (an fd is there\n"
"if and only if it went). A worker's sending stops at its first datagram that\n"
"does not go; its errno (EAGAIN: the channel is full; ENOMEM: the dict could not\n"
"grow) is returned with how many fds and datagrams went, and the rest of its\n"
"group is the caller's to send again or re-queue. The caller keeps its fds\n"
"whatever happens. Raises ValueError, before anything is sent, for a group of\n"
"no target or an fd that is not one.");

/* One datagram of fd_list[start..start+n) to sock_fd, its fds entered in in_flight first and taken
 * out again if it does not go: so an fd is in in_flight exactly when its datagram went, whatever
 * fails. Returns 0, or the errno. */
static int
send_chunk(int sock_fd, PyObject *fd_list, Py_ssize_t start, Py_ssize_t n, PyObject *in_flight,
           PyObject *accepted_at)
{
    int fds[MAX_FDS];
    Py_ssize_t entered = 0;
    for (; entered < n; entered++) {
        PyObject *item = PyList_GET_ITEM(fd_list, start + entered);
        fds[entered] = (int)PyLong_AsLong(item);  /* checked to be an fd before */
        if (PyDict_SetItem(in_flight, item, accepted_at) < 0)
            break;
    }
    int error = 0;
    if (entered < n) {
        PyErr_Clear();
        error = ENOMEM;
    } else if (send_datagram(sock_fd, fds, n) < 0) {
        error = errno;
    }
    if (error) {
        /* Deleting keys that are there allocates nothing and cannot fail. */
        for (Py_ssize_t i = 0; i < entered; i++) {
            if (PyDict_DelItem(in_flight, PyList_GET_ITEM(fd_list, start + i)) < 0)
                PyErr_Clear();
        }
    }
    return error;
}

static PyObject *
send_dealt(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "send_dealt() takes exactly 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *groups = args[0], *accepted_at = args[1], *targets = args[2];
    Py_ssize_t chunk = PyLong_AsSsize_t(args[3]);
    if (chunk == -1 && PyErr_Occurred())
        return NULL;
    if (!PyList_Check(groups) || !PyDict_Check(targets) || chunk < 1 || chunk > MAX_FDS) {
        PyErr_SetString(PyExc_ValueError, "send_dealt(list of (key, fds), time, dict, 1..64)");
        return NULL;
    }
    /* A snapshot of the groups and, per group, its target, each held: nothing that runs meanwhile
     * (a socket's fileno(), a collection started by an allocation) can take them away. */
    PyObject *snapshot = PySequence_Tuple(groups);
    if (snapshot == NULL)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(snapshot);
    PyObject *held = PyTuple_New(count);
    PyObject *results = PyList_New(count);
    int *sent_counts = PyMem_Calloc((size_t)(count ? count : 1), 3 * sizeof(int));
    if (held == NULL || results == NULL || sent_counts == NULL) {
        if (sent_counts == NULL)
            PyErr_NoMemory();
        goto error;
    }
    /* Everything checked, and the answers' room made, before anything is sent: once a datagram
     * has gone, nothing may fail. */
    for (Py_ssize_t g = 0; g < count; g++) {
        PyObject *group = PyTuple_GET_ITEM(snapshot, g);
        if (!PyTuple_Check(group) || PyTuple_GET_SIZE(group) != 2
            || !PyList_Check(PyTuple_GET_ITEM(group, 1))) {
            PyErr_SetString(PyExc_ValueError, "send_dealt: each group is (key, list of fds)");
            goto error;
        }
        PyObject *target = PyDict_GetItemWithError(targets, PyTuple_GET_ITEM(group, 0));
        if (target == NULL || !PyTuple_Check(target) || PyTuple_GET_SIZE(target) != 2
            || !PyDict_Check(PyTuple_GET_ITEM(target, 1))) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "send_dealt: no target (socket, dict) for %R",
                             PyTuple_GET_ITEM(group, 0));
            goto error;
        }
        PyTuple_SET_ITEM(held, g, Py_NewRef(target));
        PyObject *fd_list = PyTuple_GET_ITEM(group, 1);
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fd_list); i++) {
            if (fd_of(PyList_GET_ITEM(fd_list, i)) < 0)
                goto error;
        }
        PyObject *result = PyTuple_New(3);
        if (result == NULL)
            goto error;
        PyList_SET_ITEM(results, g, result);
    }
    for (Py_ssize_t g = 0; g < count; g++) {
        PyObject *fd_list = PyTuple_GET_ITEM(PyTuple_GET_ITEM(snapshot, g), 1);
        PyObject *target = PyTuple_GET_ITEM(held, g);
        /* fileno() each time: a closed channel gives -1 and EBADF, never another file's number. */
        int sock_fd = PyObject_AsFileDescriptor(PyTuple_GET_ITEM(target, 0));
        if (sock_fd < 0)
            PyErr_Clear();  /* -1: the send fails with EBADF, reported as the group's errno */
        PyObject *in_flight = PyTuple_GET_ITEM(target, 1);
        Py_ssize_t total = PyList_GET_SIZE(fd_list), sent = 0;
        int datagrams = 0, error = 0;
        while (sent < total && !error) {
            Py_ssize_t n = total - sent < chunk ? total - sent : chunk;
            error = send_chunk(sock_fd, fd_list, sent, n, in_flight, accepted_at);
            if (!error) {
                sent += n;
                datagrams++;
            }
        }
        sent_counts[3 * g] = (int)sent;
        sent_counts[3 * g + 1] = datagrams;
        sent_counts[3 * g + 2] = error;
    }
    /* The answers, in the room made before: small ints, which come from CPython's cache for
     * anything up to 256 and are otherwise the one allocation left. Should one fail, the caller
     * still learns what went from the in-flight dicts (Scheduler._hand_off). */
    for (Py_ssize_t g = 0; g < count; g++) {
        PyObject *result = PyList_GET_ITEM(results, g);
        for (int k = 0; k < 3; k++) {
            PyObject *number = PyLong_FromLong(sent_counts[3 * g + k]);
            if (number == NULL)
                goto error;
            PyTuple_SET_ITEM(result, k, number);
        }
    }
    PyMem_Free(sent_counts);
    Py_DECREF(held);
    Py_DECREF(snapshot);
    return results;
error:
    PyMem_Free(sent_counts);
    Py_XDECREF(results);
    Py_XDECREF(held);
    Py_DECREF(snapshot);
    return NULL;
}

PyDoc_STRVAR(read_ack_doc,
"read_ack(sock, buffer, ancsize, flags, in_flight, /) -> (count, load) or (nbytes, ancdata, msg_flags)\n\n"
"Read one datagram from sock into buffer, as sock.recvmsg_into([buffer], ancsize,\n"
"flags) would. If it is an accepted ack, with no fds and nothing truncated, whose\n"
"ids are all keys of in_flight, each once, it is settled here: the ids leave\n"
"in_flight and the fds they name are closed; (count, load) is returned.\n"
"Otherwise nothing is changed and (nbytes, ancdata, msg_flags) is returned, with\n"
"ancdata as recvmsg_into gives it, for the caller to handle the datagram. Raises\n"
"OSError as recvmsg_into does; fds that arrived are closed if it raises after.");

/* Close every fd an SCM_RIGHTS message of msg carried (the datagram cannot be handed on). */
static void
close_received(struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len <= CMSG_LEN(0))
            continue;
        size_t room = (size_t)((char *)msg->msg_control + msg->msg_controllen - (char *)CMSG_DATA(c));
        size_t len = c->cmsg_len - CMSG_LEN(0);
        len = (len < room ? len : room) / sizeof(int);
        for (size_t i = 0; i < len; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            close(fd);
        }
    }
}

/* ancdata as recvmsg_into gives it: [(level, type, data), ...]; NULL with an exception set. */
static PyObject *
ancillary_list(struct msghdr *msg)
{
    PyObject *ancdata = PyList_New(0);
    if (ancdata == NULL)
        return NULL;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        size_t len = c->cmsg_len > CMSG_LEN(0) ? c->cmsg_len - CMSG_LEN(0) : 0;
        /* A header cut short by the buffer's end (MSG_CTRUNC) keeps what is there. */
        size_t room = (size_t)((char *)msg->msg_control + msg->msg_controllen - (char *)CMSG_DATA(c));
        PyObject *item = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type, (char *)CMSG_DATA(c),
                                       (Py_ssize_t)(len < room ? len : room));
        if (item == NULL || PyList_Append(ancdata, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(ancdata);
            return NULL;
        }
        Py_DECREF(item);
    }
    return ancdata;
}

static PyObject *
read_ack(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "read_ack() takes exactly 5 arguments (%zd given)", nargs);
        return NULL;
    }
    /* A closed socket (fileno() -1) reads as EBADF, as recvmsg_into does. */
    int sock_fd = PyObject_AsFileDescriptor(args[0]);
    if (sock_fd < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        PyErr_Clear();
    }
    Py_ssize_t ancsize = PyLong_AsSsize_t(args[2]);
    if (ancsize == -1 && PyErr_Occurred())
        return NULL;
    long flags = PyLong_AsLong(args[3]);
    if (flags == -1 && PyErr_Occurred())
        return NULL;
    PyObject *in_flight = args[4];
    /* Aligned for cmsghdr; twice what the channel asks for (a hand-off's fds). */
    union {
        char buf[2 * CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    if (!PyDict_Check(in_flight) || ancsize < 0 || (size_t)ancsize > sizeof control.buf || flags < INT_MIN
        || flags > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "read_ack(sock, buffer, 0..%zu, flags, dict)", sizeof control.buf);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    struct iovec iov = {view.buf, (size_t)view.len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ancsize ? control.buf : NULL;
    msg.msg_controllen = (size_t)ancsize;
    PyObject *ids[MAX_FDS];
    Py_ssize_t made = 0;
    PyObject *result = NULL;
    ssize_t n;
    do {
        n = recvmsg(sock_fd, &msg, (int)flags);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    const unsigned char *data = view.buf;
    Py_ssize_t count = (n - ACK_HEAD) / 4;
    int fast = msg.msg_controllen == 0 && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
               && n >= ACK_HEAD + 4 && (n - ACK_HEAD) % 4 == 0 && count <= MAX_FDS
               && data[0] == ACK_TYPE && data[1] == 1;
    /* Every id checked (in flight, named once) before anything changes: a bad ack changes nothing. */
    for (; fast && made < count; made++) {
        uint32_t id;
        memcpy(&id, data + ACK_HEAD + 4 * made, sizeof id);
        id = ntohl(id);
        for (Py_ssize_t j = 0; j < made && fast; j++)
            fast = PyLong_AsUnsignedLong(ids[j]) != id;
        ids[made] = PyLong_FromUnsignedLong(id);
        if (ids[made] == NULL)
            goto done;
        int present = fast ? PyDict_Contains(in_flight, ids[made]) : 0;
        if (present < 0) {
            made++;
            goto done;
        }
        fast = present;
    }
    if (fast) {
        /* The answer made first: once the copies are closed, nothing may fail. */
        uint32_t load;
        memcpy(&load, data + 2, sizeof load);
        result = Py_BuildValue("(nk)", count, (unsigned long)ntohl(load));
        if (result == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < count; i++) {
            if (PyDict_DelItem(in_flight, ids[i]) < 0)
                PyErr_Clear();  /* there a moment ago, and nothing ran since */
            close((int)PyLong_AsLong(ids[i]));
        }
    } else {
        PyObject *ancdata = ancillary_list(&msg);
        result = ancdata == NULL ? NULL : Py_BuildValue("(nNi)", (Py_ssize_t)n, ancdata, msg.msg_flags);
        if (result == NULL)
            close_received(&msg);  /* the fds that came cannot be handed on */
    }
done:
    for (Py_ssize_t i = 0; i < made; i++)
        Py_DECREF(ids[i]);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"accept_fds", (PyCFunction)(void (*)(void))accept_fds, METH_FASTCALL, accept_fds_doc},
    {"send_handoff", (PyCFunction)(void (*)(void))send_handoff, METH_FASTCALL, send_handoff_doc},
    {"send_dealt", (PyCFunction)(void (*)(void))send_dealt, METH_FASTCALL, send_dealt_doc},
    {"read_ack", (PyCFunction)(void (*)(void))read_ack, METH_FASTCALL, read_ack_doc},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *module)
{
    if (PyModule_AddIntConstant(module, "MAX_FDS", MAX_FDS) < 0
        || PyModule_AddIntConstant(module, "ACK_TYPE", ACK_TYPE) < 0
        || PyModule_AddIntConstant(module, "ACK_HEAD", ACK_HEAD) < 0)
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
