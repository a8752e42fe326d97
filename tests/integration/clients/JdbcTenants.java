// pgjdbc through the proxy: each argument pair is a tenant's token and its expected row count. Every
// connection forces server-side prepared statements (prepareThreshold=1) and they take turns, so in
// transaction mode their statements move between server connections. Prints "ok" or fails.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public class JdbcTenants {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        List<Connection> connections = new ArrayList<>();
        List<Long> expected = new ArrayList<>();
        for (int i = 1; i + 1 < args.length; i += 2) {
            Properties props = new Properties();
            props.setProperty("user", "jdbc");
            props.setProperty("password", args[i]);
            props.setProperty("prepareThreshold", "1");
            props.setProperty("sslmode", "disable");
            connections.add(DriverManager.getConnection(url, props));
            expected.add(Long.parseLong(args[i + 1]));
        }
        for (int round = 0; round < 20; round++) {
            for (int c = 0; c < connections.size(); c++) {
                try (PreparedStatement statement = connections.get(c).prepareStatement(
                        "SELECT count(*) + ? FROM leads WHERE id > ?")) {
                    statement.setLong(1, round);
                    statement.setLong(2, -1);
                    try (ResultSet rows = statement.executeQuery()) {
                        rows.next();
                        long got = rows.getLong(1);
                        if (got != expected.get(c) + round) {
                            throw new AssertionError("connection " + c + " round " + round + ": got " + got);
                        }
                    }
                }
            }
        }
        Connection inTransaction = connections.get(0);
        inTransaction.setAutoCommit(false);
        try (PreparedStatement statement = inTransaction.prepareStatement("SELECT count(*) FROM leads")) {
            for (int i = 0; i < 5; i++) {
                try (ResultSet rows = statement.executeQuery()) {
                    rows.next();
                    if (rows.getLong(1) != expected.get(0)) {
                        throw new AssertionError("in a transaction: got " + rows.getLong(1));
                    }
                }
            }
        }
        inTransaction.commit();
        for (Connection connection : connections) {
            connection.close();
        }
        System.out.println("ok");
    }
}
