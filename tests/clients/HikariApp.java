// HikariCP + PostgreSQL JDBC test app for tests/test_clients.py: warm the pool, wait for "go",
// serve 20 requests. CLIENT_RECIPE, when set, is the line `pg-watchdog advise` prints for HikariCP:
// HikariCP's own property names (as in hikari.properties), applied as HikariConfig(Properties) does.
import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.URI;
import java.sql.Connection;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public class HikariApp {
    static final int REQUESTS = 20;

    public static void main(String[] args) throws Exception {
        URI dsn = new URI(System.getenv("CLIENT_DSN"));
        int size = Integer.parseInt(System.getenv("CLIENT_POOL"));
        String recipe = System.getenv().getOrDefault("CLIENT_RECIPE", "");
        String naming = System.getenv().getOrDefault("CLIENT_NAMING", "");
        Properties props = new Properties();
        props.setProperty("jdbcUrl", "jdbc:postgresql://" + dsn.getHost() + ":" + dsn.getPort()
                + dsn.getPath() + naming);
        props.setProperty("username", dsn.getUserInfo());
        props.setProperty("maximumPoolSize", Integer.toString(size));
        for (String pair : recipe.split(",")) {
            if (pair.isBlank()) continue;
            String[] kv = pair.split("=", 2);
            props.setProperty(kv[0].trim(), kv[1].trim());
        }
        try (HikariDataSource pool = new HikariDataSource(new HikariConfig(props))) {
            List<Connection> held = new ArrayList<>();
            StringBuilder warm = new StringBuilder("warm");
            for (int i = 0; i < size; i++) {
                Connection c = pool.getConnection();
                held.add(c);
                warm.append(' ').append(query(c, "SELECT pg_backend_pid()"));
            }
            for (Connection c : held) c.close();
            System.out.println(warm);
            BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
            String line;
            while ((line = in.readLine()) != null && !line.trim().equals("go")) { }
            if (line == null) return;
            int ok = 0;
            for (int i = 1; i <= REQUESTS; i++) {
                try (Connection c = pool.getConnection()) {
                    query(c, "SELECT 1");
                    ok++;
                    System.out.println("request " + i + " ok");
                } catch (Exception e) {
                    String msg = String.valueOf(e.getMessage()).split("\n")[0].replace("\"", "'");
                    System.out.println("request " + i + " failed \"" + e.getClass().getSimpleName()
                            + ": " + msg + "\"");
                }
            }
            System.out.println("done " + ok + " " + (REQUESTS - ok));
        }
    }

    static int query(Connection c, String sql) throws Exception {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getInt(1);
        }
    }
}
