// Prisma 7 with @prisma/adapter-neon through pgmux's HTTP listener, configured only with the Neon driver's
// documented self-hosting options. MODE picks the adapter:
//   websocket: PrismaNeon (the driver's Pool over WebSockets: webSocketConstructor, useSecureWebSocket, wsProxy);
//   http:      PrismaNeonHttp (the driver's neon() over POST /sql: fetchEndpoint).
// CLIENTS PrismaClients run WORKERS workers each; every worker owns one user and its posts, so each read is
// checked exactly against what that worker wrote. Errors are collected, never thrown past the scenario; the
// result is one JSON line. Environment: PGMUX_HTTP_PORT, DATABASE_URL (user, password and database; its host
// is never dialled), PRISMA_CLIENT_DIR, MODE, CLIENTS, WORKERS, POOL_MAX, ROUNDS, RUN, SCENARIO_TIMEOUT_MS;
// SCENARIO=refusal runs refusal() instead of the workload.
'use strict';

const { runMain } = require('./common');

const { neonConfig } = require('@neondatabase/serverless');
const { PrismaNeon, PrismaNeonHttp } = require('@prisma/adapter-neon');
const ws = require('ws');
const { PrismaClient } = require(process.env.PRISMA_CLIENT_DIR);

const PORT = process.env.PGMUX_HTTP_PORT;
const MODE = process.env.MODE;
const CLIENTS = Number(process.env.CLIENTS || 4);
const WORKERS = Number(process.env.WORKERS || 5);
const POOL_MAX = Number(process.env.POOL_MAX || 3);
const ROUNDS = Number(process.env.ROUNDS || 3);
const RUN = process.env.RUN || MODE;
const URL = process.env.DATABASE_URL;

// Prisma's transaction timers (defaults 2 s to start, 5 s to run), as in prisma_workload.js: client-side
// clocks that a busy 2-CPU machine can exceed while workers queue for 3 backends. A transaction pgmux lost
// would still fail, after 30 s.
const TRANSACTION_OPTIONS = { maxWait: 30000, timeout: 60000 };

function makeClient(mode = MODE) {
  if (mode === 'websocket') {
    neonConfig.webSocketConstructor = ws;
    neonConfig.useSecureWebSocket = false;
    neonConfig.wsProxy = (host, port) => `127.0.0.1:${PORT}/v2`;
    return new PrismaClient({ adapter: new PrismaNeon({ connectionString: URL, max: POOL_MAX }),
                              transactionOptions: TRANSACTION_OPTIONS });
  }
  neonConfig.fetchEndpoint = `http://127.0.0.1:${PORT}/sql`;
  return new PrismaClient({ adapter: new PrismaNeonHttp(URL, {}) });
}

function describeError(err, where) {
  return { where, name: err && err.name, code: err && err.code, message: err && String(err.message).slice(0, 600),
           meta: err && err.meta };
}

// Thrown inside an interactive transaction to make Prisma roll it back.
class RollBack extends Error {}

class Worker {
  constructor(prisma, id, errors, tally) {
    this.prisma = prisma;
    this.id = id;
    this.errors = errors;
    this.tally = tally;
    this.email = `${RUN}-w${id}@example.test`;
    this.name = `worker ${id}`;
    this.userId = null;
    this.views = new Map(); // post id -> views this worker gave it
  }

  mismatch(kind, got, expected) {
    this.errors.push({ where: `worker ${this.id} ${kind}`, mismatch: { got, expected } });
  }

  posts() {
    return [...this.views.keys()].sort((a, b) => a - b);
  }

  async step(kind, ...args) {
    try {
      await this[kind](...args);
      this.tally[kind] = (this.tally[kind] || 0) + 1;
    } catch (err) {
      this.errors.push(describeError(err, `worker ${this.id} ${kind}`));
    }
  }

