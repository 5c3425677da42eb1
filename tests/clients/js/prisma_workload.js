// Prisma 7 (Rust-free client, @prisma/adapter-pg over node-postgres) through pgmux.
//
// CLIENTS PrismaClients (each with its own adapter and pg.Pool of POOL_MAX) run WORKERS workers each; the
// workers share OPERATIONS operations: creates (plain and nested), finds with relations, updates, upserts,
// counts, aggregates, deletes, raw queries, batch and interactive transactions. Every worker owns one user
// and its posts, so each read is checked exactly against what that worker wrote. NAMED=1 gives the
// adapter a statementNameGenerator: every query is then a node-postgres named (prepared) statement.
// Errors are collected, never thrown past the scenario; the result is one JSON line.
'use strict';

const crypto = require('node:crypto');
const { runScenario } = require('./common');
const { PrismaPg } = require('@prisma/adapter-pg');
const { PrismaClient } = require(process.env.PRISMA_CLIENT_DIR);

const CLIENTS = Number(process.env.CLIENTS || 10);
const WORKERS = Number(process.env.WORKERS || 10);
const OPERATIONS = Number(process.env.OPERATIONS || 2000);
const POOL_MAX = Number(process.env.POOL_MAX || 5);
const NAMED = process.env.NAMED === '1';
const RUN = process.env.RUN || 'run';

// What applications pass: a stable name per SQL text, so each text is prepared once per connection.
const namedStatements = new Set();
function statementName(query) {
  const name = 'prisma_' + crypto.createHash('sha256').update(query.sql).digest('hex').slice(0, 24);
  namedStatements.add(name);
  return name;
}

// Prisma's timers for transactions: how long one may wait to start (default 2 s) and run (default 5 s).
// 100 workers queue for 4 backends, and on a busy 2-CPU machine a transaction can wait longer than 2 s
// for its turn even with no pooler at all (seen directly against PostgreSQL: P2028 "Unable to start a
// transaction in the given time"). These are client-side clocks, not protocol settings: a transaction
// pgmux lost would still fail (P2028 after 30 s), so they only keep machine load out of the result.
const TRANSACTION_OPTIONS = { maxWait: 30000, timeout: 60000 };

function makeClient() {
  const adapter = new PrismaPg({ connectionString: process.env.DATABASE_URL, max: POOL_MAX },
                               NAMED ? { statementNameGenerator: statementName } : undefined);
  return new PrismaClient({ adapter, transactionOptions: TRANSACTION_OPTIONS });
}

function describeError(err, where) {
  return { where, name: err && err.name, code: err && err.code, message: err && String(err.message).slice(0, 600),
           meta: err && err.meta };
}

const KINDS = ['createPost', 'findUserWithPosts', 'incrementViews', 'countUsers', 'findManyPosts',
               'batchTransaction', 'interactiveTransaction', 'aggregate', 'upsertUser', 'publishAll',
               'deletePost', 'rawCount'];

class Worker {
  constructor(prisma, id, operations, errors, tally) {
    this.prisma = prisma;
    this.id = id;
    this.operations = operations;
    this.errors = errors;
    this.tally = tally;
    this.email = `${RUN}-w${id}@example.test`;
    this.userId = null;
    this.views = new Map(); // post id -> views this worker gave it
  }

  mismatch(kind, got, expected) {
    this.errors.push({ where: `worker ${this.id} ${kind}`, mismatch: { got, expected } });
  }

  posts() {
    return [...this.views.keys()].sort((a, b) => a - b);
  }

  totalViews() {
    let sum = 0;
    for (const v of this.views.values()) sum += v;
    return sum;
  }

  async run() {
    for (let k = 0; k < this.operations; k++) {
      const kind = k === 0 ? 'createUserWithPost' : KINDS[(k - 1 + this.id) % KINDS.length];
      const started = performance.now();
      try {
        await this[kind](k);
        this.tally.ok += 1;
        this.tally.byKind[kind] = (this.tally.byKind[kind] || 0) + 1;
        (this.tally.ms[kind] ||= []).push(performance.now() - started);
      } catch (err) {
        this.errors.push(describeError(err, `worker ${this.id} op ${k} ${kind}`));
        if (this.userId === null) return; // nothing else can run without the worker's user
      }
    }
  }

