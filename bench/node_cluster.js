// The Node.js peer of the lab's W0 (bench/node_peer.py starts it): Node's `cluster` module serving
// what bench.apps:light serves (read the request head, a fixed 200, close).
//
//     node bench/node_cluster.js rr|none [WORKERS]      (or BENCH_NODE_SCHED=rr|none, default rr)
//
// rr is cluster.SCHED_RR: the primary accepts every connection and hands it to a worker over IPC
// (round-robin, what the dispatcher's round-robin policy does); none is cluster.SCHED_NONE: the
// workers share the listening socket and accept themselves (the dispatcher's shared policy).
//
// Every worker listens on 127.0.0.1 port 0: in cluster mode the primary opens the socket, so all
// workers share the port it chose. Once every worker listens, the primary prints one line to
// stdout:
//
//     listening 127.0.0.1:PORT pids PRIMARYPID,WORKER1PID,WORKER2PID
//
// On SIGTERM (or SIGINT) the primary sends SIGTERM to its workers and exits once they are gone
// (after STOP_GRACE_MS it kills what is left). A worker that dies unasked stops the whole cluster,
// with exit code 1: a peer with a worker missing measures nothing useful.
'use strict';

const cluster = require('node:cluster');
const net = require('node:net');

const ANSWER = 'HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n';
const HEAD_END = '\r\n\r\n';
const HOST = '127.0.0.1';
const STOP_GRACE_MS = 5000;

const mode = process.argv[2] || process.env.BENCH_NODE_SCHED || 'rr';
const workers = Number(process.argv[3] || 2);
if (!['rr', 'none'].includes(mode) || !Number.isInteger(workers) || workers < 1) {
  console.error('usage: node node_cluster.js rr|none [WORKERS]');
  process.exit(2);
}

function primary() {
  // Read by cluster when it sets up the primary, at the first fork: it must be set before.
  cluster.schedulingPolicy = mode === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;
  const alive = new Set();
  const listening = new Set();
  let stopping = false;
  let exitCode = 0;

  function stop(code) {
    if (stopping) return;
    stopping = true;
    exitCode = code;
    for (const pid of alive) {
      try { process.kill(pid, 'SIGTERM'); } catch { /* already gone */ }
    }
    if (alive.size === 0) process.exit(exitCode);
    setTimeout(() => {
      for (const pid of alive) {
        try { process.kill(pid, 'SIGKILL'); } catch { /* already gone */ }
      }
      process.exit(exitCode);
    }, STOP_GRACE_MS).unref();
  }

  cluster.on('listening', (worker, address) => {
    listening.add(worker.process.pid);
    if (listening.size === workers) {
      console.log(`listening ${HOST}:${address.port} pids ${[process.pid, ...listening].join(',')}`);
    }
  });
  cluster.on('exit', (worker, code, signal) => {
    alive.delete(worker.process.pid);
    if (!stopping) {
      console.error(`worker ${worker.process.pid} exited (${code ?? signal}): stopping`);
      stop(1);
    } else if (alive.size === 0) {
      process.exit(exitCode);
    }
  });
  process.on('SIGTERM', () => stop(0));
  process.on('SIGINT', () => stop(0));
  for (let i = 0; i < workers; i++) alive.add(cluster.fork().process.pid);
}

function worker() {
  // noDelay as asyncio and uvloop set TCP_NODELAY on their sockets (one write per answer anyway).
  const server = net.createServer({ noDelay: true }, (socket) => {
    let head = '';
    socket.setEncoding('latin1');
    socket.on('data', (chunk) => {
      if (head === null) return; // answered: the rest is ignored, as readuntil leaves it unread
      head += chunk;
      if (head.includes(HEAD_END)) {
        head = null;
        socket.end(ANSWER);
      }
    });
    socket.on('error', () => socket.destroy()); // a client reset: nothing to answer
  });
  server.listen(0, HOST);
}

if (cluster.isPrimary) primary(); else worker();
