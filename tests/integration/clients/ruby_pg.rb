# Ruby's `pg` gem (Debian's ruby-pg, on libpq) and its protocol habits: exec (a simple Query),
# exec_params (the unnamed statement), prepare/exec_prepared with describe_prepared and describe_portal,
# transactions (the block form), async_exec and sync_exec, send_query + get_result with several
# statements, single-row mode, pipeline mode (libpq 14+: several Sync groups in one write, an error in
# one of them, send_flush_request), copy_data in and out, cancel, the basic type maps (which read pg_type
# at setup), and the connection's parameter_status.
#
# DRIVER_CONFIG (JSON) says where to connect: {host, port, database, run, clients: {a: {user, password},
# b: {...}}, context}. Through the proxy, `context` is null and each client's password is its token;
# directly, `context` is {key, tenants: {a, b}}: the script sets each connection's signed tenant context
# itself, as the proxy would, so Row-Level Security gives both runs the same rows. Prints one JSON object
# per step, so a run through the proxy can be compared with a direct one line by line.
require 'json'
require 'openssl'
require 'pg'

CONFIG = JSON.parse(ENV.fetch('DRIVER_CONFIG'))
RUN = CONFIG['run']
$stdout.sync = true

def emit(step, value)
  puts JSON.generate({ 'step' => step }.merge(value))
end

def failure(error)
  result = error.respond_to?(:result) ? error.result : nil
  state = result && result.error_field(PG::Result::PG_DIAG_SQLSTATE)
  { 'error' => { 'class' => error.class.name, 'state' => state, 'message' => error.message } }
end

def step(name)
  emit(name, 'result' => yield)
rescue PG::Error => e
  emit(name, failure(e))
end

# The value of the block, or its error, so one step can go on after a failure.
def attempt
  yield
rescue PG::Error => e
  failure(e)
end

def result_summary(result)
  { 'status' => result.res_status(result.result_status), 'fields' => result.fields, 'rows' => result.values,
    'cmd' => result.cmd_status, 'tuples' => result.cmd_tuples }
end

def set_context(conn, tenant)
  expires = Time.now.to_i + 3600
  mac = OpenSSL::HMAC.hexdigest('SHA256', CONFIG['context']['key'], "#{conn.backend_pid}:#{expires}:#{tenant}")
  conn.exec_params("SELECT set_config('app.current_tenant', $1, false), set_config('tenant_proxy.proof', $2, false)",
                   [tenant, "#{expires}:#{mac}"])
end

def connect(name, extra = {})
  client = CONFIG['clients'][name]
  conn = PG.connect({ host: CONFIG['host'], port: CONFIG['port'], dbname: CONFIG['database'], user: client['user'],
                      password: client['password'], sslmode: 'disable' }.merge(extra))
  set_context(conn, CONFIG['context']['tenants'][name]) if CONFIG['context']
  conn
end

def count_run(conn)
  conn.exec_params('SELECT count(*) FROM drivers_scratch WHERE run = $1', [RUN]).getvalue(0, 0)
end

# Every result of what was sent, up to the nil that ends it (outside pipeline mode: the whole query).
# The lines a COPY ... TO STDOUT sends, read with copy_data and get_copy_data.
def copied_out(conn, sql)
  lines = []
  conn.copy_data(sql) do
    while (line = conn.get_copy_data)
      lines << line
    end
  end
  lines
end

def all_results(conn)
  seen = []
  while (result = conn.get_result)
    seen << attempt { result.check; result_summary(result) }
  end
  seen
end

a = connect('a')
b = connect('b')

