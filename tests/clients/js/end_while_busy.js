// client.end() must not wait for a backend: a client that only says goodbye needs no server.
'use strict';

const { runScenario } = require('./common');

runScenario(async (pg) => {
  const holder = new pg.Client();
  await holder.connect();
  await holder.query('BEGIN');
  await holder.query('SELECT 1');  // holder now keeps the only backend until COMMIT

  const leavers = await Promise.all(Array.from({ length: 5 }, async () => {
    const client = new pg.Client();
    await client.connect();
    const started = Date.now();
    await client.end();
    return Date.now() - started;
  }));
  const pool = new pg.Pool({ max: 3 });
  const poolClients = await Promise.all([pool.connect(), pool.connect(), pool.connect()]);
  poolClients.forEach((c) => c.release());
  const poolEndStarted = Date.now();
  await pool.end();
  const poolEndMs = Date.now() - poolEndStarted;

  await holder.query('COMMIT');
  await holder.end();
  return { slowestEndMs: Math.max(...leavers), poolEndMs };
});