  async run() {
    await this.step('createUser');
    if (this.userId === null) return; // nothing else can run without the worker's user
    for (let round = 0; round < ROUNDS; round++) {
      await this.step('createPost', round);
      await this.step('findUserWithPosts');
      await this.step('incrementViews');
      if (MODE === 'websocket') {
        await this.step('batchTransaction', round);
        await this.step('committedTransaction', round);
        await this.step('rolledBackTransaction', round);
      }
    }
  }

  async createUser() {
    const user = await this.prisma.user.create({
      data: { email: this.email, name: this.name, profile: { worker: this.id, tags: ['a', 'b'] } } });
    this.userId = user.id;
    if (user.role !== 'MEMBER' || user.profile.worker !== this.id || user.name !== this.name) {
      this.mismatch('createUser', user, 'MEMBER, profile, name');
    }
  }

  async createPost(round) {
    const post = await this.prisma.post.create({
      data: { title: `post ${round} of ${this.id}`, authorId: this.userId } });
    this.views.set(post.id, 0);
    if (post.views !== 0 || post.published !== false) this.mismatch('createPost', post, 'views 0, unpublished');
  }

  async findUserWithPosts() {
    const user = await this.prisma.user.findUnique({
      where: { email: this.email }, include: { posts: { orderBy: { id: 'asc' } } } });
    const got = { name: user.name, posts: user.posts.map((p) => [p.id, p.views]) };
    const expected = { name: this.name, posts: this.posts().map((id) => [id, this.views.get(id)]) };
    if (JSON.stringify(got) !== JSON.stringify(expected)) this.mismatch('findUserWithPosts', got, expected);
  }

  async incrementViews() {
    const ids = this.posts();
    const id = ids[ids.length - 1];
    const post = await this.prisma.post.update({ where: { id }, data: { views: { increment: 1 } } });
    this.views.set(id, this.views.get(id) + 1);
    if (post.views !== this.views.get(id)) this.mismatch('incrementViews', post.views, this.views.get(id));
  }

  // Prisma sends BEGIN, both queries and COMMIT on one of the driver's pooled sockets.
  async batchTransaction(round) {
    const name = `${this.name} batched ${round}`;
    const [post, user] = await this.prisma.$transaction([
      this.prisma.post.create({ data: { title: `batch ${round} of ${this.id}`, authorId: this.userId } }),
      this.prisma.user.update({ where: { id: this.userId }, data: { name } }),
    ]);
    this.views.set(post.id, 0);
    this.name = name;
    if (user.name !== name || post.authorId !== this.userId) this.mismatch('batchTransaction', { post, user }, name);
  }

  // Reads its own writes inside the transaction, and everything is there after the commit.
  async committedTransaction(round) {
    const first = this.posts()[0];
    const name = `${this.name} committed ${round}`;
    const inside = await this.prisma.$transaction(async (tx) => {
      const post = await tx.post.update({ where: { id: first }, data: { views: { increment: 2 } } });
      const created = await tx.post.create({ data: { title: `tx ${round} of ${this.id}`, authorId: this.userId } });
      await tx.user.update({ where: { id: this.userId }, data: { name } });
      const count = await tx.post.count({ where: { authorId: this.userId } });
      return { views: post.views, created: created.id, count };
    });
    this.views.set(first, this.views.get(first) + 2);
    this.views.set(inside.created, 0);
    this.name = name;
    const expected = { views: this.views.get(first), count: this.views.size };
    if (inside.views !== expected.views || inside.count !== expected.count) {
      this.mismatch('committedTransaction', inside, expected);
    }
    const after = await this.prisma.user.findUnique({ where: { id: this.userId }, include: { posts: true } });
    if (after.name !== name || after.posts.length !== this.views.size) {
      this.mismatch('committedTransaction after', { name: after.name, posts: after.posts.length },
                    { name, posts: this.views.size });
    }
  }