step('exec') { result_summary(a.exec('SELECT count(*), min(tenant_id::text) FROM leads')) }
step('exec other tenant') { result_summary(b.exec('SELECT count(*), min(tenant_id::text) FROM leads')) }
step('exec several statements') { result_summary(a.exec("SELECT 1 AS one; SELECT 2 AS two, 'x' AS x")) }
step('exec error') { [attempt { a.exec('SELECT 1/0') }, a.transaction_status, result_summary(a.exec('SELECT 1'))] }
step('exec_params') do
  [result_summary(a.exec_params('SELECT $1::int + 1 AS n, $2::text AS t, $3::bytea AS b', [41, "it's", { value: "\x00\x01", format: 1 }])),
   result_summary(a.exec_params('SELECT count(*) FROM leads WHERE name <> $1', ['nobody'])),
   attempt { a.exec_params('SELECT $1::int', ['three']) },
   result_summary(a.exec_params('SELECT $1::int * 2 AS binary_result', [21], 1)).merge('raw' => a.exec_params('SELECT $1::int', [7], 1).getvalue(0, 0).bytes)]
end
step('prepare and exec_prepared') do
  seen = [a.prepare('count_leads', 'SELECT count(*) + $1::int AS n FROM leads').cmd_status]
  seen << result_summary(a.exec_prepared('count_leads', [1]))
  b.exec('BEGIN')
  b.exec('SELECT 1')   # b holds one of the two server connections in transaction mode
  3.times { |n| seen << result_summary(a.exec_prepared('count_leads', [n])) }
  b.exec('COMMIT')
  seen << attempt { a.prepare('count_leads', 'SELECT 2') }
  seen << attempt { a.exec_prepared('no_such_statement', []) }
  desc = a.describe_prepared('count_leads')
  seen << { 'nparams' => desc.nparams, 'paramtype' => desc.paramtype(0), 'fields' => desc.fields, 'ftype' => desc.ftype(0) }
  seen << attempt { a.describe_prepared('no_such_statement') }
  seen << attempt { a.exec('DEALLOCATE count_leads').cmd_status }
  seen << attempt { a.exec_prepared('count_leads', [1]) }
  seen << a.prepare('count_leads', 'SELECT 3 AS again').cmd_status << result_summary(a.exec_prepared('count_leads'))
  seen << a.prepare('', 'SELECT $1::text AS unnamed').cmd_status << result_summary(a.exec_prepared('', ['u']))
  seen
end
step('prepare failing') do
  [attempt { a.prepare('broken', 'SELECT no_such_column FROM leads') }, attempt { a.exec_prepared('broken') },
   a.transaction_status]
end
step('describe_portal') do
  a.transaction do
    a.exec('DECLARE c1 CURSOR FOR SELECT id, name FROM leads ORDER BY id')
    desc = a.describe_portal('c1')
    [desc.fields, desc.ftype(0), result_summary(a.exec('FETCH 1 FROM c1')).slice('fields', 'tuples'),
     attempt { a.describe_portal('no_such_portal') }]
  end
end
step('transaction block') do
  seen = []
  a.transaction do |conn|
    conn.exec_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 1)', [RUN])
    seen << conn.transaction_status << count_run(conn)
  end
  seen << count_run(a)
  begin
    a.transaction do |conn|
      conn.exec_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 2)', [RUN])
      conn.exec('SELECT 1/0')
    end
  rescue PG::Error => e
    seen << failure(e)
  end
  seen << a.transaction_status << count_run(a)
  begin
    a.transaction do |conn|
      conn.exec_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 3)', [RUN])
      raise ArgumentError, 'application error'
    end
  rescue ArgumentError => e
    seen << e.message
  end
  seen << count_run(a)
end
step('error in a transaction, then continuing') do
  a.exec('BEGIN')
  seen = [attempt { a.exec('SELECT 1/0') }, a.transaction_status, attempt { a.exec('SELECT 1') },
          attempt { a.exec_params('SELECT $1::int', [1]) }, a.transaction_status]
  seen << a.exec('ROLLBACK').cmd_status << a.transaction_status << result_summary(a.exec('SELECT count(*) FROM leads'))
end
step('savepoints') do
  a.exec('BEGIN')
  seen = [a.exec_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 10)', [RUN]).cmd_status, a.exec('SAVEPOINT s').cmd_status,
          attempt { a.exec('SELECT 1/0') }, a.exec('ROLLBACK TO SAVEPOINT s').cmd_status,
          a.exec_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 11)', [RUN]).cmd_status, a.exec('COMMIT').cmd_status]
  seen << count_run(a)
