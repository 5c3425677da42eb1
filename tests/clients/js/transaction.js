// BEGIN/COMMIT and BEGIN/ROLLBACK with pg.Clients: uncommitted rows stay invisible to another client.
'use strict';

const { runScenario } = require('./common');

runScenario(async (pg) => {
  const writer = new pg.Client();
  const reader = new pg.Client();
  await writer.connect();
  await reader.connect();
  const count = async (client) =>
    Number((await client.query('SELECT count(*) AS n FROM node_tx')).rows[0].n);
  try {
    await writer.query('DROP TABLE IF EXISTS node_tx');
    await writer.query('CREATE TABLE node_tx (id int PRIMARY KEY, note text)');

    await writer.query('BEGIN');
    const pidInTx = (await writer.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
    for (let i = 1; i <= 10; i++) {
      await writer.query('INSERT INTO node_tx VALUES ($1, $2)', [i, `note ${i}`]);
    }
    const insideBeforeCommit = await count(writer);
    const outsideBeforeCommit = await count(reader);
    const samePidInTx = (await writer.query('SELECT pg_backend_pid() AS pid')).rows[0].pid === pidInTx;
    await writer.query('COMMIT');
    const outsideAfterCommit = await count(reader);

    await writer.query('BEGIN');
    await writer.query('DELETE FROM node_tx WHERE id > $1', [5]);
    const insideBeforeRollback = await count(writer);
    await writer.query('ROLLBACK');
    const afterRollback = await count(reader);

    // A pooled client checked out for a transaction, the way node apps usually do it.
    const pool = new pg.Pool({ max: 3 });
    try {
      const client = await pool.connect();
      try {
        await client.query('BEGIN');
        await client.query('UPDATE node_tx SET note = $1 WHERE id = $2', ['updated', 1]);
        await client.query('COMMIT');
      } finally {
        client.release();
      }
    } finally {
      await pool.end();
    }
    const note = (await reader.query('SELECT note FROM node_tx WHERE id = $1', [1])).rows[0].note;
    await writer.query('DROP TABLE node_tx');
    return { insideBeforeCommit, outsideBeforeCommit, samePidInTx, outsideAfterCommit, insideBeforeRollback,
             afterRollback, note };
  } finally {
    await writer.end();
    await reader.end();
  }
});
