// node-postgres named queries ({name, text, values}) through pgmux in transaction mode.
//
// Phase 1: CLIENTS separate pg.Clients at once, each running STATEMENTS distinct named queries ROUNDS times.
//          Names and texts are the same in every client (as in an app's code), so pgmux sees the same
//          names from many clients and each client's statements land on whichever backend is free.
// Phase 2: a pg.Pool of CLIENTS running POOL_QUERIES named queries at once.
// Phase 3: one client: named queries inside BEGIN/COMMIT and BEGIN/ROLLBACK, statements first prepared
//          inside a transaction and used after it (and the reverse), errors at Execute and at Parse.
// Every error is collected (never thrown past the scenario), so the test sees all of them at once.
'use strict';

const { runScenario } = require('./common');

const CLIENTS = Number(process.env.CLIENTS || 50);
const STATEMENTS = Number(process.env.STATEMENTS || 20);
const ROUNDS = Number(process.env.ROUNDS || 5);
const POOL_QUERIES = Number(process.env.POOL_QUERIES || 1000);

const OWN = Number(process.env.OWN_STATEMENTS || 2);

// Statement q: a name, a text unique to q, and the row it must return for value n. The first OWN
// statements have a text of the client's own (same name in every client, different text): prepared on
// one backend by that client alone, so its later uses on other backends need pgmux to prepare them there.
function statement(q, n, owner) {
  const own = owner !== undefined && q < OWN ? ` /* client ${owner} */` : '';
  return {
    query: {
      name: `named_q${q}`,
      text: `SELECT $1::int + ${q} AS v, $2::text || '-${q}' AS tag, ${q}::int AS q${own}`,
      values: [n, `c${n}`],
    },
    expected: { v: n + q, tag: `c${n}-${q}`, q },
  };
}

function describeError(err, where) {
  return { where, code: err && err.code, message: err && err.message };
}

async function manyClients(errors) {
  const perClient = await Promise.all(Array.from({ length: CLIENTS }, async (_, c) => {
    const client = new pg.Client({ application_name: `named-${c}` });
    let ok = 0;
    let wrong = 0;
    try {
      await client.connect();
      for (let round = 0; round < ROUNDS; round++) {
        for (let i = 0; i < STATEMENTS; i++) {
          // Each client walks the statements in its own order, so different clients interleave differently.
          const q = (i + c) % STATEMENTS;
          const n = c * 10000 + round * 100 + q;
          const { query, expected } = statement(q, n, c);
          try {
            const res = await client.query(query);
            const row = res.rows[0];
            if (res.rows.length === 1 && row.v === expected.v && row.tag === expected.tag && row.q === expected.q) {
              ok += 1;
            } else {
              wrong += 1;
              if (wrong <= 3) errors.push({ where: `client ${c} ${query.name}`, wrongRows: res.rows, expected });
            }
          } catch (err) {
            errors.push(describeError(err, `client ${c} round ${round} ${query.name}`));
          }
        }
      }
    } catch (err) {
      errors.push(describeError(err, `client ${c} connect`));
    } finally {
      await client.end().catch((err) => errors.push(describeError(err, `client ${c} end`)));
    }
    return ok;
  }));
  return perClient.reduce((sum, ok) => sum + ok, 0);
}

async function pooled(errors) {
  const pool = new pg.Pool({ max: CLIENTS });
  pool.on('error', (err) => errors.push(describeError(err, 'pool idle client')));
  let ok = 0;
  try {
    await Promise.all(Array.from({ length: POOL_QUERIES }, async (_, i) => {
      const { query, expected } = statement(i % STATEMENTS, i);
      try {
        const res = await pool.query(query);
        const row = res.rows[0];
        if (row.v === expected.v && row.tag === expected.tag) ok += 1;
        else errors.push({ where: `pool query ${i}`, wrongRows: res.rows, expected });
      } catch (err) {
        errors.push(describeError(err, `pool query ${i} ${query.name}`));
      }
    }));
  } finally {
    await pool.end();
  }
  return ok;
}