end
step('async_exec and sync_exec') do
  [result_summary(a.async_exec('SELECT count(*) FROM leads')), result_summary(a.sync_exec('SELECT count(*) FROM leads')),
   result_summary(a.async_exec_params('SELECT $1::int + 1', [1])), result_summary(a.sync_exec_params('SELECT $1::int + 2', [1])),
   attempt { a.async_exec('SELECT 1/0') }, attempt { a.sync_exec('SELECT 1/0') }, a.transaction_status]
end
step('send_query and get_result') do
  a.send_query("SELECT 1 AS one; SELECT 1/0; SELECT 3 AS three")
  seen = all_results(a)
  a.send_query_params('SELECT $1::text AS p', ['x'])
  seen << all_results(a)
  a.send_prepare('sent', 'SELECT $1::int * 5 AS five')
  seen << all_results(a)
  a.send_query_prepared('sent', [2])
  seen << all_results(a)
  a.send_describe_prepared('sent')
  seen << all_results(a).map { |r| r.is_a?(Hash) ? r.slice('status', 'fields') : r }
  seen << a.transaction_status
end
step('single row mode') do
  a.send_query('SELECT g FROM generate_series(1, 5) AS g')
  a.set_single_row_mode
  seen = []
  while (result = a.get_result)
    result.check
    seen << [result.res_status(result.result_status), result.values]
  end
  a.send_query('SELECT g, 10 / (3 - g) FROM generate_series(1, 5) AS g')
  a.set_single_row_mode
  while (result = a.get_result)
    seen << attempt { result.check; [result.res_status(result.result_status), result.values] }
  end
  seen << result_summary(a.exec('SELECT 1'))
end
step('large result') do
  result = a.exec('SELECT g, repeat($$x$$, g % 100) FROM generate_series(1, 50000) AS g')
  [result.ntuples, result.column_values(0).sum(&:to_i), result.column_values(1).sum(&:size)]
end
step('copy_data in') do
  seen = []
  a.copy_data('COPY drivers_scratch (run, n, t) FROM STDIN') do
    5.times { |i| a.put_copy_data("#{RUN}\t#{100 + i}\trow #{i}\n") }
  end
  seen << count_run(a)
  seen << attempt do
    a.copy_data('COPY drivers_scratch (run, n) FROM STDIN') do
      a.put_copy_data("#{RUN}\t200\n#{RUN}\tnot a number\n")
    end
  end
  seen << a.transaction_status << count_run(a)
  seen << attempt do
    a.copy_data('COPY drivers_scratch (run, n) FROM STDIN') do
      a.put_copy_data("#{RUN}\t300\n")
      raise ArgumentError, 'the application gives up'
    end
  end
rescue ArgumentError => e
  seen << e.message << a.transaction_status << count_run(a)
end
step('copy_data out') do
  lines = copied_out(a, "COPY (SELECT n, t FROM drivers_scratch WHERE run = #{RUN} ORDER BY n) TO STDOUT")
  rls = copied_out(b, 'COPY (SELECT tenant_id, name FROM leads ORDER BY name) TO STDOUT (FORMAT csv)')
  [lines, rls, result_summary(a.exec('SELECT 1'))]
end
step('copy in a transaction, rolled back') do
  a.transaction do
    a.copy_data('COPY drivers_scratch (run, n) FROM STDIN (FORMAT csv)') { a.put_copy_data("#{RUN},400\n#{RUN},401\n") }
    [count_run(a)]
  end
  a.exec('BEGIN')
  a.copy_data('COPY drivers_scratch (run, n) FROM STDIN (FORMAT csv)') { a.put_copy_data("#{RUN},500\n") }
  inside = count_run(a)
  a.exec('ROLLBACK')
  [inside, count_run(a)]
end

