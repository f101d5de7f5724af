//! Postgres for tests: a database of a test's own on the shared cluster, and
//! throwaway clusters for what the shared one cannot vary (pg_hba.conf,
//! server settings, restarts). Nothing here knows about Kafka or the relay
//! beyond running `outbox-relay setup` for the classic table.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_relay::lsn::Lsn;
use tokio_postgres::{Client, NoTls};

use super::relay::relay_setup;
use super::{admin_url, env, free_port, unique, wait_until};

pub async fn sql_client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own, dropped (with its slots) when the test ends well.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

pub const CLASSIC_TABLE: &str = include_str!("../../sql/01_outbox_classic.sql");
pub const DEBEZIUM_TABLE: &str = include_str!("../../sql/02_outbox_debezium.sql");

impl TestDb {
    pub async fn new(name: &str) -> TestDb {
        let admin = sql_client(&admin_url()).await;
        let db = unique(name).to_lowercase();
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        let base = admin_url();
        let url = match base.rfind('/') {
            Some(i) if !base[..i].ends_with('/') => format!("{}/{db}", &base[..i]),
            _ => panic!("OUTBOX_RELAY_DATABASE_URL must end in /dbname: {base}"),
        };
        let client = sql_client(&url).await;
        TestDb {
            name: db,
            url,
            client,
        }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Runs `sql`; returns the WAL positions before and after it (its
    /// commit is at or before the second).
    pub async fn exec_between(&self, sql: &str) -> (Lsn, Lsn) {
        let before = self.current_wal_lsn().await;
        self.exec(sql).await;
        (before, self.current_wal_lsn().await)
    }

    pub async fn lsn(&self, sql: &str) -> Lsn {
        let s: String = scalar(&self.client, sql, &[]).await;
        s.parse().unwrap()
    }

    pub async fn current_wal_lsn(&self) -> Lsn {
        self.lsn("SELECT pg_current_wal_lsn()::text").await
    }

    pub async fn confirmed_flush_lsn(&self, slot: &str) -> Lsn {
        confirmed_flush_lsn(&self.client, slot).await
    }

    /// The walsender's sent position for the slot, if it is streaming.
    pub async fn sent_lsn(&self, slot: &str) -> Option<Lsn> {
        let row = self
            .client
            .query_opt(
                "SELECT r.sent_lsn::text FROM pg_stat_replication r
                   JOIN pg_replication_slots s ON s.active_pid = r.pid
                  WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok())
    }

    /// Waits until the walsender of `slot` has sent the WAL up to `lsn`: the
    /// relay holds those changes, whatever it did with them.
    pub async fn wait_sent(&self, slot: &str, lsn: Lsn) {
        wait_until(
            Duration::from_secs(30),
            &format!("the walsender of {slot} to send up to {lsn}"),
            || async { self.sent_lsn(slot).await.is_some_and(|s| s >= lsn) },
        )
        .await;
    }

    /// Ends the walsender that holds `slot` (a dropped connection, as far
    /// as the relay can tell) and waits until the slot is free.
    pub async fn release_slot(&self, slot: &str) {
        self.exec(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
        ))
        .await;
        self.wait_slot_free(slot, "the slot to be released").await;
    }

    /// Waits until no walsender holds `slot`.
    pub async fn wait_slot_free(&self, slot: &str, what: &str) {
        wait_until(Duration::from_secs(30), what, || async {
            !self.slot_active(slot).await
        })
        .await;
    }

    pub async fn slot_active(&self, slot: &str) -> bool {
        self.client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some()
    }

    /// Creates the classic outbox table, and its publication and a slot
    /// named after the database through `outbox-relay setup`; returns the slot.
    pub async fn classic_outbox(&self) -> String {
        self.exec(CLASSIC_TABLE).await;
        self.set_up().0
    }

    /// A database of its own with the classic outbox, its publication and
    /// slot: the start of most tests.
    pub async fn classic(name: &str) -> (TestDb, String) {
        let db = TestDb::new(name).await;
        let slot = db.classic_outbox().await;
        (db, slot)
    }

    /// Runs `setup` for the tables already created, with a slot named after
    /// the database (slot names are global to the cluster; the database
    /// name is unique). Returns the slot and what `setup` printed.
    pub fn set_up(&self) -> (String, String) {
        let slot = format!("s_{}", self.name);
        let out = relay_setup(&["--database-url", &self.url, "--slot", &slot]);
        (slot, out)
    }

    /// Waits until a walsender holds `slot`: changes written after this are
    /// streamed to the relay, not just left in the WAL.
    pub async fn wait_streaming(&self, slot: &str) {
        wait_until(Duration::from_secs(30), "streaming", || async {
            self.slot_active(slot).await
        })
        .await;
    }

    /// Waits until the slot's confirmed_flush_lsn reaches `lsn`.
    /// Asserts that the slot has not confirmed a transaction that must not
    /// be: its row was inserted after `before` and its COMMIT returned at
    /// `after`. The bound is `after`, not `before`: a keepalive may report a
    /// position inside the transaction before the relay reads it, and
    /// confirming that is safe, since a transaction whose commit comes after
    /// the confirmed position is sent again.
    pub async fn assert_not_confirmed(&self, slot: &str, before: Lsn, after: Lsn, what: &str) {
        let confirmed = self.confirmed_flush_lsn(slot).await;
        assert!(
            confirmed < after,
            "slot confirmed {confirmed} past {what} (inserted between {before} and {after})"
        );
    }

    /// [`TestDb::assert_not_confirmed`] every 100 ms for 3 s: several status
    /// intervals of a relay that keeps running.
    pub async fn assert_not_confirmed_for_a_while(
        &self,
        slot: &str,
        before: Lsn,
        after: Lsn,
        what: &str,
    ) {
        for _ in 0..30 {
            self.assert_not_confirmed(slot, before, after, what).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `slot` confirmed all the WAL written so far.
    pub async fn wait_confirmed_now(&self, slot: &str, what: &str) {
        let end = self.current_wal_lsn().await;
        self.wait_confirmed_past(slot, end, what).await;
    }

    /// Waits until `slot` confirmed `lsn`; `what` says what that position is.
    pub async fn wait_confirmed_past(&self, slot: &str, lsn: Lsn, what: &str) {
        let what = format!("{slot} to confirm {lsn} ({what})");
        wait_until(Duration::from_secs(30), &what, || async {
            self.confirmed_flush_lsn(slot).await >= lsn
        })
        .await;
    }

    /// As [`TestDb::wait_confirmed_past`] (60 s), and on a timeout the relay's
    /// log without its DEBUG lines: what it did instead.
    pub async fn wait_confirmed_by(
        &self,
        relay: &super::relay::Relay,
        slot: &str,
        lsn: Lsn,
        what: &str,
    ) {
        wait_confirmed_by(&self.client, relay, slot, lsn, what).await
    }

    pub async fn drop(self) {
        drop(self.client);
        let admin = sql_client(&admin_url()).await;
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{0}' AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{0}' AND NOT active;",
                self.name
            ))
            .await;
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// The first column of the one row `sql` returns.
pub async fn scalar<T: tokio_postgres::types::FromSqlOwned>(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> T {
    client
        .query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The first column of every row `sql` returns, in its order.
pub async fn column<T: tokio_postgres::types::FromSqlOwned>(client: &Client, sql: &str) -> Vec<T> {
    let rows = client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(|r| r.get(0)).collect()
}

/// The slot's confirmed_flush_lsn (0/0 when it has none), on any server.
pub async fn confirmed_flush_lsn(client: &Client, slot: &str) -> Lsn {
    let lsn: String = scalar(
        client,
        "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await;
    lsn.parse().unwrap()
}

/// Waits (60 s) until the slot confirmed `lsn`, on any server; on a timeout
/// the relay's log without its DEBUG lines: what it did instead.
pub async fn wait_confirmed_by(
    client: &Client,
    relay: &super::relay::Relay,
    slot: &str,
    lsn: Lsn,
    what: &str,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while confirmed_flush_lsn(client, slot).await < lsn {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; the relay's log:\n{}",
            relay
                .log_text()
                .lines()
                .filter(|l| !l.contains("DEBUG"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A throwaway Postgres cluster of the test's own, for what the shared one
/// cannot vary (pg_hba.conf, server settings). Stopped and removed on drop.
pub struct TempCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

impl TempCluster {
    /// `hba` lines are put before the default trust rules.
    pub fn start(hba: &[&str], settings: &[&str]) -> TempCluster {
        let bin = PathBuf::from(env("PG_BIN_DIR"));
        let dir = std::env::temp_dir().join(unique("pgtmp"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let run = |args: Vec<String>| {
            let ok = run_as_postgres(std::path::Path::new(&args[0]), &args[1..]);
            assert!(ok, "{args:?}");
        };
        let _ = Command::new("chown")
            .args(["postgres", dir.to_str().unwrap()])
            .status();
        let data = dir.join("data");
        run(vec![
            bin.join("initdb").display().to_string(),
            "-D".into(),
            data.display().to_string(),
            "-U".into(),
            "postgres".into(),
            "--auth=trust".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C.UTF-8".into(),
            "--no-sync".into(),
        ]);
        let hba_path = data.join("pg_hba.conf");
        let default = std::fs::read_to_string(&hba_path).unwrap();
        std::fs::write(&hba_path, format!("{}\n{}", hba.join("\n"), default)).unwrap();
        let cluster = TempCluster { dir, port, bin };
        cluster.launch(settings);
        cluster
    }

    /// A physical standby of `primary`, streaming from it through the
    /// physical slot `physical_slot` (created by pg_basebackup), with
    /// `settings` on top of the primary's defaults. Its primary_conninfo
    /// names a database, which slot synchronisation (PostgreSQL 17+) needs.
    /// Returns once it accepts connections (hot standby).
    pub fn standby_of(
        primary: &TempCluster,
        physical_slot: &str,
        settings: &[&str],
    ) -> TempCluster {
        let bin = primary.bin.clone();
        let dir = std::env::temp_dir().join(unique("pgstandby"));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres", dir.to_str().unwrap()])
            .status();
        let data = dir.join("data");
        let ok = run_as_postgres(
            &bin.join("pg_basebackup"),
            &[
                "-d".into(),
                format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres",
                    primary.port
                ),
                "-D".into(),
                data.display().to_string(),
                "-R".into(),
                "-C".into(),
                "-S".into(),
                physical_slot.into(),
                "-X".into(),
                "stream".into(),
                "--no-sync".into(),
            ],
        );
        assert!(ok, "pg_basebackup of the cluster on port {}", primary.port);
        let cluster = TempCluster {
            dir,
            port: free_port(),
            bin,
        };
        let mut all = vec!["hot_standby=on"];
        all.extend_from_slice(settings);
        cluster.launch(&all);
        cluster
    }

    fn launch(&self, settings: &[&str]) {
        let data = self.dir.join("data");
        let mut opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=logical -c fsync=off",
            self.port,
            // Outside the data directory, so pg_basebackup has no socket to skip.
            self.socket_dir().display()
        );
        for s in settings {
            opts.push_str(&format!(" -c {s}"));
        }
        let args = [
            "-D".into(),
            data.display().to_string(),
            "-w".into(),
            "-l".into(),
            self.dir.join("pg.log").display().to_string(),
            "-o".into(),
            opts,
            "start".into(),
        ];
        assert!(
            run_as_postgres(&self.bin.join("pg_ctl"), &args),
            "pg_ctl start {args:?}; log in {}",
            self.dir.display()
        );
    }

    /// `pg_ctl promote`: the standby becomes a primary. Returns once it
    /// accepts writes.
    pub fn promote(&self) {
        let data = self.dir.join("data").display().to_string();
        let ok = run_as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D".into(), data, "-w".into(), "promote".into()],
        );
        assert!(ok, "pg_ctl promote; log in {}", self.dir.display());
    }

    /// `pg_ctl stop -m <mode>`: `fast` (a planned switchover: the server
    /// sends its standbys all its WAL before it goes) or `immediate` (a crash).
    pub fn stop(&self, mode: &str) {
        self.pg_ctl(&["-m", mode, "stop"]);
    }

    /// `pg_ctl -D <data> -w <args>` as the postgres user, which must succeed.
    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data").display().to_string();
        let mut all = vec!["-D".to_string(), data, "-w".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let ok = run_as_postgres(&self.bin.join("pg_ctl"), &all);
        assert!(ok, "pg_ctl {args:?} failed; log in {}", self.dir.display());
    }

    /// Where the server's Unix socket is (outside the data directory).
    pub fn socket_dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn url(&self, user: &str, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("postgres://{user}:{p}@127.0.0.1:{}/postgres", self.port),
            None => format!("postgres://{user}@127.0.0.1:{}/postgres", self.port),
        }
    }

    /// The classic outbox in the cluster's `postgres` database: its URL (as
    /// the superuser) and a client to it.
    pub async fn with_outbox(&self) -> (String, Client) {
        let url = self.url("postgres", None);
        let client = sql_client(&url).await;
        client.batch_execute(CLASSIC_TABLE).await.unwrap();
        (url, client)
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        // A cluster the test already stopped has nothing to stop.
        if data.join("postmaster.pid").exists() {
            let data = data.display().to_string();
            let _ = run_as_postgres(
                &self.bin.join("pg_ctl"),
                &[
                    "-D".into(),
                    data,
                    "-m".into(),
                    "immediate".into(),
                    "stop".into(),
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The database URL with its host:port replaced by `addr` (a proxy's).
pub fn via(url: &str, addr: &str) -> String {
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    let port = cfg.get_ports()[0];
    let from = format!("127.0.0.1:{port}");
    assert!(url.contains(&from), "{url} does not name {from}");
    url.replace(&from, addr)
}

/// The loopback address of the database the URL names.
pub fn pg_addr(url: &str) -> std::net::SocketAddr {
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    format!("127.0.0.1:{}", cfg.get_ports()[0]).parse().unwrap()
}

/// Runs a Postgres binary as `postgres` when we are root (initdb, pg_ctl and
/// the server refuse root); returns whether it succeeded.
fn run_as_postgres(program: &std::path::Path, args: &[String]) -> bool {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut cmd = if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // The wheels' servers find the system's libpq (an older one) before
    // their own unless told: the walreceiver then refuses the connection
    // string pg_basebackup -R writes (sslnegotiation, PostgreSQL 17+).
    if let Some(lib) = program
        .parent()
        .and_then(|b| b.parent())
        .map(|p| p.join("lib"))
    {
        if lib.join("libpq.so.5").exists() {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
    }
    cmd.args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl TempCluster {
    /// `pg_ctl restart -m <mode>` (`fast`: a clean shutdown; `immediate`: a
    /// crash). Same port and settings. Blocks until the server accepts
    /// connections again. Either way a logical slot may come back at an
    /// older confirmed position than its consumer reported: PostgreSQL
    /// before 17 writes the slot to disk only when more than that changed.
    pub fn restart(&self, mode: &str) {
        let log = self.dir.join("pg.log").display().to_string();
        self.pg_ctl(&["-t", "60", "-m", mode, "-l", &log, "restart"]);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("pg.log")).unwrap_or_default()
    }
}
