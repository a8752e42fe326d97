#!/usr/bin/perl
# Perl DBI with DBD::Pg and its own protocol habits: server-side prepares (pg_server_prepare, on by
# default) under names like dbdpg_p<pid>_<n>, which it drops with SQL `DEALLOCATE name` when a statement
# handle is destroyed (inside transactions too, after a ROLLBACK TO SAVEPOINT in a failed one),
# pg_placeholder_dollaronly, $dbh->do with binds, AutoCommit on and off (DBD::Pg sends `begin` itself),
# begin_work/commit/rollback, savepoints, pg_async (with pg_cancel), ping, and COPY with
# pg_putcopydata/pg_putcopyend and pg_getcopydata.
#
# DRIVER_CONFIG (JSON) says where to connect: {host, port, database, run, clients: {a: {user, password},
# b: {...}}, context}. Through the proxy, `context` is null and each client's password is its token;
# directly, `context` is {key, tenants: {a, b}}: the script sets each connection's signed tenant context
# itself, as the proxy would, so Row-Level Security gives both runs the same rows. Prints one JSON object
# per step, so a run through the proxy can be compared with a direct one line by line.
use strict;
use warnings;
use DBI;
use DBD::Pg qw(:async);
use Digest::SHA qw(hmac_sha256_hex);
use JSON::PP;
use Time::HiRes qw(time);

my $json = JSON::PP->new->canonical->allow_nonref;
my $config = $json->decode($ENV{DRIVER_CONFIG});
my $run = $config->{run};
$| = 1;

sub emit {
    my ($step, %value) = @_;
    print $json->encode({step => $step, %value}), "\n";
}

# What DBI reports for the last error of a handle: SQLSTATE and message (libpq's text, with DETAIL and
# HINT lines), or nothing.
sub failure {
    my ($h) = @_;
    return undef unless defined $h->err;
    return {state => $h->state, message => $h->errstr};
}