# Pipeline mode: several Sync groups sent before any result is read; an error in one group aborts
# only that group; a transaction across groups; send_flush_request.
step('pipeline') do
  seen = []
  a.enter_pipeline_mode
  a.send_query_params('SELECT $1::int AS first', [1])
  a.send_query_params('SELECT count(*) FROM leads', [])
  a.pipeline_sync
  a.send_query_params('SELECT 1/$1::int', [0])
  a.send_query_params('SELECT $1::int AS skipped', [2])
  a.pipeline_sync
  a.send_prepare('piped', 'SELECT $1::int * 7 AS seven')
  a.send_query_prepared('piped', [3])
  a.pipeline_sync
  a.send_query_params('SELECT $1::text AS last', ['z'])
  a.pipeline_sync
  8.times do
    seen << all_results(a)
    result = a.get_result
    seen << (result && result.res_status(result.result_status))
  end
  seen << a.pipeline_status
  a.exit_pipeline_mode
  seen << result_summary(a.exec('SELECT 1'))
end
step('pipeline transaction') do
  seen = []
  a.enter_pipeline_mode
  a.send_query_params('BEGIN', [])
  a.send_query_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 600)', [RUN])
  a.pipeline_sync
  a.send_query_params('SELECT count(*) FROM drivers_scratch WHERE run = $1 AND n = 600', [RUN])
  a.pipeline_sync
  a.send_query_params('ROLLBACK', [])
  a.pipeline_sync
  a.send_query_params('SELECT count(*) FROM drivers_scratch WHERE run = $1 AND n = 600', [RUN])
  a.send_query_params('SELECT count(*), min(tenant_id::text) FROM leads', [])
  a.pipeline_sync
  9.times do
    seen << all_results(a)
  end
  a.exit_pipeline_mode
  seen
end
step('pipeline flush request') do
  a.enter_pipeline_mode
  a.send_query_params('SELECT $1::int AS flushed', [5])
  a.send_flush_request
  a.flush
  seen = [all_results(a)]
  a.send_query_params('SELECT count(*) FROM leads', [])
  a.pipeline_sync
  seen << all_results(a)
  seen << all_results(a) << a.get_result&.res_status(PG::PGRES_PIPELINE_SYNC)
  a.exit_pipeline_mode
  seen << a.transaction_status
end

# Cancel: the statement holds an advisory lock keyed by this run, which b then cannot take.
step('cancel') do
  a.send_query("SELECT pg_advisory_xact_lock(#{RUN}), pg_sleep(30)")
  deadline = Time.now + 20
  while b.exec_params('SELECT pg_try_advisory_xact_lock($1::bigint)', [RUN]).getvalue(0, 0) == 't'
    raise 'the statement never ran' if Time.now > deadline
  end
  cancelled = a.cancel
  [cancelled, all_results(a), a.transaction_status, result_summary(a.exec('SELECT count(*) FROM leads'))]
end
step('cancel in a transaction') do
  a.exec('BEGIN')
  a.send_query("SELECT pg_advisory_xact_lock(#{RUN}), pg_sleep(30)")
  deadline = Time.now + 20
  while b.exec_params('SELECT pg_try_advisory_xact_lock($1::bigint)', [RUN]).getvalue(0, 0) == 't'
    raise 'the statement never ran' if Time.now > deadline
  end
  cancelled = a.cancel
  seen = [cancelled, all_results(a), a.transaction_status]
  seen << a.exec('ROLLBACK').cmd_status << a.transaction_status
end

# Type maps: PG::BasicTypeRegistry reads pg_type when the maps are built.
step('type maps') do
  c = connect('a')
  c.type_map_for_results = PG::BasicTypeMapForResults.new(c)
  c.type_map_for_queries = PG::BasicTypeMapForQueries.new(c)
  result = c.exec_params('SELECT $1::int + 1 AS n, $2::float8 AS f, $3::bool AS b, $4::text[] AS arr, $5::date AS d,' \
                         " $6::numeric AS num, '{\"k\": [1, 2]}'::jsonb AS j, 0.1::float8 AS tenth, NULL::int AS nothing",
                         [41, 1.5, true, %w[x y], Date.new(2024, 2, 29), BigDecimal('1.25')])
  row = result.to_a.first.transform_values { |v| v.is_a?(Date) || v.is_a?(BigDecimal) ? "#{v.class}:#{v}" : v }
  counted = c.exec('SELECT count(*) AS n, 1.5::float8 AS f FROM leads').to_a
  c.close
  [row, counted]
