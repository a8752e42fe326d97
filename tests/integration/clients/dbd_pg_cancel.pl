#!/usr/bin/perl
# DBD::Pg's pg_async then pg_cancel at once: the CancelRequest races the query it cancels. Prints one
# word per round: "cancelled" (57014), "completed" (the cancel came too early or too late, which Postgres
# ignores), or the state and message DBD::Pg reported for anything else, such as "Failed to get a result
# after PQcancel" when a ReadyForQuery came with no result before it.
# DRIVER_CONFIG (JSON): {host, port, database, user, password, rounds}.
use strict;
use warnings;
use DBI;
use DBD::Pg qw(:async);
use JSON::PP;

my $config = decode_json($ENV{DRIVER_CONFIG});
my $dbh = DBI->connect("dbi:Pg:host=$config->{host};port=$config->{port};dbname=$config->{database}",
                       $config->{user}, $config->{password}, {RaiseError => 0, PrintError => 0, AutoCommit => 1})
    or die "connect: $DBI::errstr";
$| = 1;
for (1 .. $config->{rounds}) {
    $dbh->do('SELECT pg_sleep(0.3)', {pg_async => PG_ASYNC}) // die $dbh->errstr;
    if ($dbh->pg_cancel) {
        print "cancelled\n";
    } elsif (!defined $dbh->err) {
        print "completed\n";
    } else {
        print $dbh->state, ' ', $dbh->errstr =~ s/\n/ /gr, "\n";
    }
}
$dbh->disconnect;