sub step {
    my ($name, $h, $action) = @_;
    my @warnings;
    local $SIG{__WARN__} = sub { my ($text) = @_; $text =~ s/ at \S+ line \d+\.?\n?\z//; push @warnings, $text };
    my $result = eval { $action->() };
    my %value = (result => $result);
    $value{died} = $@ =~ s/ at \S+ line \d+\.?\n?\z//r if $@;
    $value{warnings} = \@warnings if @warnings;
    emit($name, %value);
}

# The proof the proxy's context carries: "<expiry>:<hex HMAC-SHA256(key, '<pid>:<expiry>:<tenant>')>".
sub set_context {
    my ($dbh, $tenant) = @_;
    my $expires = int(time()) + 3600;
    my $mac = hmac_sha256_hex("$dbh->{pg_pid}:$expires:$tenant", $config->{context}{key});
    $dbh->do("SELECT set_config('app.current_tenant', ?, false), set_config('tenant_proxy.proof', ?, false)",
             undef, $tenant, "$expires:$mac") or die $dbh->errstr;
}

sub connect_as {
    my ($name, %attributes) = @_;
    my $client = $config->{clients}{$name};
    my $dbh = DBI->connect("dbi:Pg:host=$config->{host};port=$config->{port};dbname=$config->{database}",
                           $client->{user}, $client->{password},
                           {RaiseError => 0, PrintError => 0, PrintWarn => 1, AutoCommit => 1, %attributes})
        or die "connect: $DBI::errstr";
    if ($config->{context}) {
        my $autocommit = $dbh->{AutoCommit};
        $dbh->{AutoCommit} = 1;
        set_context($dbh, $config->{context}{tenants}{$name});
        $dbh->{AutoCommit} = $autocommit;
    }
    return $dbh;
}

sub rows {
    my ($sth) = @_;
    return $sth->fetchall_arrayref;
}

# Runs `$sth->execute(@binds)` and returns the rows or the error.
sub run_sth {
    my ($sth, @binds) = @_;
    my $count = $sth->execute(@binds);
    return {error => failure($sth)} unless defined $count;
    return $sth->{NUM_OF_FIELDS} ? rows($sth) : $count + 0;
}

sub count_run {
    my ($dbh) = @_;
    return $dbh->selectrow_array('SELECT count(*) FROM drivers_scratch WHERE run = ?', undef, $run) // failure($dbh);
}

my $a = connect_as('a');
my $b = connect_as('b');

# Server-side prepares: the first execute goes as an unnamed statement, later ones prepare and bind
# dbdpg_p<pid>_<n> (pg_switch_prepared); destroying the handle sends `DEALLOCATE dbdpg_p<pid>_<n>`.
step('prepared executes', $a, sub {
    my $sth = $a->prepare('SELECT count(*), min(tenant_id::text) FROM leads WHERE name <> ?');
    return [map { run_sth($sth, "nobody $_") } 1 .. 4];
});
step('deallocated then prepared again', $a, sub {
    my @seen;
    for my $round (1 .. 3) {
        my $sth = $a->prepare('SELECT ?::int * 2 AS doubled, count(*) FROM leads');
        push @seen, run_sth($sth, $round), run_sth($sth, $round + 10);
        undef $sth;   # DEALLOCATE
        push @seen, failure($a);
    }
    return \@seen;
});
step('prepare now', $a, sub {
    my $sth = $a->prepare('SELECT name FROM leads WHERE id > ? ORDER BY name', {pg_prepare_now => 1});
    return [failure($a), run_sth($sth, 0), run_sth($sth, 0)];
});
step('prepare now that fails', $a, sub {
    my $sth = $a->prepare('SELECT no_such_column FROM leads WHERE id > ?', {pg_prepare_now => 1});
    return [defined $sth ? 'handle' : 'none', failure($a)];
});
step('without server prepare', $a, sub {
    my $sth = $a->prepare('SELECT ?::text || ?::text', {pg_server_prepare => 0});
    return [run_sth($sth, 'a', 'b'), run_sth($sth, 'c', 'd')];
});
step('dollar placeholders only', $a, sub {
    my $sth = $a->prepare(q{SELECT '{"k": 1}'::jsonb ? $1, '{"k": 1}'::jsonb ? 'x', $2::int + 1}, {pg_placeholder_dollaronly => 1});
    return [run_sth($sth, 'k', 1), run_sth($sth, 'z', 2), run_sth($sth, 'k', 3)];
});
step('bind error', $a, sub {
    my $sth = $a->prepare('SELECT ?::int');
    return [run_sth($sth, 1), run_sth($sth, 2), run_sth($sth, 'three'), run_sth($sth, 4)];
});
step('execution error', $a, sub {
    my $sth = $a->prepare('SELECT 10 / ?::int');
    return [run_sth($sth, 1), run_sth($sth, 0), run_sth($sth, 0), run_sth($sth, 5)];
});

# $dbh->do: with binds (an unnamed statement), without (a simple Query), several statements in one.
step('do', $a, sub {
    return [
        $a->do('INSERT INTO drivers_scratch (run, n, t) VALUES (?, ?, ?)', undef, $run, 1, 'do') // failure($a),
        $a->do("INSERT INTO drivers_scratch (run, n, t) VALUES ($run, 2, 'plain')") // failure($a),
        $a->do("INSERT INTO drivers_scratch (run, n, t) VALUES ($run, 3, 'multi'); UPDATE drivers_scratch SET t = t || '!' WHERE run = $run") // failure($a),
        $a->do('SELECT 1/0') // failure($a),
        $a->do("INSERT INTO drivers_scratch (run, n) VALUES ($run, 4); SELECT 1/0; INSERT INTO drivers_scratch (run, n) VALUES ($run, 5)") // failure($a),
        $a->selectall_arrayref('SELECT n, t FROM drivers_scratch WHERE run = ? ORDER BY n', undef, $run),
    ];
});

# begin_work/commit/rollback with AutoCommit on, and a named statement across the transactions (and, in
# transaction mode, across server connections: b holds one of two while a runs).
step('begin_work', $a, sub {
    my $sth = $a->prepare('SELECT count(*) FROM drivers_scratch WHERE run = ?');
    my @seen = (run_sth($sth, $run), run_sth($sth, $run));
    $a->begin_work;
    $a->do('INSERT INTO drivers_scratch (run, n) VALUES (?, ?)', undef, $run, 10);
    push @seen, run_sth($sth, $run), $a->{AutoCommit};
    $a->rollback;
    push @seen, run_sth($sth, $run), $a->{AutoCommit};
    $b->begin_work;
    push @seen, $b->selectrow_array('SELECT count(*) FROM leads');
    $a->begin_work;
    $a->do('INSERT INTO drivers_scratch (run, n) VALUES (?, ?)', undef, $run, 11);
    push @seen, run_sth($sth, $run);
    $a->commit;
    $b->commit;
    push @seen, run_sth($sth, $run);
    undef $sth;
    push @seen, failure($a);
    return \@seen;
});

# AutoCommit off: DBD::Pg sends `begin` before the first statement of each transaction, and DEALLOCATE
# inside the transaction; in a failed transaction it sends ROLLBACK (or ROLLBACK TO the last savepoint)
# before the DEALLOCATE.
my $c = connect_as('a', AutoCommit => 0);
step('autocommit off', $c, sub {
    my @seen;
    my $insert = $c->prepare('INSERT INTO drivers_scratch (run, n, t) VALUES (?, ?, ?)');
    push @seen, run_sth($insert, $run, 20, 'off') for 1 .. 3;
    my $count = $c->prepare('SELECT count(*) FROM drivers_scratch WHERE run = ? AND n = 20');
    push @seen, run_sth($count, $run), run_sth($count, $run);
    undef $insert;   # DEALLOCATE inside the transaction
    push @seen, failure($c), run_sth($count, $run), $c->pg_ping;
    $c->commit;
    push @seen, run_sth($count, $run), $c->pg_ping;
    $c->rollback;
    return \@seen;
});
step('autocommit off, deallocate in a failed transaction', $c, sub {
    my @seen;
    my $sth = $c->prepare('SELECT 10 / ?::int');
    push @seen, run_sth($sth, 1), run_sth($sth, 2), run_sth($sth, 0), run_sth($sth, 5), $c->pg_ping;
    undef $sth;   # ROLLBACK, then DEALLOCATE
    push @seen, failure($c), $c->pg_ping;
    push @seen, $c->selectrow_array('SELECT count(*) FROM leads'), $c->pg_ping;
    $c->rollback;
    return \@seen;
});
step('savepoints', $c, sub {
    my @seen;
    my $insert = $c->prepare('INSERT INTO drivers_scratch (run, n) VALUES (?, ?)');
    push @seen, run_sth($insert, $run, 30), run_sth($insert, $run, 31);
    push @seen, $c->pg_savepoint('first') // failure($c);
    push @seen, run_sth($insert, $run, 32);
    push @seen, $c->do('SELECT 1/0') // failure($c), $c->pg_ping;
    push @seen, $c->pg_rollback_to('first') // failure($c), $c->pg_ping;
    push @seen, $c->pg_savepoint('second') // failure($c);
    push @seen, run_sth($insert, $run, 33);
    my $failing = $c->prepare('SELECT 1 / ?::int');
    push @seen, run_sth($failing, 1), run_sth($failing, 1), run_sth($failing, 0);
    undef $failing;   # ROLLBACK TO SAVEPOINT second, then DEALLOCATE
    push @seen, failure($c), $c->pg_ping;
    push @seen, run_sth($insert, $run, 34);
    push @seen, $c->pg_release('second') // failure($c);
    $c->commit;
    push @seen, $c->selectcol_arrayref('SELECT n FROM drivers_scratch WHERE run = ? AND n >= 30 ORDER BY n', undef, $run);
    $c->commit;
    return \@seen;
});
step('first server prepare in a failed transaction', $c, sub {
    my $sth = $c->prepare('SELECT ?::int + 1');
    my @seen = (run_sth($sth, 1));   # unnamed: DBD::Pg prepares it by name from the second execute on
    push @seen, $c->do('SELECT 1/0') // failure($c);
    push @seen, run_sth($sth, 2), run_sth($sth, 3);
    $c->rollback;
    push @seen, run_sth($sth, 4), run_sth($sth, 5);
    undef $sth;
    push @seen, failure($c);
    $c->commit;
    return \@seen;
});
step('prepared in a rolled back transaction', $c, sub {
    my $sth = $c->prepare('SELECT ?::int * 3');
    my @seen = (run_sth($sth, 1), run_sth($sth, 2), run_sth($sth, 3));
    $c->rollback;   # a prepared statement outlives the transaction that prepared it
    push @seen, run_sth($sth, 4);
    $c->commit;
    undef $sth;
    push @seen, failure($c), $c->pg_ping;
    $c->commit;
    return \@seen;
});
step('rollback', $c, sub {
    $c->do('INSERT INTO drivers_scratch (run, n) VALUES (?, ?)', undef, $run, 40);
    my $inside = count_run($c);
    $c->rollback;
    my $after = count_run($c);
    $c->commit;
    return [$inside, $after];
});

# ping and pg_ping in each transaction state.
step('ping', $b, sub {
    my @seen = ($b->ping, $b->pg_ping);
    $b->begin_work;
    push @seen, $b->ping, $b->pg_ping;
    $b->do('SELECT 1/0');
    push @seen, $b->ping, $b->pg_ping;
    $b->rollback;
    push @seen, $b->ping, $b->pg_ping, $b->selectrow_array('SELECT count(*) FROM leads');
    return \@seen;
});

# pg_async: a query that runs while the script polls pg_ready, a prepared asynchronous statement, a
# second query waiting for the first (PG_OLDQUERY_WAIT), and pg_cancel.
sub wait_ready {
    my ($dbh) = @_;
    my $deadline = time() + 20;
    until ($dbh->pg_ready) {
        die 'pg_ready never became true' if time() > $deadline;
        select(undef, undef, undef, 0.01);
    }
}
step('async do', $a, sub {
    $a->do('SELECT pg_sleep(0.2)', {pg_async => PG_ASYNC}) // return failure($a);
    wait_ready($a);
    my $result = $a->pg_result;
    return [$result, failure($a), $a->selectrow_array('SELECT count(*) FROM leads')];
});
step('async prepared', $a, sub {
    my $sth = $a->prepare('SELECT count(*), pg_sleep(0.1)::text FROM leads WHERE name <> ?', {pg_async => PG_ASYNC});
    my @seen;
    for my $round (1 .. 3) {
        $sth->execute("x$round") // return failure($sth);
        wait_ready($a);
        push @seen, $sth->pg_result + 0, rows($sth);
    }
    return \@seen;
});
step('async waits for the old query', $a, sub {
    $a->do('SELECT pg_sleep(0.2)', {pg_async => PG_ASYNC});
    my $second = $a->prepare('SELECT count(*) FROM leads', {pg_async => PG_ASYNC + PG_OLDQUERY_WAIT});
    $second->execute;
    wait_ready($a);
    return [$second->pg_result + 0, rows($second)];
});
# pg_cancel once the query runs: it holds an advisory lock keyed by this run, which b then cannot take.
sub wait_running {
    my $deadline = time() + 20;
    while ($b->selectrow_array('SELECT pg_try_advisory_xact_lock(?::bigint)', undef, $run)) {
        die 'the query never ran' if time() > $deadline;
    }
}
step('async cancel', $a, sub {
    $a->do("SELECT pg_advisory_xact_lock($run), pg_sleep(30)", {pg_async => PG_ASYNC}) // return failure($a);
    wait_running();
    my $cancelled = $a->pg_cancel;
    return [$cancelled, failure($a), $a->pg_ping, $a->selectrow_array('SELECT count(*) FROM leads')];
});
step('async cancel in a transaction', $a, sub {
    $a->begin_work;
    $a->do("SELECT pg_advisory_xact_lock($run), pg_sleep(30)", {pg_async => PG_ASYNC}) // return failure($a);
    wait_running();
    my @seen = ($a->pg_cancel, failure($a), $a->pg_ping);
    $a->rollback;
    return [@seen, $a->pg_ping, $a->selectrow_array('SELECT count(*) FROM leads')];
});
step('async cancels the old query', $a, sub {
    $a->do("SELECT pg_advisory_xact_lock($run), pg_sleep(30)", {pg_async => PG_ASYNC}) // return failure($a);
    wait_running();
    my $sth = $a->prepare('SELECT count(*) FROM leads', {pg_async => PG_ASYNC + PG_OLDQUERY_CANCEL});
    $sth->execute // return failure($sth);
    wait_ready($a);
    return [$sth->pg_result + 0, rows($sth)];
});
step('async in a transaction with AutoCommit off', $c, sub {
    $c->do('SELECT count(*) FROM leads', {pg_async => PG_ASYNC});
    wait_ready($c);
    my @seen = ($c->pg_result, $c->pg_ping);
    $c->do('SELECT 1/0', {pg_async => PG_ASYNC});
    wait_ready($c);
    push @seen, $c->pg_result, failure($c), $c->pg_ping;
    $c->rollback;
    return [@seen, $c->pg_ping];
});
step('prepare_cached across transactions', $b, sub {
    my @seen;
    for my $round (1 .. 4) {
        $b->begin_work;
        push @seen, run_sth($b->prepare_cached('SELECT count(*) + ? FROM leads'), $round);
        $b->commit;
    }
    return \@seen;
});

# COPY FROM STDIN with pg_putcopydata/pg_putcopyend, and COPY TO STDOUT with pg_getcopydata.
step('copy in', $a, sub {
    my @seen = ($a->do('COPY drivers_scratch (run, n, t) FROM STDIN') // failure($a));
    push @seen, $a->pg_putcopydata("$run\t" . (50 + $_) . "\tcopied $_\n") for 1 .. 3;
    push @seen, $a->pg_putcopyend // failure($a);
    push @seen, $a->selectall_arrayref('SELECT n, t FROM drivers_scratch WHERE run = ? AND n > 50 ORDER BY n', undef, $run);
    return \@seen;
});
step('copy in with bad data', $a, sub {
    my @seen = ($a->do('COPY drivers_scratch (run, n) FROM STDIN') // failure($a));
    push @seen, $a->pg_putcopydata("$run\t60\n"), $a->pg_putcopydata("$run\tsixty-one\n"), $a->pg_putcopydata("$run\t62\n");
    push @seen, $a->pg_putcopyend // failure($a);
    push @seen, count_run($a);
    return \@seen;
});
step('copy in inside a transaction, rolled back', $c, sub {
    my @seen = ($c->do('COPY drivers_scratch (run, n) FROM STDIN (FORMAT csv)') // failure($c));
    push @seen, $c->pg_putcopydata("$run,70\n$run,71\n");
    push @seen, $c->pg_putcopyend // failure($c);
    push @seen, count_run($c);
    $c->rollback;
    push @seen, count_run($c);
    $c->commit;
    return \@seen;
});
step('copy in, many rows', $a, sub {
    my @seen = ($a->do('COPY drivers_scratch (run, n, t) FROM STDIN') // failure($a));
    my $pad = 'p' x 200;
    for my $chunk (0 .. 39) {
        $a->pg_putcopydata(join '', map { "$run\t" . (1000 + $chunk * 500 + $_) . "\t$pad\n" } 1 .. 500) or return failure($a);
    }
    push @seen, $a->pg_putcopyend // failure($a);
    push @seen, [$a->selectrow_array('SELECT count(*), sum(n) FROM drivers_scratch WHERE run = ? AND n > 1000', undef, $run)];
    $a->do("COPY (SELECT n, t FROM drivers_scratch WHERE run = $run AND n > 1000 ORDER BY n) TO STDOUT");
    my ($line, $lines, $bytes) = (undef, 0, 0);
    while ($a->pg_getcopydata($line) >= 0) {
        $lines++;
        $bytes += length $line;
    }
    push @seen, $lines, $bytes, $a->do('DELETE FROM drivers_scratch WHERE run = ? AND n > 1000', undef, $run) + 0;
    return \@seen;
});
step('copy in a failed transaction', $c, sub {
    $c->do('SELECT 1/0');
    my @seen = ($c->do('COPY drivers_scratch (run, n) FROM STDIN') // failure($c), $c->pg_ping);
    $c->rollback;
    return [@seen, $c->pg_ping];
});
step('copy failing after a savepoint', $c, sub {
    $c->pg_savepoint('before');
    my @seen = ($c->do('COPY drivers_scratch (run, n) FROM STDIN') // failure($c));
    $c->pg_putcopydata("$run\tbad\n");
    push @seen, $c->pg_putcopyend // failure($c), $c->pg_ping;
    push @seen, $c->pg_rollback_to('before') // failure($c), $c->pg_ping;
    push @seen, $c->selectrow_array('SELECT count(*) FROM leads');
    $c->commit;
    return \@seen;
});
step('copy in to a table under row-level security', $a, sub {
    return [$a->do('COPY leads (tenant_id, name, email) FROM STDIN') // failure($a), $a->pg_ping];
});
step('copy out', $a, sub {
    my @seen = ($a->do("COPY (SELECT n, t FROM drivers_scratch WHERE run = $run ORDER BY n) TO STDOUT") // failure($a));
    my ($line, @lines);
    while ((my $length = $a->pg_getcopydata($line)) >= 0) {
        push @lines, $line;
    }
    return [@seen, \@lines, count_run($a)];
});
step('copy out under row-level security', $b, sub {
    my @seen = ($b->do('COPY leads (tenant_id, name) TO STDOUT (FORMAT csv)') // failure($b));
    my ($line, @lines);
    while ($b->pg_getcopydata($line) >= 0) {
        push @lines, $line;
    }
    return [@seen, [sort @lines]];
});
step('copy out, then a prepared statement', $b, sub {
    $b->do('COPY (SELECT g FROM generate_series(1, 3) AS g) TO STDOUT');
    my ($line, @lines);
    push @lines, $line while $b->pg_getcopydata($line) >= 0;
    my $sth = $b->prepare('SELECT count(*) + ? FROM leads');
    return [\@lines, run_sth($sth, 1), run_sth($sth, 2), run_sth($sth, 3)];
});

# Catalog helpers DBI applications use.
step('table_info', $a, sub {
    my $sth = $a->table_info(undef, 'public', 'leads', 'TABLE');
    return [map { [$_->{TABLE_SCHEM}, $_->{TABLE_NAME}, $_->{TABLE_TYPE}] } @{$sth->fetchall_arrayref({})}];
});
step('primary key', $a, sub { return [$a->primary_key(undef, 'public', 'leads')] });

# LISTEN: refused by the proxy's guard (docs/guard.md); directly, the role may listen.
step('listen', $b, sub { return [$b->do('LISTEN drivers_channel') // failure($b), $b->pg_ping] });
step('after listen', $b, sub { return [$b->selectrow_array('SELECT count(*) FROM leads')] });

step('cleanup', $a, sub { return $a->do('DELETE FROM drivers_scratch WHERE run = ?', undef, $run) + 0 });
$c->rollback;
$_->disconnect for $a, $b, $c;