end

# The server's settings as libpq saw them at startup and after SETs.
step('parameter status') do
  seen = %w[client_encoding DateStyle TimeZone integer_datetimes standard_conforming_strings server_encoding IntervalStyle is_superuser application_name].map { |p| [p, a.parameter_status(p)] }
  a.exec("SET application_name = 'ruby-pg'")
  a.exec('SET DateStyle = German')
  b.exec('BEGIN')
  b.exec('SELECT 1')
  seen << a.parameter_status('application_name') << a.parameter_status('DateStyle')
  seen << result_summary(a.exec("SELECT current_setting('application_name'), date '2024-02-29'"))
  b.exec('COMMIT')
  a.exec('RESET DateStyle')
  seen << a.parameter_status('DateStyle') << result_summary(a.exec("SELECT date '2024-02-29'"))
end
step('connection with options') do
  c = connect('b', options: '-c statement_timeout=150 -c search_path=public', application_name: 'ruby-options')
  seen = [attempt { c.exec('SELECT pg_sleep(1)') }, c.parameter_status('application_name'),
          result_summary(c.exec("SELECT current_setting('statement_timeout'), current_setting('search_path'), count(*) FROM leads"))]
  c.close
  seen
end
step('reset') do
  c = connect('b')
  c.reset
  seen = [c.status == PG::CONNECTION_OK]
  set_context(c, CONFIG['context']['tenants']['b']) if CONFIG['context']
  seen << result_summary(c.exec('SELECT count(*) FROM leads'))
  c.close
  seen
end

# What libpq does on its own at connect: sslmode=prefer (its default, an SSLRequest first) and
# target_session_attrs, which reads default_transaction_read_only and in_hot_standby from the server's
# ParameterStatus (or asks with SHOW / pg_is_in_recovery() when they are missing).
step('libpq connect options') do
  %w[prefer allow].map do |mode|
    c = connect('a', sslmode: mode)
    seen = [mode, c.ssl_in_use?, result_summary(c.exec('SELECT count(*) FROM leads'))]
    c.close
    seen
  end + %w[read-write primary any prefer-standby].map do |attrs|
    attempt do
      c = connect('b', target_session_attrs: attrs)
      seen = [attrs, c.parameter_status('default_transaction_read_only'), c.parameter_status('in_hot_standby'),
              result_summary(c.exec('SELECT count(*) FROM leads'))]
      c.close
      seen
    end
  end
end
step('client encoding') do
  c = connect('a')
  c.set_client_encoding('LATIN1')
  seen = [c.get_client_encoding, c.parameter_status('client_encoding')]
  b.exec('BEGIN')
  b.exec('SELECT 1')
  seen << c.exec_params('SELECT $1::text AS t, length($1::text) AS n', ["caf\xE9".force_encoding('ISO-8859-1')]).values.map { |r| r.map { |v| v.encode('UTF-8') } }
  seen << c.exec("SELECT 'na\u00efve' AS t".encode('ISO-8859-1')).getvalue(0, 0).encoding.to_s
  b.exec('COMMIT')
  c.exec('RESET client_encoding')
  seen << c.parameter_status('client_encoding') << c.exec("SELECT 'na\u00efve' AS t").getvalue(0, 0)
  c.close
  seen
end
step('large parameters') do
  big = 'z' * (3 << 20)
  [a.exec_params('SELECT length($1::text), md5($1::text)', [big]).values,
   a.exec_params('SELECT length($1::bytea)', [{ value: big, format: 1 }]).values,
   a.exec("SELECT length('#{'q' * 100_000}')").values]
