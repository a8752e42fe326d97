// node-postgres (the `pg` module) with its own protocol habits: Parse/Bind/Describe/Execute/Sync in one
// write for every parameterised query (the unnamed statement), named statements reused across
// transactions and clients, rowMode 'array', multi-statement simple queries, errors in the middle of
// queued queries, transactions, a pg.Pool with concurrent queries, pg-cursor (Execute with a row limit
// and Flush), COPY through client.query (node-pg answers CopyInResponse with CopyFail), and startup
// parameters (statement_timeout, application_name, ...) beside the client-side query_timeout.
//
// DRIVER_CONFIG (JSON) says where to connect: {host, port, database, run, clients: {a: {user, password},
// b: {...}}, context}. Through the proxy, `context` is null and each client's password is its token;
// directly, `context` is {key, tenants: {a, b}}: the script sets each connection's signed tenant context
// itself, as the proxy would, so Row-Level Security gives both runs the same rows. Prints one JSON object
// per step, so a run through the proxy can be compared with a direct one line by line.
'use strict'

const crypto = require('crypto')
const pg = require('pg')
const Cursor = require('pg-cursor')

const config = JSON.parse(process.env.DRIVER_CONFIG)
const run = config.run

function emit(step, value) {
  console.log(JSON.stringify({ step, ...value }))
}

function failure(error) {
  return { error: { code: error.code || null, severity: error.severity || null, message: error.message } }
}

async function attempt(step, action) {
  try {
    emit(step, { result: await action() })
  } catch (error) {
    emit(step, failure(error))
  }
}

// The proof the proxy's context carries: "<expiry>:<hex HMAC-SHA256(key, '<pid>:<expiry>:<tenant>')>".
async function setContext(client, tenant) {
  const pid = (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
  const expires = Math.floor(Date.now() / 1000) + 3600
  const mac = crypto.createHmac('sha256', config.context.key).update(`${pid}:${expires}:${tenant}`).digest('hex')
  await client.query("SELECT set_config('app.current_tenant', $1, false), set_config('tenant_proxy.proof', $2, false)",
    [tenant, `${expires}:${mac}`])
}

function settings(name, extra = {}) {
  const { user, password } = config.clients[name]
  return { host: config.host, port: config.port, database: config.database, user, password, ...extra }
}

async function connect(name, extra = {}) {
  const client = new pg.Client(settings(name, extra))
  await client.connect()
  if (config.context) {
    await setContext(client, config.context.tenants[name])
  }
  return client
}

// A pg.Pool whose clients carry the context of `name` (set once per connection on a direct run).
function pool(name, extra = {}) {
  const clients = new pg.Pool(settings(name, extra))
  const ready = new WeakSet()
  return {
    async connect() {
      const client = await clients.connect()
      if (config.context && !ready.has(client)) {
        await setContext(client, config.context.tenants[name])
        ready.add(client)
      }
      return client
    },
    async query(query) {
      const client = await this.connect()
      try {
        return await client.query(query)
      } finally {
        client.release()
      }
    },
    end: () => clients.end(),
  }
}

// A query with a query_timeout of its own (node-pg reads it from a Query object only).
function timed(client, text, timeout) {
  const query = new pg.Query(text)
  query.query_timeout = timeout
  return new Promise((resolve, reject) => {
    query.callback = (error, result) => (error ? reject(error) : resolve(result))
    client.query(query)
  })
}

// Runs each query in turn; the command and rows of each (of each statement of a multi-statement query), or
// the error.
async function sequence(client, queries) {
  const seen = []
  for (const query of queries) {
    try {
      const result = await client.query(...query)
      seen.push(Array.isArray(result) ? result.map((each) => [each.command, each.rows]) : [result.command, result.rows])
    } catch (error) {
      seen.push(failure(error))
    }
  }
  return seen
}

// Settles with `promise`, or fails after `ms` milliseconds.
function within(ms, promise, what) {
  let timer
  const deadline = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer))
}

