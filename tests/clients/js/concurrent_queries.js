// 50 separate pg.Clients at once, then a pg.Pool of 50, all with parameterised (unnamed) queries.
'use strict';

const { runScenario } = require('./common');

const CLIENTS = Number(process.env.CLIENTS || 50);
const QUERIES_PER_CLIENT = 20;

runScenario(async (pg) => {
  const clientResults = await Promise.all(Array.from({ length: CLIENTS }, async (_, c) => {
    const client = new pg.Client({ application_name: `node-client-${c}` });
    await client.connect();
    try {
      let ok = 0;
      for (let q = 0; q < QUERIES_PER_CLIENT; q++) {
        const n = c * 1000 + q;
        const res = await client.query(
          'SELECT $1::int * 2 AS doubled, $2::text AS label, $3::jsonb AS doc, $4::text IS NULL AS was_null',
          [n, `ünïcødé-${n}`, { n, tags: ['a', 'b'] }, null]);
        const row = res.rows[0];
        if (row.doubled === n * 2 && row.label === `ünïcødé-${n}` && row.doc.n === n &&
            row.doc.tags.join() === 'a,b' && row.was_null === true) {
          ok += 1;
        }
      }
      const app = await client.query('SHOW application_name');
      return { ok, applicationName: app.rows[0].application_name, expected: `node-client-${c}` };
    } finally {
      await client.end();
    }
  }));

  const pool = new pg.Pool({ max: CLIENTS });
  let poolOk = 0;
  try {
    const rows = await Promise.all(Array.from({ length: 500 }, (_, i) =>
      pool.query({ text: 'SELECT $1::bigint + $2::bigint AS s, $3::text[] AS arr', values: [i, 1, ['x', `${i}`]],
                   rowMode: 'array' })));
    rows.forEach((res, i) => {
      const [s, arr] = res.rows[0];
      if (s === String(i + 1) && arr.length === 2 && arr[1] === `${i}`) poolOk += 1;
    });
  } finally {
    await pool.end();
  }

  return {
    clients: clientResults.length,
    queriesOk: clientResults.reduce((sum, r) => sum + r.ok, 0),
    // Each client's own application_name, as SHOW returned it; wrong ones listed in full.
    applicationNameMismatches: clientResults.filter((r) => r.applicationName !== r.expected)
      .map((r) => ({ expected: r.expected, got: r.applicationName })),
    poolQueriesOk: poolOk,
  };
});