// What a query that must fail failed with (null if it did not fail).
async function failure(promise) {
  try {
    await promise;
  } catch (err) {
    return err.code || err.message;
  }
  return null;
}

async function transactions(errors) {
  const client = new pg.Client({ application_name: 'named-tx' });
  await client.connect();
  const out = {};
  const count = { name: 'named_tx_count', text: 'SELECT count(*)::int AS n FROM node_named_tx WHERE batch = $1' };
  const insert = { name: 'named_tx_insert', text: 'INSERT INTO node_named_tx (batch, i) VALUES ($1, $2)' };
  const backend = { name: 'named_tx_pid', text: 'SELECT pg_backend_pid() AS pid, $1::int AS echo' };
  try {
    await client.query('DROP TABLE IF EXISTS node_named_tx');
    await client.query('CREATE TABLE node_named_tx (batch text NOT NULL, i int NOT NULL)');

    // Committed: statements first prepared inside the transaction, used again inside it.
    await client.query('BEGIN');
    const pids = new Set();
    for (let i = 0; i < 10; i++) {
      await client.query({ ...insert, values: ['commit', i] });
      pids.add((await client.query({ ...backend, values: [i] })).rows[0].pid);
    }
    out.insideBeforeCommit = (await client.query({ ...count, values: ['commit'] })).rows[0].n;
    out.oneBackendInTx = pids.size === 1;
    await client.query('COMMIT');
    // After COMMIT the same names may run on another backend: pgmux must prepare them there.
    out.afterCommit = (await client.query({ ...count, values: ['commit'] })).rows[0].n;

    // Rolled back: statements prepared before the transaction, used inside it.
    await client.query('BEGIN');
    for (let i = 0; i < 5; i++) await client.query({ ...insert, values: ['rollback', i] });
    out.insideBeforeRollback = (await client.query({ ...count, values: ['rollback'] })).rows[0].n;
    await client.query('ROLLBACK');
    out.afterRollback = (await client.query({ ...count, values: ['rollback'] })).rows[0].n;

    // An error at Execute inside a transaction: the statement survives the ROLLBACK and works again.
    const divide = { name: 'named_tx_divide', text: 'SELECT 10 / $1::int AS q' };
    await client.query('BEGIN');
    out.divideInTx = (await client.query({ ...divide, values: [5] })).rows[0].q;
    out.divideByZero = await failure(client.query({ ...divide, values: [0] }));
    out.abortedTx = await failure(client.query({ ...count, values: ['commit'] }));
    await client.query('ROLLBACK');
    out.divideAfterRollback = (await client.query({ ...divide, values: [2] })).rows[0].q;

    // A Parse that fails leaves no statement behind: the name can then be used for a valid text.
    out.badParse = await failure(client.query({ name: 'named_tx_fixed', text: 'SELEC $1::int', values: [1] }));
    out.fixedAfterBadParse = (await client.query(
      { name: 'named_tx_fixed', text: 'SELECT $1::int + 1 AS n', values: [1] })).rows[0].n;

    // Many short transactions on the same client, each using the statements, from a fresh backend or not.
    let loops = 0;
    for (let i = 0; i < 20; i++) {
      await client.query('BEGIN');
      await client.query({ ...insert, values: ['loop', i] });
      if ((await client.query({ ...count, values: ['loop'] })).rows[0].n === i + 1) loops += 1;
      await client.query('COMMIT');
    }
    out.loopTransactionsOk = loops;
  } catch (err) {
    errors.push(describeError(err, 'transactions'));
    await client.query('ROLLBACK').catch(() => {});
  } finally {
    await client.end();
  }
  return out;
}

let pg;
runScenario(async (pgModule) => {
  pg = pgModule;
  const errors = [];
  const started = Date.now();
  const clientQueriesOk = await manyClients(errors);
  const poolQueriesOk = await pooled(errors);
  const tx = await transactions(errors);
  return {
    clientQueriesOk,
    poolQueriesOk,
    transactions: tx,
    errors: errors.slice(0, 20),
    errorCount: errors.length,
    elapsedMs: Date.now() - started,
  };
});