function plain(rows) {
  return JSON.parse(JSON.stringify(rows, (key, value) =>
    value && value.type === 'Buffer' && Array.isArray(value.data) ? Buffer.from(value.data).toString('hex') : value))
}

async function main() {
  const a = await connect('a')
  const b = await connect('b')
  const c = await connect('b')

  // The unnamed statement: Parse/Bind/Describe/Execute/Sync in one write, with values of many types.
  await attempt('unnamed count', async () =>
    (await a.query('SELECT count(*)::int AS n, min(tenant_id::text) AS tenant FROM leads WHERE name <> $1', ['nobody'])).rows)
  await attempt('unnamed types', async () => plain((await a.query(
    'SELECT $1::text AS t, $2::int[] AS arr, $3::jsonb AS j, $4::bytea AS b, $5::timestamptz AS ts, $6::numeric AS n, $7::bool AS f, $8::text AS nothing',
    ['zoë 🚀', [1, 2, 3], { k: [1, 'x'] }, Buffer.from([0, 1, 254]), new Date(Date.UTC(2024, 1, 29, 12, 0, 0)), '12345678901234567890.5', false, null])).rows))
  await attempt('unnamed fields', async () =>
    (await a.query('SELECT $1::int + 1 AS next, $2::text AS label', [41, 'x'])).fields.map((f) => [f.name, f.dataTypeID]))

  // rowMode 'array'.
  await attempt('row mode array', async () =>
    (await b.query({ text: 'SELECT name, email FROM leads WHERE id > $1 ORDER BY name', values: [0], rowMode: 'array' })).rows)

  // Named statements: parsed once per node-pg connection, then only bound. In transaction mode the
  // client's next use may land on another server connection (b's transaction holds one of two).
  const named = { name: 'leads_like', text: 'SELECT count(*)::int AS n FROM leads WHERE name LIKE $1' }
  await attempt('named first', async () => (await a.query({ ...named, values: ['%'] })).rows)
  await b.query('BEGIN')
  await attempt('named while b holds a transaction', async () => (await a.query({ ...named, values: ['A%'] })).rows)
  await attempt('named of b in its transaction', async () => (await b.query({ ...named, values: ['%'] })).rows)
  await c.query('BEGIN')
  await b.query('COMMIT')
  await attempt('named while c holds a transaction', async () => (await a.query({ ...named, values: ['%a%'] })).rows)
  await c.query('COMMIT')
  await a.query('BEGIN')
  await attempt('named in a transaction', async () => (await a.query({ ...named, values: ['%'] })).rows)
  await a.query('COMMIT')
  await attempt('named reused by name alone', async () => (await a.query({ name: 'leads_like', values: ['%e%'] })).rows)
  await attempt('named with another text', async () => (await a.query({ name: 'leads_like', text: 'SELECT 1', values: [] })).rows)
  await attempt('named that fails to parse', async () => (await a.query({ name: 'broken', text: 'SELEC 1', values: [] })).rows)
  await attempt('named after a failed parse', async () => (await a.query({ name: 'broken', text: 'SELECT 2 AS two', values: [] })).rows)
  await attempt('named binary', async () => plain((await a.query({ name: 'binary', text: 'SELECT $1::int4 AS i, $2::text AS t', values: [7, 'x'], binary: true })).rows))

  // A named statement whose first Parse fails (in a failed transaction block): node-pg parses it again
  // next time; one whose Parse succeeded but whose Bind or Execute failed: node-pg only binds it next time.
  await attempt('named parsed in a failed transaction', () => sequence(a, [['BEGIN'], ['SELECT 1/0'],
    [{ name: 'fresh', text: 'SELECT $1::int AS v', values: [1] }], ['ROLLBACK'],
    [{ name: 'fresh', text: 'SELECT $1::int AS v', values: [2] }], [{ name: 'fresh', text: 'SELECT $1::int AS v', values: [3] }]]))
  await attempt('named whose first bind fails', () => sequence(a, [[{ name: 'typed', text: 'SELECT $1::int AS v', values: ['x'] }],
    [{ name: 'typed', text: 'SELECT $1::int AS v', values: [5] }]]))
  await attempt('named parsed in a rolled back transaction', () => sequence(a, [['BEGIN'],
    [{ name: 'divide', text: 'SELECT 10 / $1::int AS v', values: [0] }], ['ROLLBACK'],
    [{ name: 'divide', text: 'SELECT 10 / $1::int AS v', values: [5] }]]))
  await attempt('statement management in SQL', () => sequence(a, [['BEGIN'], ['DEALLOCATE divide'], ['ROLLBACK'],
    [{ name: 'divide', text: 'SELECT 10 / $1::int AS v', values: [2] }], ['BEGIN'], ['DEALLOCATE nosuch'], ['SELECT 1 AS one'],
    ['ROLLBACK'], ['SELECT 1 AS one; DEALLOCATE typed; SELECT 2 AS two'], ['DEALLOCATE typed']]))

  // Multi-statement simple queries: one result per statement.
  await attempt('multi-statement', async () =>
    (await b.query('SELECT 1 AS one; SELECT count(*)::int AS leads FROM leads; SELECT tenant_proxy.current_tenant() AS tenant'))
      .map((result) => [result.command, result.rows]))
  await attempt('multi-statement failing in the middle', async () =>
    (await b.query('SELECT 1 AS one; SELECT 1/0; SELECT 3 AS three')).map((result) => result.rows))
  await attempt('after the failed multi-statement', async () => (await b.query('SELECT 4 AS four')).rows)
  await attempt('empty queries', () => sequence(b, [[''], ['-- nothing'], [';'], ['BEGIN'], [''], ['COMMIT']]))
  await attempt('notices', async () => {
    const notices = []
    const listener = (notice) => notices.push([notice.severity, notice.code, notice.message])
    b.on('notice', listener)
    const seen = await sequence(b, [['DROP TABLE IF EXISTS no_such_table'], ['BEGIN'], ['BEGIN'], ['COMMIT'], ['COMMIT']])
    b.removeListener('notice', listener)
    return [seen, notices]
  })
  await attempt('multi-statement with a transaction', async () =>
    (await b.query(`BEGIN; INSERT INTO drivers_scratch (run, n, t) VALUES (${run}, 1, 'multi'); SELECT count(*)::int AS n FROM drivers_scratch WHERE run = ${run}; COMMIT`))
      .map((result) => [result.command, result.rowCount]))

  // Queued queries with an error in the middle: node-pg sends each after the previous ReadyForQuery.
  const queued = [
    a.query('SELECT $1::int AS n', [1]),
    a.query('SELECT $1::int AS n', ['not a number']),
    a.query({ ...named, values: ['%'] }),
    a.query('SELECT 1/0 AS never'),
    a.query('SELECT count(*)::int AS n FROM leads'),
  ]
  const settled = await Promise.allSettled(queued)
  emit('queued with errors', { result: settled.map((s) => (s.status === 'fulfilled' ? s.value.rows : failure(s.reason))) })

  // Transactions: COMMIT, ROLLBACK, an error inside a block, and a write under Row-Level Security.
  await attempt('transaction commit', async () => {
    await a.query('BEGIN')
    await a.query('INSERT INTO drivers_scratch (run, n, t) VALUES ($1, $2, $3)', [run, 2, 'commit'])
    await a.query('COMMIT')
    return (await a.query('SELECT n, t FROM drivers_scratch WHERE run = $1 ORDER BY n', [run])).rows
  })
  await attempt('transaction rollback', async () => {
    await a.query('BEGIN')
    await a.query('INSERT INTO drivers_scratch (run, n, t) VALUES ($1, $2, $3)', [run, 3, 'rollback'])
    const inside = (await a.query('SELECT count(*)::int AS n FROM drivers_scratch WHERE run = $1', [run])).rows
    await a.query('ROLLBACK')
    return [inside, (await a.query('SELECT count(*)::int AS n FROM drivers_scratch WHERE run = $1', [run])).rows]
  })
  await attempt('error inside a transaction', async () => {
    const seen = []
    await a.query('BEGIN')
    for (const query of [['SELECT 1/0'], ['SELECT $1::int AS n', [5]], [{ ...named, values: ['%'] }]]) {
      try {
        seen.push((await a.query(...query)).rows)
      } catch (error) {
        seen.push(failure(error))
      }
    }
    seen.push((await a.query('ROLLBACK')).command)
    seen.push((await a.query({ ...named, values: ['%'] })).rows)
    return seen
  })
  await attempt('row-level security write', async () => {
    await b.query('BEGIN')
    const own = (await b.query("INSERT INTO leads (tenant_id, name, email) VALUES (tenant_proxy.current_tenant()::uuid, 'node', 'node@x') RETURNING name")).rows
    let other
    try {
      await b.query("INSERT INTO leads (tenant_id, name, email) VALUES ('33333333-3333-4333-8333-333333333333', 'x', 'x@x')")
    } catch (error) {
      other = failure(error)
    }
    await b.query('ROLLBACK')
    return [own, other]
  })

  // pg-cursor: a named portal, Execute with a row limit and Flush, until the client closes it (Sync).
  await attempt('cursor', async () => {
    const cursor = a.query(new Cursor('SELECT g, $1::text AS label FROM generate_series(1, 5) AS g', ['row']))
    const pages = []
    for (;;) {
      const rows = await cursor.read(2)
      pages.push(rows)
      if (rows.length === 0) break
    }
    await cursor.close()
    return [pages, (await a.query('SELECT count(*)::int AS n FROM leads')).rows]
  })
  await attempt('cursor closed early', async () => {
    const cursor = b.query(new Cursor('SELECT name FROM leads ORDER BY name', [], { rowMode: 'array' }))
    const first = await cursor.read(1)
    await cursor.close()
    return [first, (await b.query('SELECT 5 AS five')).rows]
  })

  // COPY through client.query: node-pg answers CopyInResponse with CopyFail and ignores CopyData.
  await attempt('copy from stdin without a stream', async () => (await a.query('COPY drivers_scratch (run, n) FROM STDIN')).rows)
  await attempt('after the failed copy', async () => (await a.query('SELECT count(*)::int AS n FROM drivers_scratch WHERE run = $1', [run])).rows)
  await attempt('copy to stdout', async () => {
    const result = await a.query(`COPY (SELECT n FROM drivers_scratch WHERE run = ${run} ORDER BY n) TO STDOUT`)
    return [result.command, result.rowCount]
  })

  // A pg.Pool of 8 clients, 40 concurrent queries, some in transactions.
  await attempt('pool', async () => {
    const clients = pool('b', { max: 8 })
    try {
      const work = []
      for (let i = 0; i < 40; i++) {
        if (i % 4 === 0) {
          work.push((async () => {
            const client = await clients.connect()
            try {
              await client.query('BEGIN')
              const rows = (await client.query('SELECT count(*)::int + $1::int AS n FROM leads', [i])).rows
              await client.query('COMMIT')
              return rows[0].n
            } finally {
              client.release()
            }
          })())
        } else {
          work.push(clients.query(i % 2 ? { ...named, values: ['%'] } : { text: 'SELECT count(*)::int + $1::int AS n FROM leads', values: [i] })
            .then((result) => result.rows[0].n))
        }
      }
      return await Promise.all(work)
    } finally {
      await clients.end()
    }
  })

  // Startup parameters and the client-side query_timeout.
  const tuned = await connect('a', {
    statement_timeout: 300, lock_timeout: 2000, idle_in_transaction_session_timeout: 60000, application_name: 'node-drivers',
  })
  await attempt('startup parameters', async () =>
    (await tuned.query("SELECT current_setting('statement_timeout') AS st, current_setting('lock_timeout') AS lt, current_setting('idle_in_transaction_session_timeout') AS it, current_setting('application_name') AS app")).rows)
  await attempt('statement_timeout', async () => (await tuned.query('SELECT pg_sleep(5)')).rows)
  // The setting stays with its client: b's longer statement, on a server connection tuned used, runs on.
  await attempt('after statement_timeout', () => sequence(tuned, [['SELECT count(*)::int AS n FROM leads'], ['SELECT pg_sleep(5)']])
    .then(async (seen) => [...seen, await sequence(b, [['SELECT pg_sleep(0.5)::text AS slept']])]))
  await attempt('set in the session', async () => {
    await tuned.query("SET application_name = 'renamed'")
    await tuned.query('BEGIN')
    const inside = (await tuned.query("SELECT current_setting('application_name') AS app")).rows
    await tuned.query('COMMIT')
    await tuned.query('RESET application_name')
    return [inside, (await tuned.query("SELECT current_setting('application_name') AS app, current_setting('statement_timeout') AS st")).rows]
  })
  await tuned.end()

  const impatient = await connect('a', { query_timeout: 100 })
  await attempt('query_timeout', async () => (await impatient.query('SELECT pg_sleep(1)')).rows)
  // node-pg does not cancel: the sleep goes on, and the next query waits for it behind it.
  await attempt('after query_timeout', async () => (await timed(impatient, 'SELECT count(*)::int AS n FROM leads', 10000)).rows)
  await impatient.end()

  // A cancel from node-pg's own Client.cancel (a CancelRequest with the BackendKeyData the client got),
  // sent once the first rows of a long query have arrived, outside and inside a transaction block.
  const cancelled = async (inTransaction) => {
    const query = new pg.Query("SELECT CASE WHEN g < 400 THEN repeat('x', 100) ELSE pg_sleep(30)::text END AS v FROM generate_series(1, 500) AS g")
    let rows = 0
    const done = new Promise((resolve) => {
      query.callback = (error, result) => resolve(error ? failure(error) : result.rowCount)
    })
    query.on('row', () => {
      if (rows++ === 0) new pg.Client(settings('a')).cancel(a, query)
    })
    const before = inTransaction ? await sequence(a, [['BEGIN']]) : []
    a.query(query)
    const outcome = await within(20000, done, 'the cancelled query')
    return [before, outcome, rows > 0, await sequence(a, [['SELECT 1 AS one'], ['ROLLBACK'], ['SELECT count(*)::int AS n FROM leads']])]
  }
  await attempt('cancel', () => cancelled(false))
  await attempt('cancel in a transaction', () => cancelled(true))

  // The server's FATAL for idle_in_transaction_session_timeout (a startup parameter) ends the session.
  await attempt('idle in transaction timeout', async () => {
    const idle = await connect('a', { idle_in_transaction_session_timeout: 300 })
    const ended = new Promise((resolve) => idle.on('error', (error) => resolve(failure(error))))
    await idle.query('BEGIN')
    await idle.query('SELECT 1')
    const error = await within(10000, ended, 'the idle-in-transaction timeout')
    return [error, await sequence(idle, [['SELECT 1']]), await sequence(b, [['SELECT count(*)::int AS n FROM leads']])]
  })

  // LISTEN: refused by the proxy's guard (docs/guard.md); directly, the role may listen.
  await attempt('listen', async () => (await b.query('LISTEN drivers_channel')).command)
  await attempt('after listen', async () => (await b.query('SELECT count(*)::int AS n FROM leads')).rows)

  await attempt('cleanup', async () => (await a.query('DELETE FROM drivers_scratch WHERE run = $1', [run])).rowCount)
  await Promise.all([a.end(), b.end(), c.end()])
}

main().catch((error) => {
  console.error(error)
  process.exit(1)
})
