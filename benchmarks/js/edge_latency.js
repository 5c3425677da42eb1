// One measured unit of the `edge` scenario: MODE run back to back for SECONDS (at most MAX_REQUESTS), each
// request timed on its own, by the clients edge functions and servers really use:
//   http        the Neon serverless driver's neon(): one `SELECT 1` = one POST /sql (fetch keeps its socket)
//   ws_query    the driver's Client, connected once over a WebSocket: one `SELECT 1` per request
//   ws_connect  the driver's Client: WebSocket connect + login + `SELECT 1` + end, per request
//   ws_query_uncoalesced, ws_connect_uncoalesced  the same two with coalesceWrites off: the default batches
//               each burst of writes behind a setTimeout(0), which node runs after at least 1 ms; off, what is
//               left is the WebSocket's own cost (diagnostic rows)
//   tcp_connect node-postgres (pg) over TCP: connect + SCRAM login + `SELECT 1` + end, per request
//   tcp_query   node-postgres connected once over TCP: one `SELECT 1` per request
// Protocol with the harness: after WARMUP requests it prints "warm" and waits for a line on stdin (the harness
// takes its CPU snapshot), then runs the timed loop and prints one JSON line {samples_ms, errors}.
// Environment: MODE, HTTP_PORT, TCP_PORT, PGUSER, PGPASSWORD, PGDATABASE, SECONDS, MAX_REQUESTS, WARMUP,
// HARD_TIMEOUT_MS. NODE_PATH must reach @neondatabase/serverless, ws and pg.
'use strict';

const readline = require('readline');

const env = process.env;
const MODE = env.MODE;
const user = encodeURIComponent(env.PGUSER);
const password = encodeURIComponent(env.PGPASSWORD);
const database = env.PGDATABASE;
const QUERY = 'SELECT 1';

function neonDriver(coalesceWrites = true) {
  const neon = require('@neondatabase/serverless');
  neon.neonConfig.coalesceWrites = coalesceWrites;
  neon.neonConfig.webSocketConstructor = require('ws');
  neon.neonConfig.useSecureWebSocket = false; // a loopback listener with allow_plaintext_http
  neon.neonConfig.wsProxy = () => `127.0.0.1:${env.HTTP_PORT}/v2`;
  neon.neonConfig.fetchEndpoint = `http://127.0.0.1:${env.HTTP_PORT}/sql`;
  return neon;
}

// The host in the driver's URL is never dialled by pgmux (wsProxy / fetchEndpoint say where to go).
const neonUrl = () => `postgresql://${user}:${password}@127.0.0.1:${env.HTTP_PORT}/${database}`;
const tcpConfig = () => ({ host: '127.0.0.1', port: Number(env.TCP_PORT), user: env.PGUSER,
                           password: env.PGPASSWORD, database });

// Each mode: setup() once, request() per sample, teardown() at the end.
const modes = {
  http() {
    const sql = neonDriver().neon(neonUrl());
    return { request: () => sql.query(QUERY) };
  },
  ws_query(coalesceWrites = true) {
    const client = new (neonDriver(coalesceWrites).Client)(neonUrl());
    return { setup: () => client.connect(), request: () => client.query(QUERY), teardown: () => client.end() };
  },
  ws_query_uncoalesced() {
    return modes.ws_query(false);
  },
  ws_connect(coalesceWrites = true) {
    const { Client } = neonDriver(coalesceWrites);
    return { request: () => connectQueryEnd(new Client(neonUrl())) };
  },
  ws_connect_uncoalesced() {
    return modes.ws_connect(false);
  },
  tcp_connect() {
    const { Client } = require('pg');
    return { request: () => connectQueryEnd(new Client(tcpConfig())) };
  },
  tcp_query() {
    const client = new (require('pg').Client)(tcpConfig());
    return { setup: () => client.connect(), request: () => client.query(QUERY), teardown: () => client.end() };
  },
};

async function connectQueryEnd(client) {
  await client.connect();
  try {
    await client.query(QUERY);
  } finally {
    await client.end();
  }
}

function waitForGo() {
  return new Promise((resolve) => {
    const lines = readline.createInterface({ input: process.stdin });
    lines.once('line', () => {
      lines.close();
      resolve();
    });
  });
}

async function main() {
  const mode = modes[MODE]();
  if (mode.setup) await mode.setup();
  for (let i = 0; i < Number(env.WARMUP || 20); i++) await mode.request();
  process.stdout.write('warm\n');
  await waitForGo();
  const samples = [];
  const errors = {};
  const maxRequests = Number(env.MAX_REQUESTS || 1e9);
  const deadline = process.hrtime.bigint() + BigInt(Math.round(Number(env.SECONDS) * 1e9));
  while (samples.length < maxRequests) {
    const began = process.hrtime.bigint();
    try {
      await mode.request();
    } catch (err) {
      const key = (err && (err.code || err.name)) || 'Error';
      errors[key] = (errors[key] || 0) + 1;
      if (process.hrtime.bigint() > deadline) break;
      continue;
    }
    const ended = process.hrtime.bigint();
    samples.push(Number(ended - began) / 1e6);
    if (ended > deadline) break;
  }
  if (mode.teardown) await mode.teardown();
  // Exit once the line is flushed: a pipe takes 64 KiB at a time and node queues the rest, which an exit at
  // once would cut (tens of thousands of samples are megabytes). Exit at all: fetch's idle keep-alive socket
  // would hold the process for seconds.
  process.stdout.write(JSON.stringify({ samples_ms: samples, errors }) + '\n', () => process.exit(0));
}

const timer = setTimeout(() => {
  console.error(`edge_latency.js ${MODE} did not finish within ${env.HARD_TIMEOUT_MS} ms`);
  process.exit(3);
}, Number(env.HARD_TIMEOUT_MS || 60000));
timer.unref();
main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
