// Server errors reach node-postgres with their SQLSTATE and fields, and the connection stays usable.
'use strict';

const { runScenario, errorOf } = require('./common');

runScenario(async (pg) => {
  const client = new pg.Client();
  await client.connect();
  try {
    const divisionByZero = await errorOf(client.query('SELECT 1/0'));
    const afterSimple = (await client.query('SELECT 1 AS one')).rows[0].one;

    const badParameter = await errorOf(client.query('SELECT $1::int AS n', ['not a number']));
    const afterExtended = (await client.query('SELECT $1::int AS n', [7])).rows[0].n;

    await client.query('DROP TABLE IF EXISTS node_errors');
    await client.query('CREATE TABLE node_errors (id int CONSTRAINT node_errors_pkey PRIMARY KEY)');
    await client.query('INSERT INTO node_errors VALUES ($1)', [1]);
    const uniqueViolation = await errorOf(client.query('INSERT INTO node_errors VALUES ($1)', [1]));

    await client.query('BEGIN');
    const inTransaction = await errorOf(client.query('SELECT 1/0'));
    const aborted = await errorOf(client.query('SELECT 1'));
    await client.query('ROLLBACK');
    const afterRollback = (await client.query('SELECT 2 AS two')).rows[0].two;

    const syntax = await errorOf(client.query('SELEC 1'));
    const afterSyntax = (await client.query('SELECT count(*)::int AS n FROM node_errors')).rows[0].n;
    await client.query('DROP TABLE node_errors');
    return { divisionByZero, afterSimple, badParameter, afterExtended, uniqueViolation, inTransaction, aborted,
             afterRollback, syntax, afterSyntax };
  } finally {
    await client.end();
  }
});
