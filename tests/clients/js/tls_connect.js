// node-postgres over TLS, verifying pgmux's certificate against the CA in CA_FILE (ssl: { ca }).
'use strict';

const fs = require('fs');
const { runScenario } = require('./common');

runScenario(async (pg) => {
  const client = new pg.Client({ ssl: { ca: fs.readFileSync(process.env.CA_FILE) } });
  await client.connect();
  try {
    const one = (await client.query('SELECT $1::int + 1 AS two', [1])).rows[0].two;
    return { two: one, encrypted: client.connection.stream.encrypted === true,
             protocol: client.connection.stream.getProtocol() };
  } finally {
    await client.end();
  }
});
