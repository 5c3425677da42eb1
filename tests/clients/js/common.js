// Shared by the node scenarios. node-postgres ones take their connection settings from the PG* environment
// (node-postgres reads PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE itself).
'use strict';

// Run an async ``main``, print its result as one JSON line, and never hang past SCENARIO_TIMEOUT_MS (or
// ``defaultTimeoutMs``). Shared by every node scenario, whichever driver it loads.
function runMain(main, defaultTimeoutMs = 30000) {
  const hardTimeoutMs = Number(process.env.SCENARIO_TIMEOUT_MS || defaultTimeoutMs);
  const timer = setTimeout(() => {
    console.error(`scenario did not finish within ${hardTimeoutMs} ms`);
    process.exit(3);
  }, hardTimeoutMs);
  timer.unref();
  main()
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

// A node-postgres scenario: ``scenario(pg)``.
function runScenario(scenario) {
  runMain(() => scenario(require('pg')));
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

module.exports = { runMain, runScenario, errorOf };