  // A nested write: Prisma runs it in a transaction (BEGIN, INSERT user, INSERT post, SELECT, COMMIT).
  async createUserWithPost() {
    const user = await this.prisma.user.create({
      data: { email: this.email, name: `worker ${this.id}`, profile: { worker: this.id, tags: ['a', 'b'] },
              posts: { create: [{ title: `first post of ${this.id}` }] } },
      include: { posts: true },
    });
    this.userId = user.id;
    for (const post of user.posts) this.views.set(post.id, 0);
    if (user.posts.length !== 1 || user.role !== 'MEMBER' || user.profile.worker !== this.id) {
      this.mismatch('createUserWithPost', user, 'one post, MEMBER, profile');
    }
  }

  async createPost(k) {
    const post = await this.prisma.post.create({ data: { title: `post ${k} of ${this.id}`, authorId: this.userId } });
    this.views.set(post.id, 0);
  }

  async findUserWithPosts() {
    const user = await this.prisma.user.findUnique({
      where: { email: this.email }, include: { posts: { orderBy: { id: 'asc' } } } });
    const ids = user.posts.map((p) => p.id);
    if (JSON.stringify(ids) !== JSON.stringify(this.posts())) this.mismatch('findUserWithPosts', ids, this.posts());
  }

  async incrementViews() {
    const ids = this.posts();
    if (ids.length === 0) return this.createPost('for views');
    const id = ids[ids.length - 1];
    const post = await this.prisma.post.update({ where: { id }, data: { views: { increment: 1 } } });
    this.views.set(id, this.views.get(id) + 1);
    if (post.views !== this.views.get(id)) this.mismatch('incrementViews', post.views, this.views.get(id));
  }

  async countUsers() {
    const [mine, all] = await Promise.all([
      this.prisma.user.count({ where: { email: this.email } }),
      this.prisma.user.count({ where: { email: { startsWith: `${RUN}-` } } }),
    ]);
    if (mine !== 1 || all < 1) this.mismatch('countUsers', { mine, all }, { mine: 1 });
  }

  async findManyPosts() {
    const posts = await this.prisma.post.findMany({
      where: { authorId: this.userId }, orderBy: { id: 'desc' }, take: 3, select: { id: true, views: true } });
    const expected = this.posts().reverse().slice(0, 3);
    if (JSON.stringify(posts.map((p) => p.id)) !== JSON.stringify(expected)) {
      this.mismatch('findManyPosts', posts, expected);
    }
  }

  // Batch transaction: Prisma sends BEGIN, the queries, COMMIT on one connection.
  async batchTransaction(k) {
    const [post, user] = await this.prisma.$transaction([
      this.prisma.post.create({ data: { title: `batch ${k} of ${this.id}`, authorId: this.userId } }),
      this.prisma.user.update({ where: { id: this.userId }, data: { name: `worker ${this.id} at ${k}` } }),
    ]);
    this.views.set(post.id, 0);
    if (user.name !== `worker ${this.id} at ${k}`) this.mismatch('batchTransaction', user.name, k);
  }

  async interactiveTransaction() {
    const ids = this.posts();
    if (ids.length === 0) return this.createPost('for tx');
    const updated = await this.prisma.$transaction(async (tx) => {
      const first = await tx.post.findFirst({ where: { authorId: this.userId }, orderBy: { id: 'asc' } });
      const post = await tx.post.update({ where: { id: first.id }, data: { views: { increment: 2 } } });
      const count = await tx.post.count({ where: { authorId: this.userId } });
      return { post, count };
    });
    const id = updated.post.id;
    this.views.set(id, this.views.get(id) + 2);
    if (id !== ids[0] || updated.count !== ids.length || updated.post.views !== this.views.get(id)) {
      this.mismatch('interactiveTransaction', updated, { id: ids[0], count: ids.length, views: this.views.get(id) });
    }
  }

  async aggregate() {
    const agg = await this.prisma.post.aggregate({
      where: { authorId: this.userId }, _sum: { views: true }, _count: { _all: true } });
    const expected = { sum: this.totalViews(), count: this.views.size };
    if ((agg._sum.views || 0) !== expected.sum || agg._count._all !== expected.count) {
      this.mismatch('aggregate', agg, expected);
    }
  }

