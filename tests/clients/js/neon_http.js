// @neondatabase/serverless's neon() (HTTP) and drizzle-orm/neon-http against pgmux's POST /sql, with only
// the driver's documented self-hosting option: neonConfig.fetchEndpoint.
// Environment: DATABASE_URL (postgresql://user:password@host:port/db, the password checked by pgmux),
// SQL_ENDPOINT (http://127.0.0.1:PORT/sql), SCENARIO_TIMEOUT_MS.
'use strict';

const { runMain } = require('./common');

const { neon, neonConfig } = require('@neondatabase/serverless');
const { drizzle } = require('drizzle-orm/neon-http');
const { eq, sql: drizzleSql } = require('drizzle-orm');
const { pgTable, integer, text } = require('drizzle-orm/pg-core');


async function errorOf(promise) {
  try {
    await promise;
  } catch (err) {
    return { name: err.name, code: err.code === undefined ? null : err.code, message: err.message };
  }
  return null;
}

async function scenario() {
  neonConfig.fetchEndpoint = process.env.SQL_ENDPOINT;
  const url = process.env.DATABASE_URL;
  const sql = neon(url);

  // Parameters of every common type, read back by the driver's own type parsers (pg-types).
  const when = new Date('2024-05-06T07:08:09.123Z');
  const [row] = await sql`SELECT ${42}::int AS i, ${'12345678901234567890.5'}::numeric AS n,
      ${'grüße ✓ 日本語'}::text AS t, ${when}::timestamptz AS ts, ${JSON.stringify({ a: [1, 'x'] })}::json AS j,
      ${JSON.stringify({ b: true })}::jsonb AS jb, ${Buffer.from([0xde, 0xad, 0xbe, 0xef])}::bytea AS b,
      ${[1, 2, 3]}::int[] AS a, ${null}::text AS nothing, ${['a b', 'q"uote']}::text[] AS ta, ${true}::bool AS yes`;
  const types = {
    i: row.i, n: row.n, t: row.t, ts: row.ts instanceof Date ? row.ts.toISOString() : String(row.ts),
    j: row.j, jb: row.jb, b: Buffer.isBuffer(row.b) ? row.b.toString('hex') : String(row.b), a: row.a,
    nothing: row.nothing, ta: row.ta, yes: row.yes,
  };

  // sql.query with $n parameters, and full results in array mode.
  const queried = await sql.query('SELECT $1::int + 1 AS next', [41]);
  const full = await sql.query('SELECT $1::text AS word, 2 AS two', ['hi'], { fullResults: true, arrayMode: true });
  const fullResults = { command: full.command, rowCount: full.rowCount, rowAsArray: full.rowAsArray,
                        rows: full.rows, fields: full.fields.map((f) => [f.name, f.dataTypeID]) };

  // A non-interactive transaction with the batch modes.
  const [level, readOnly] = await sql.transaction([
    sql`SELECT current_setting('transaction_isolation') AS level`,
    sql`SELECT current_setting('transaction_read_only') AS ro`,
  ], { isolationLevel: 'Serializable', readOnly: true });
  const transaction = { level: level[0].level, readOnly: readOnly[0].ro };
  await sql`DROP TABLE IF EXISTS neon_http_items`;
  await sql`CREATE TABLE neon_http_items (id int PRIMARY KEY, name text)`;
  const writeInReadOnly = await errorOf(sql.transaction([
    sql`INSERT INTO neon_http_items VALUES (1, 'x')`,
  ], { isolationLevel: 'Serializable', readOnly: true }));

  const divisionByZero = await errorOf(sql`SELECT 1/0`);
  // About 3 MB of rows, past the response limit the test gives pgmux (1 MiB): a 507 the driver reports.
  const oversized = await errorOf(sql`SELECT repeat('x', 1024) FROM generate_series(1, 3000)`);
  const wrongPassword = await errorOf(neon(url.replace(/:[^:@/]*@/, ':not-the-password@'))`SELECT 1`);

  // drizzle-orm/neon-http on the same neon() client.
  const items = pgTable('neon_http_items', { id: integer('id').primaryKey(), name: text('name') });
  const db = drizzle({ client: sql });
  await db.insert(items).values([{ id: 1, name: 'one' }, { id: 2, name: 'two' }]);
  await db.update(items).set({ name: 'TWO' }).where(eq(items.id, 2));
  const selected = await db.select().from(items).orderBy(items.id);
  const counted = await db.execute(drizzleSql`SELECT count(*)::int AS n FROM neon_http_items`);
  const batched = await db.batch([
    db.insert(items).values({ id: 3, name: 'three' }),
    db.select().from(items).where(eq(items.id, 3)),
  ]);
  await sql`DROP TABLE neon_http_items`;
  return {
    types, queried: queried[0].next, fullResults, transaction, writeInReadOnly, divisionByZero, oversized,
    wrongPassword,
    drizzle: { selected, counted: counted.rows[0].n, batched: batched[1] },
  };
}

// One query while the test holds the pool's only backend: pgmux's 53300 must reach the driver as err.code.
async function refusal() {
  neonConfig.fetchEndpoint = process.env.SQL_ENDPOINT;
  return { refused: await errorOf(neon(process.env.DATABASE_URL)`SELECT 1`) };
}

runMain(process.env.SCENARIO === 'refusal' ? refusal : scenario, 60000);
