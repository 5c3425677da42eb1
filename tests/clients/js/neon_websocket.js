// The Neon serverless driver (@neondatabase/serverless) through pgmux's HTTP listener, over a WebSocket, with
// only its documented self-hosting options. SCENARIO picks what runs; the result is one JSON line.
//   PGMUX_HTTP_PORT: the http listener's port; PIPELINE: "password" or "false"; COALESCE: "true" or "false";
//   WS_PROXY: "function" (host, port) => `127.0.0.1:PORT/v2`, or "string" (the driver appends ?address=);
//   SECURE: "true" for wss (NODE_EXTRA_CA_CERTS trusts pgmux's certificate).
'use strict';

const { runMain } = require('./common');

const { Pool, Client, neonConfig } = require('@neondatabase/serverless');
const ws = require('ws');

const PORT = process.env.PGMUX_HTTP_PORT;
const SECURE = process.env.SECURE === 'true';

neonConfig.webSocketConstructor = ws;
neonConfig.useSecureWebSocket = SECURE;
neonConfig.pipelineConnect = process.env.PIPELINE === 'false' ? false : 'password';
neonConfig.coalesceWrites = process.env.COALESCE !== 'false';
const proxyHost = SECURE ? 'localhost' : '127.0.0.1';
neonConfig.wsProxy = process.env.WS_PROXY === 'string' ? `${proxyHost}:${PORT}/v2`
  : (host, port) => `${proxyHost}:${PORT}/v2`;

function connectionString(password) {
  const user = encodeURIComponent(process.env.PGUSER);
  // The host is never dialled by pgmux: with the string wsProxy it travels as ?address=, and is only a hint.
  return `postgresql://${user}:${encodeURIComponent(password)}@db.internal:5432/${process.env.PGDATABASE}`;
}

async function clientWork(client) {
  const one = await client.query('SELECT $1::int + 1 AS n, $2::text AS t', [41, 'héllo']);
  await client.query('BEGIN');
  const a = await client.query('SELECT txid_current() AS x');
  const b = await client.query('SELECT txid_current() AS x');
  await client.query('COMMIT');
  return { n: one.rows[0].n, t: one.rows[0].t, sameTransaction: a.rows[0].x === b.rows[0].x };
}

const scenarios = {
  async client() {
    const client = new Client(connectionString(process.env.PGPASSWORD));
    await client.connect();
    const result = await clientWork(client);
    await client.end();
    return result;
  },

  async pool() {
    const pool = new Pool({ connectionString: connectionString(process.env.PGPASSWORD), max: 2 });
    const simple = await pool.query('SELECT $1::int * 2 AS n', [21]);
    const client = await pool.connect();
    const result = await clientWork(client);
    client.release();
    await pool.end();
    return { ...result, poolQuery: simple.rows[0].n };
  },

  async concurrent() {
    const clients = Number(process.env.CLIENTS || 50);
    let queriesOk = 0;
    await Promise.all(Array.from({ length: clients }, async (_, i) => {
      const client = new Client(connectionString(process.env.PGPASSWORD));
      await client.connect();
      for (let q = 0; q < 5; q++) {
        const r = await client.query('SELECT $1::int AS i, pg_sleep(0.005)', [i * 10 + q]);
        if (r.rows[0].i === i * 10 + q) queriesOk++;
      }
      await client.end();
    }));
    return { clients, queriesOk };
  },

  async wrongPassword() {
    const client = new Client(connectionString('not-the-password'));
    client.on('error', () => {}); // the socket's end after the refusal, reported again: not the result
    try {
      await client.connect();
      await client.query('SELECT 1');
    } catch (err) {
      return { code: err.code, message: err.message };
    }
    return { code: null };
  },

  async drizzle() {
    const { drizzle } = require('drizzle-orm/neon-serverless');
    const { sql } = require('drizzle-orm');
    const pool = new Pool({ connectionString: connectionString(process.env.PGPASSWORD) });
    const db = drizzle({ client: pool });
    const five = await db.execute(sql`SELECT ${5}::int AS five`);
    const inTransaction = await db.transaction(async (tx) => {
      const a = await tx.execute(sql`SELECT txid_current() AS x`);
      const b = await tx.execute(sql`SELECT txid_current() AS x`);
      return a.rows[0].x === b.rows[0].x;
    });
    await pool.end();
    return { five: five.rows[0].five, sameTransaction: inTransaction };
  },
};

runMain(scenarios[process.env.SCENARIO], 30000);
