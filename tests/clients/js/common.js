// Shared by the node-postgres scenarios: connection settings come from the PG* environment
// (node-postgres reads PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE itself).
'use strict';

const pg = require('pg');

const HARD_TIMEOUT_MS = Number(process.env.SCENARIO_TIMEOUT_MS || 30000);

// Run an async scenario, print its result as one JSON line, and never hang past the timeout.
function runScenario(scenario) {
  const timer = setTimeout(() => {
    console.error(`scenario did not finish within ${HARD_TIMEOUT_MS} ms`);
    process.exit(3);
  }, HARD_TIMEOUT_MS);
  timer.unref();
  scenario(pg)
    .then((result) => {
      process.stdout.write(JSON.stringify(result) + '\n');
      clearTimeout(timer);
    })
    .catch((err) => {
      console.error(err && err.stack ? err.stack : err);
      console.error(JSON.stringify({ code: err && err.code, message: err && err.message }));
      process.exit(1);
    });
}

// What a failed query looked like to node-postgres: the fields the server's ErrorResponse carried.
async function errorOf(promise) {
  try {
    await promise;
  } catch (err) {
    return { code: err.code, message: err.message, severity: err.severity, constraint: err.constraint,
             detail: err.detail, table: err.table };
  }
  return null;
}

module.exports = { runScenario, errorOf };