end
step('search_path and prepared statements') do
  c = connect('a')
  seen = [c.prepare('sp', 'SELECT count(*) FROM leads').cmd_status, c.exec_prepared('sp').values]
  c.exec('SET search_path = pg_catalog')
  seen << attempt { c.exec_prepared('sp').values } << attempt { c.exec('SELECT count(*) FROM leads').values }
  c.exec('RESET search_path')
  seen << c.exec_prepared('sp').values
  c.close
  seen
end
# Clients that leave in the middle of something: a running statement, an open transaction, COPY IN,
# a pipeline, a COPY OUT half read. The others (and a new client) go on.
step('clients leaving mid-way') do
  seen = []
  c = connect('a')
  c.send_query('SELECT pg_sleep(0.3)')
  c.finish
  c = connect('a')
  c.exec('BEGIN')
  c.exec_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 700)', [RUN])
  c.finish
  c = connect('a')
  c.exec('COPY drivers_scratch (run, n) FROM STDIN')
  c.put_copy_data("#{RUN}\t701\n")
  c.finish
  c = connect('a')
  c.enter_pipeline_mode
  c.send_query_params('BEGIN', [])
  c.send_query_params('INSERT INTO drivers_scratch (run, n) VALUES ($1, 702)', [RUN])
  c.pipeline_sync
  c.flush
  c.finish
  c = connect('a')
  c.exec('COPY (SELECT g FROM generate_series(1, 200000) AS g) TO STDOUT')
  c.get_copy_data
  c.finish
  3.times do
    d = connect('b')
    seen << d.exec('SELECT count(*), min(tenant_id::text) FROM leads').values
    d.finish
  end
  seen << a.exec_params('SELECT count(*) FROM drivers_scratch WHERE run = $1 AND n >= 700', [RUN]).values
end
step('pipeline across transactions of two clients') do
  a.enter_pipeline_mode
  b.enter_pipeline_mode
  seen = []
  a.send_prepare('pipe_a', 'SELECT count(*) + $1::int FROM leads')
  a.pipeline_sync
  b.send_query_params('BEGIN', [])
  b.send_query_params('SELECT count(*) FROM leads', [])
  b.pipeline_sync
  4.times do |n|
    a.send_query_prepared('pipe_a', [n])
    a.pipeline_sync
  end
  b.send_query_params('COMMIT', [])
  b.pipeline_sync
  5.times { seen << all_results(a).map { |r| r['rows'] || r }; a.get_result }
  3.times { seen << all_results(b).map { |r| r['rows'] || r['cmd'] || r } }
  seen << all_results(b).map { |r| r['rows'] || r['cmd'] || r }
  a.exit_pipeline_mode
  b.exit_pipeline_mode rescue seen << 'b still busy'
  seen
end

# Notices and warnings the server sends (WARNING 25P01 for a COMMIT outside a transaction, NOTICE for
# DROP ... IF EXISTS), through a notice receiver, and empty queries.
step('notices') do
  c = connect('a')
  notices = []
  c.set_notice_receiver do |r|
    notices << [r.error_field(PG::Result::PG_DIAG_SEVERITY), r.error_field(PG::Result::PG_DIAG_SQLSTATE),
                r.error_field(PG::Result::PG_DIAG_MESSAGE_PRIMARY)]
  end
  seen = ['COMMIT', 'ROLLBACK', 'SET LOCAL statement_timeout = 1', 'BEGIN', 'BEGIN', 'COMMIT', 'DROP TABLE IF EXISTS no_such_table',
          '', ';', 'BEGIN; SELECT 1; COMMIT; COMMIT', 'ABORT', 'BEGIN READ ONLY', 'SELECT 1', 'END', 'SAVEPOINT x'].map do |sql|
    value = attempt { r = c.exec(sql); [r.res_status(r.result_status), r.cmd_status, c.transaction_status] }
    taken = notices.dup
    notices.clear
    [sql, value, taken]
  end
  c.send_query_params('', [])
  seen << all_results(c)
  c.close
  seen
end

step('cleanup') { a.exec_params('DELETE FROM drivers_scratch WHERE run = $1', [RUN]).cmd_tuples }
a.close
b.close