  async upsertUser(k) {
    const user = await this.prisma.user.upsert({
      where: { email: this.email },
      update: { role: k % 2 ? 'ADMIN' : 'MEMBER', profile: { worker: this.id, visits: k } },
      create: { email: this.email, name: 'never' },
    });
    if (user.id !== this.userId || user.profile.visits !== k) this.mismatch('upsertUser', user, k);
  }

  async publishAll() {
    await this.prisma.post.updateMany({ where: { authorId: this.userId, published: false }, data: { published: true } });
    const unpublished = await this.prisma.post.count({ where: { authorId: this.userId, published: false } });
    if (unpublished !== 0) this.mismatch('publishAll', unpublished, 0);
  }

  async deletePost() {
    const ids = this.posts();
    if (ids.length < 3) return this.createPost('instead of delete');
    const deleted = await this.prisma.post.delete({ where: { id: ids[1] } });
    this.views.delete(ids[1]);
    if (deleted.id !== ids[1]) this.mismatch('deletePost', deleted.id, ids[1]);
  }

  async rawCount() {
    const rows = await this.prisma.$queryRaw`SELECT count(*)::int AS n FROM "Post" WHERE "authorId" = ${this.userId}`;
    if (rows[0].n !== this.views.size) this.mismatch('rawCount', rows, this.views.size);
  }
}

runScenario(async () => {
  const started = Date.now();
  const errors = [];
  const tally = { ok: 0, byKind: {}, ms: {} };
  const clients = Array.from({ length: CLIENTS }, makeClient);
  const workers = [];
  const totalWorkers = CLIENTS * WORKERS;
  for (let w = 0; w < totalWorkers; w++) {
    const operations = Math.floor(OPERATIONS / totalWorkers) + (w < OPERATIONS % totalWorkers ? 1 : 0);
    workers.push(new Worker(clients[w % CLIENTS], w, operations, errors, tally));
  }
  let totals = null;
  let workloadMs = null;
  let stage = 'warm-up';
  try {
    // Warm up each client, one after the other, before the 2,000 operations: loading the query compiler
    // and opening its pool's connections take seconds of CPU on a busy machine.
    for (const client of clients) {
      await client.$connect();
      await Promise.all(Array.from({ length: POOL_MAX }, () => client.$transaction(async (tx) => tx.user.count())));
      await client.$transaction([client.post.count(), client.user.findFirst()]);
    }
    const warmedUp = Date.now();
    stage = 'workload';
    await Promise.all(workers.map((worker) => worker.run()));
    workloadMs = Date.now() - warmedUp;
    stage = 'totals';
    // The database as a whole must hold exactly what the workers wrote.
    const check = clients[0];
    const [users, posts, views] = await Promise.all([
      check.user.count({ where: { email: { startsWith: `${RUN}-` } } }),
      check.post.count({ where: { author: { email: { startsWith: `${RUN}-` } } } }),
      check.post.aggregate({ where: { author: { email: { startsWith: `${RUN}-` } } }, _sum: { views: true } }),
    ]);
    totals = {
      users, posts, views: views._sum.views || 0,
      expected: {
        users: workers.filter((w) => w.userId !== null).length,
        posts: workers.reduce((sum, w) => sum + w.views.size, 0),
        views: workers.reduce((sum, w) => sum + w.totalViews(), 0),
      },
    };
  } catch (err) {
    errors.push(describeError(err, stage));
  } finally {
    await Promise.all(clients.map((c) => c.$disconnect().catch((err) => errors.push(describeError(err, 'disconnect')))));
  }
  return {
    named: NAMED,
    operations: OPERATIONS,
    operationsOk: tally.ok,
    byKind: tally.byKind,
    // Milliseconds per successful operation of each kind: median, 99th percentile, slowest.
    latencyMs: Object.fromEntries(Object.entries(tally.ms).map(([kind, ms]) => {
      ms.sort((a, b) => a - b);
      const at = (q) => Math.round(ms[Math.min(ms.length - 1, Math.floor(q * ms.length))]);
      return [kind, { p50: at(0.5), p99: at(0.99), max: Math.round(ms[ms.length - 1]) }];
    })),
    statementNames: namedStatements.size,
    totals,
    errorCount: errors.length,
    errors: errors.slice(0, 20),
    workloadMs,
    elapsedMs: Date.now() - started,
  };
});