  // Writes, sees them inside, then throws: Prisma rolls back and rethrows the worker's own error.
  async rolledBackTransaction(round) {
    const marker = `rolled back ${round} of ${this.id}`;
    let seenInside = null;
    try {
      await this.prisma.$transaction(async (tx) => {
        await tx.post.create({ data: { title: marker, authorId: this.userId } });
        await tx.user.update({ where: { id: this.userId }, data: { name: marker } });
        await tx.post.updateMany({ where: { authorId: this.userId }, data: { views: { increment: 100 } } });
        seenInside = await tx.post.count({ where: { authorId: this.userId } });
        throw new RollBack(marker);
      });
      this.mismatch('rolledBackTransaction', 'committed', 'the RollBack thrown inside');
      return;
    } catch (err) {
      if (!(err instanceof RollBack) || err.message !== marker) throw err;
    }
    if (seenInside !== this.views.size + 1) {
      this.mismatch('rolledBackTransaction inside', seenInside, this.views.size + 1);
    }
    const after = await this.prisma.user.findUnique({
      where: { id: this.userId }, include: { posts: { orderBy: { id: 'asc' } } } });
    const got = { name: after.name, posts: after.posts.map((p) => [p.id, p.views]) };
    const expected = { name: this.name, posts: this.posts().map((id) => [id, this.views.get(id)]) };
    if (JSON.stringify(got) !== JSON.stringify(expected)) this.mismatch('rolledBackTransaction after', got, expected);
  }
}

// What became of a promise: its value, or the name and message of what it threw.
async function messageOf(promise) {
  try {
    return { resolved: await promise };
  } catch (err) {
    return { name: err && err.name, message: err && String(err.message) };
  }
}

// A Prisma error as the application sees it, with the adapter's mapping of the driver's error when there is one.
async function prismaErrorOf(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    const cause = err.meta && err.meta.driverAdapterError && err.meta.driverAdapterError.cause;
    const mapped = cause && { originalCode: cause.originalCode, kind: cause.kind, constraint: cause.constraint };
    return { name: err.name, code: err.code, cause: mapped || null };
  }
}

// How PostgreSQL's errors reach Prisma: PrismaNeon maps the driver's error fields (code, severity, detail,
// constraint, ...) to Prisma's own codes; PrismaNeonHttp passes the driver's error (from pgmux's error JSON) on.
async function constraintErrors(prisma, worker) {
  return {
    duplicateEmail: await prismaErrorOf(prisma.user.create({ data: { email: worker.email } })),
    missingAuthor: await prismaErrorOf(prisma.post.create({ data: { title: 'orphan', authorId: -1 } })),
  };
}

// A raw query's values, typed by Prisma from each field's dataTypeID (over HTTP, the ones pgmux's JSON names).
async function rawTypes(prisma) {
  const [row] = await prisma.$queryRaw`SELECT ${41}::int + 1 AS i, 9007199254740993::bigint AS big,
      ${'12345.678'}::numeric AS n, ${'grüße ✓ 日本語'}::text AS t,
      ${new Date('2024-05-06T07:08:09.123Z')}::timestamptz AS ts,
      '{"a": [1, "x"]}'::jsonb AS j, '\\xdeadbeef'::bytea AS b, ARRAY[1, 2, 3]::int[] AS a, NULL::text AS nothing,
      true AS yes, 'ADMIN'::"Role" AS role`;
  return {
    i: row.i, big: typeof row.big === 'bigint' ? `${row.big}n` : row.big, n: String(row.n), t: row.t,
    ts: row.ts instanceof Date ? row.ts.toISOString() : row.ts, j: row.j,
    b: row.b instanceof Uint8Array ? Buffer.from(row.b).toString('hex') : row.b, a: row.a, nothing: row.nothing,
    yes: row.yes, role: row.role,
  };
}

// An interactive transaction at an isolation level: the adapter sends BEGIN, then SET TRANSACTION.
async function isolation(prisma) {
  const [row] = await prisma.$transaction(
    (tx) => tx.$queryRaw`SELECT current_setting('transaction_isolation') AS level`,
    { isolationLevel: 'Serializable' });
  return row.level;
}

// What Prisma does with transactions over HTTP, where each query is its own request: an interactive one, a
// batch, and a nested create (which Prisma runs as a transaction), each with writes that must not land if
// Prisma refuses.
async function transactionsOverHttp(prisma, userId) {
  const title = `${RUN} over http`;
  const nested = await messageOf(prisma.user.create({
    data: { email: `${RUN}-nested@example.test`, posts: { create: [{ title }] } } }));
  const interactive = await messageOf(prisma.$transaction(async (tx) => {
    await tx.post.create({ data: { title, authorId: userId } });
    return tx.post.count({ where: { authorId: userId } });
  }));
  const batch = await messageOf(prisma.$transaction([
    prisma.post.create({ data: { title, authorId: userId } }),
    prisma.post.count({ where: { authorId: userId } }),
  ]));
  const written = await prisma.post.count({ where: { title } });
  return { interactive, batch, nested, written };
}

async function scenario() {
  const errors = [];
  const tally = {};
  const clients = Array.from({ length: CLIENTS }, () => makeClient());
  const workers = Array.from({ length: CLIENTS * WORKERS },
                             (_, w) => new Worker(clients[w % CLIENTS], w, errors, tally));
  let stage = 'connect';
  const result = { mode: MODE, workers: workers.length };
  try {
    for (const client of clients) await client.$connect();
    stage = 'workload';
    await Promise.all(workers.map((worker) => worker.run()));
    stage = 'totals';
    const check = clients[0];
    const mine = { author: { email: { startsWith: `${RUN}-` } } };
    const [users, posts, views] = await Promise.all([
      check.user.count({ where: { email: { startsWith: `${RUN}-` } } }),
      check.post.count({ where: mine }),
      check.post.aggregate({ where: mine, _sum: { views: true } }),
    ]);
    result.totals = {
      users, posts, views: views._sum.views || 0,
      expected: {
        users: workers.filter((w) => w.userId !== null).length,
        posts: workers.reduce((sum, w) => sum + w.views.size, 0),
        views: workers.reduce((sum, w) => sum + [...w.views.values()].reduce((a, b) => a + b, 0), 0),
      },
    };
    stage = 'raw types';
    result.rawTypes = await rawTypes(check);
    if (MODE === 'websocket') {
      stage = 'isolation';
      result.isolation = await isolation(check);
    }
    stage = 'constraint errors';
    result.constraintErrors = await constraintErrors(check, workers[0]);
    if (MODE === 'http') {
      stage = 'transactions';
      result.transactions = await transactionsOverHttp(check, workers[0].userId);
    }
  } catch (err) {
    errors.push(describeError(err, stage));
  } finally {
    await Promise.all(clients.map((c) => c.$disconnect()
      .catch((err) => errors.push(describeError(err, 'disconnect')))));
  }
  return { ...result, tally, errorCount: errors.length, errors: errors.slice(0, 20) };
}

// pgmux's 53300 refusal (a full pool, after query_wait_timeout) as Prisma reports it over each transport: one
// PrismaNeon client holds the only backend in a transaction while a query from each mode waits for it.
async function refusal() {
  const holder = makeClient('websocket');
  const waiters = { websocket: makeClient('websocket'), http: makeClient('http') };
  const clients = [holder, ...Object.values(waiters)];
  try {
    for (const client of clients) await client.user.count(); // the query compiler loaded, a socket open
    let release;
    const released = new Promise((resolve) => { release = resolve; });
    let holding;
    const hasBackend = new Promise((resolve) => { holding = resolve; });
    const held = holder.$transaction(async (tx) => {
      await tx.user.count();
      holding();
      await released;
      return tx.user.count();
    });
    await hasBackend;
    const refused = {};
    for (const [mode, client] of Object.entries(waiters)) refused[mode] = await prismaErrorOf(client.user.count());
    release();
    const afterwards = { holder: await held };
    for (const [mode, client] of Object.entries(waiters)) afterwards[mode] = await client.user.count();
    return { refused, afterwards };
  } finally {
    await Promise.all(clients.map((c) => c.$disconnect()));
  }
}

runMain(() => (process.env.SCENARIO === 'refusal' ? refusal() : scenario()), 60000);
