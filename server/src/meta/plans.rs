//! The planner guard: every statement of both backends, recorded as it runs on a populated
//! database, goes through the planner (SQLite `EXPLAIN QUERY PLAN`; PostgreSQL `EXPLAIN` of
//! the generic plan with sequential scans disabled, so a sequential scan or an index scan with
//! no condition left in the plan means no index serves the statement). A full read of a table
//! that grows with use fails the test, naming the method, the statement and the table. Only
//! start-up recovery and the reaper may read such a table in full: [`MAY_SCAN`] names them.
//!
//! Statements are recorded, not listed by hand, so a new one is checked without anyone
//! remembering to: SQLite through its trace hook, PostgreSQL through a loopback relay that
//! reads the SQL of every Parse message the `postgres` crate sends.

use super::tests::{file, session};
use super::*;
use parking_lot::Mutex;
use std::sync::Arc;

/// Tables whose rows grow with uploads, sessions and time.
const GROWING: &[&str] = &[
    "files",
    "finished_uploads",
    "upload_sessions",
    "session_blocks",
    "upload_claims",
];

/// Methods that may read a growing table in full.
const MAY_SCAN: &[&str] = &[
    // Start-up recovery: the committing and the deleting files.
    "files_with_status",
    // Start-up recovery, and the reaper's adoption of sessions whose node died.
    "sessions",
];

/// Rows of each kind stored before the statements are recorded.
const ROWS: u32 = 200;

/// Fills a store with stored files (half of them from a recorded upload), sessions with
/// blocks, and key claims.
fn populate(m: &dyn MetaStore) {
    for i in 0..ROWS {
        let mut f = file(&format!("file{i}"), u64::from(i) + 1);
        f.sha256 = [0; 32];
        f.sha256[..4].copy_from_slice(&i.to_be_bytes());
        let key = upload_id(i);
        m.insert_file(&f, (i % 2 == 0).then_some(&key))
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.commit_file(&f.id).unwrap();
        let s = SessionRec {
            id: upload_id(ROWS + i),
            ..session(0, 1_000)
        };
        m.insert_session(&s).unwrap();
        m.mark_blocks(&[(s.id, 0, 1), (s.id, 1, 2)], 1_000).unwrap();
        m.claim_key("app", "u", &key, "n1").unwrap();
    }
}

fn upload_id(i: u32) -> UploadId {
    let mut id = [0xa5; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    id
}

/// Calls every [`MetaStore`] method once, each followed by `seen(its name)`.
fn every_method(m: &dyn MetaStore, seen: &mut dyn FnMut(&'static str)) {
    let key = upload_id(9_999);
    let f = file("probe", 99_999);
    m.reserve_ids("data", 10).unwrap();
    seen("reserve_ids");
    m.insert_file(&f, Some(&key)).unwrap();
    seen("insert_file");
    m.commit_file(&f.id).unwrap();
    seen("commit_file");
    m.finished_upload("app", "u", &key).unwrap();
    seen("finished_upload");
    m.file(&f.id, "app").unwrap();
    seen("file");
    m.find_content("app", &f.sha256, f.size).unwrap();
    seen("find_content");
    m.files_with_status(FILE_COMMITTING).unwrap();
    seen("files_with_status");
    let s = SessionRec {
        id: key,
        ..session(0, 1_000)
    };
    m.insert_session(&s).unwrap();
    seen("insert_session");
    m.sessions().unwrap();
    seen("sessions");
    m.session(&s.id).unwrap();
    seen("session");
    m.open_session("app", "u", s.size, s.block_size, &s.sha256, 0)
        .unwrap();
    seen("open_session");
    m.mark_blocks(&[(s.id, 0, 1)], 2_000).unwrap();
    seen("mark_blocks");
    m.session_blocks(&s.id).unwrap();
    seen("session_blocks");
    m.unmark_blocks(&s.id, &[0]).unwrap();
    seen("unmark_blocks");
    let c = Challenge {
        file: f.id.clone(),
        off: 0,
        len: 1,
    };
    m.set_challenge(&s.id, Some(&c)).unwrap();
    seen("set_challenge");
    m.expire_session(&s.id, 2_000).unwrap();
    seen("expire_session");
    m.insert_session(&s).unwrap();
    m.delete_session(&s.id).unwrap();
    seen("delete_session");
    m.claim_key("app", "u", &key, "n1").unwrap();
    // Held by another node: the second path of a claim.
    m.claim_key("app", "u", &key, "n2").unwrap();
    seen("claim_key");
    m.take_claim("app", "u", &key, "n1", "n2").unwrap();
    seen("take_claim");
    m.release_claim("app", "u", &key, "n2").unwrap();
    seen("release_claim");
    m.delete_file(&f.id, "app", None).unwrap();
    seen("delete_file");
    m.drop_file(&f.id).unwrap();
    seen("drop_file");
    m.expire_finished(1).unwrap();
    seen("expire_finished");
}

/// One statement as it ran, with the method that ran it.
struct Ran {
    method: &'static str,
    sql: String,
}

/// Runs [`every_method`], recording each method's statements from `log` (which the backend's
/// recorder fills) under its name.
fn record(m: &dyn MetaStore, log: &Mutex<Vec<String>>) -> Vec<Ran> {
    log.lock().clear();
    let mut ran = Vec::new();
    every_method(m, &mut |method| {
        for sql in log.lock().drain(..) {
            ran.push(Ran { method, sql });
        }
    });
    ran
}

/// The findings for one statement whose plan reads `tables` in full.
fn judge(r: &Ran, tables: &[String], found: &mut Vec<String>) {
    if MAY_SCAN.contains(&r.method) {
        return;
    }
    for t in tables.iter().filter(|t| GROWING.contains(&t.as_str())) {
        found.push(format!(
            "{}: `{}` reads table {t} in full",
            r.method,
            r.sql.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
}

/// Table names behind the aliases a statement gives them (`FROM files f`, `JOIN x AS y`).
fn aliases(sql: &str) -> Vec<(String, String)> {
    const NOT_ALIAS: &[&str] = &[
        "WHERE",
        "JOIN",
        "ON",
        "SET",
        "LIMIT",
        "ORDER",
        "GROUP",
        "INNER",
        "LEFT",
        "USING",
        "VALUES",
        "RETURNING",
    ];
    let words: Vec<&str> = sql
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if !(w.eq_ignore_ascii_case("FROM") || w.eq_ignore_ascii_case("JOIN")) {
            continue;
        }
        let (Some(table), Some(mut alias)) = (words.get(i + 1), words.get(i + 2)) else {
            continue;
        };
        if alias.eq_ignore_ascii_case("AS") {
            match words.get(i + 3) {
                Some(a) => alias = a,
                None => continue,
            }
        }
        if !NOT_ALIAS.iter().any(|k| alias.eq_ignore_ascii_case(k)) {
            out.push((alias.to_string(), table.to_string()));
        }
    }
    out
}

/// The growing-table full reads the SQLite planner chooses for every method's statements.
fn sqlite_full_reads(m: &sqlite::SqliteStore) -> Vec<String> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    m.db.lock()
        .trace_v2(
            rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT,
            Some(move |e: rusqlite::trace::TraceEvent<'_>| {
                if let rusqlite::trace::TraceEvent::Stmt(st, _) = e {
                    sink.lock().push(st.sql().into_owned());
                }
            }),
        )
        .unwrap();
    let ran = record(m, &log);
    let db = m.db.lock();
    let mut found = Vec::new();
    for r in &ran {
        let mut q = db
            .prepare(&format!("EXPLAIN QUERY PLAN {}", r.sql))
            .unwrap_or_else(|e| panic!("{}: cannot explain `{}`: {e}", r.method, r.sql));
        // Unbound parameters: the plan is made without their values, as when prepared.
        let nulls = vec![rusqlite::types::Null; q.parameter_count()];
        let details: Vec<String> = q
            .query_map(rusqlite::params_from_iter(nulls), |row| row.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        // "SCAN t" and "SCAN t USING [COVERING] INDEX i" read all of t; "SEARCH t ..." does not.
        let names = aliases(&r.sql);
        let tables: Vec<String> = details
            .iter()
            .filter_map(|d| d.strip_prefix("SCAN "))
            .map(|d| {
                let name = d.split(' ').next().unwrap_or(d);
                match names.iter().find(|(a, _)| a == name) {
                    Some((_, t)) => t.clone(),
                    None => name.to_string(),
                }
            })
            .collect();
        judge(r, &tables, &mut found);
    }
    assert!(
        ran.iter().any(|r| r.method == "commit_file"),
        "the recorder saw no statements"
    );
    found
}

#[test]
fn sqlite_statements_use_an_index() {
    let m = sqlite::SqliteStore::memory().unwrap();
    populate(&m);
    let found = sqlite_full_reads(&m);
    assert!(found.is_empty(), "full reads:\n{}", found.join("\n"));
}

/// The guard finds what it is for: version 2 of the schema had no index for the finished
/// upload a commit ends.
#[test]
fn sqlite_guard_finds_the_missing_index_of_schema_version_2() {
    let mut db = rusqlite::Connection::open_in_memory().unwrap();
    sqlite::migrate_to(&mut db, 2).unwrap();
    // Version 4's columns, which today's statements write, without version 3's indexes.
    db.execute_batch(
        "ALTER TABLE files ADD COLUMN grp TEXT NOT NULL DEFAULT ''; \
         ALTER TABLE upload_sessions ADD COLUMN grp TEXT NOT NULL DEFAULT '';",
    )
    .unwrap();
    let m = sqlite::SqliteStore::over(db);
    populate(&m);
    let found = sqlite_full_reads(&m).join("\n");
    for method in ["commit_file", "delete_file", "drop_file", "expire_finished"] {
        assert!(
            found.contains(&format!("{method}: ")) && found.contains("finished_uploads"),
            "{method} not reported:\n{found}"
        );
    }
}

/// The growing-table full reads in PostgreSQL's generic plans for every method's statements,
/// with `change` (SQL) applied once the store is open (which applies the schema).
fn pg_full_reads(db: &pg::testdb::TestDb, change: &str) -> Vec<String> {
    let relay = sniff::Relay::start(&db.cfg);
    let m = PgStore::open_config(relay.config(&db.cfg)).unwrap();
    let mut c = db.cfg.connect(postgres::NoTls).unwrap();
    c.batch_execute(change).unwrap();
    let ran = record(&m, &relay.log);
    c.batch_execute("ANALYZE; SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan")
        .unwrap();
    let mut found = Vec::new();
    for r in &ran {
        let params = (1..=32)
            .take_while(|i| r.sql.contains(&format!("${i}")))
            .count();
        let args = vec!["NULL"; params].join(", ");
        let args = if params == 0 {
            String::new()
        } else {
            format!("({args})")
        };
        c.batch_execute(&format!("PREPARE ferry_plan AS {}", r.sql))
            .unwrap_or_else(|e| panic!("{}: cannot prepare `{}`: {e}", r.method, r.sql));
        let rows = c
            .simple_query(&format!("EXPLAIN (FORMAT JSON) EXECUTE ferry_plan{args}"))
            .unwrap();
        c.batch_execute("DEALLOCATE ferry_plan").unwrap();
        let mut tables = Vec::new();
        for row in rows {
            if let postgres::SimpleQueryMessage::Row(row) = row {
                let plan: serde_json::Value = serde_json::from_str(row.get(0).unwrap()).unwrap();
                full_reads_in(&plan[0]["Plan"], &mut tables);
            }
        }
        judge(r, &tables, &mut found);
    }
    assert!(
        ran.iter().any(|r| r.method == "commit_file"),
        "the relay saw no statements"
    );
    found
}

/// Tables a PostgreSQL plan node (or one below it) reads in full: a sequential scan, or an
/// index scan without an index condition.
fn full_reads_in(node: &serde_json::Value, out: &mut Vec<String>) {
    let kind = node["Node Type"].as_str().unwrap_or("");
    let unbounded = match kind {
        "Seq Scan" => true,
        "Index Scan" | "Index Only Scan" => node.get("Index Cond").is_none(),
        _ => false,
    };
    if unbounded && let Some(t) = node["Relation Name"].as_str() {
        out.push(t.to_string());
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        full_reads_in(child, out);
    }
}

#[test]
fn pg_statements_use_an_index() {
    let Some(db) = pg::testdb::create("pg_statements_use_an_index") else {
        return;
    };
    populate(&db.store());
    let found = pg_full_reads(&db, "");
    assert!(found.is_empty(), "full reads:\n{}", found.join("\n"));
    // And the guard finds a missing index.
    let found = pg_full_reads(&db, "DROP INDEX finished_file").join("\n");
    assert!(
        found.contains("commit_file: ") && found.contains("finished_uploads"),
        "commit_file not reported without finished_file:\n{found}"
    );
}

/// A loopback relay in front of PostgreSQL that records the SQL of every Parse message.
mod sniff {
    use parking_lot::Mutex;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// SSLRequest and GSSENCRequest: untyped messages a client may send before the startup
    /// message (answered with one byte).
    const PRE_STARTUP: [u32; 2] = [80_877_103, 80_877_104];

    pub struct Relay {
        pub log: Arc<Mutex<Vec<String>>>,
        port: u16,
        stop: Arc<AtomicBool>,
        accept: Option<std::thread::JoinHandle<()>>,
    }

    impl Relay {
        /// Relays 127.0.0.1:<a free port> to the server `cfg` names.
        pub fn start(cfg: &postgres::Config) -> Relay {
            let host = match cfg.get_hosts().first() {
                Some(postgres::config::Host::Tcp(h)) => h.clone(),
                other => panic!("FERRY_PG_URL must name a TCP host, not {other:?}"),
            };
            let upstream = (host, cfg.get_ports().first().copied().unwrap_or(5432));
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let log = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (sink, flag) = (log.clone(), stop.clone());
            let accept = std::thread::spawn(move || {
                for client in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let (Ok(client), Ok(server)) = (
                        client,
                        TcpStream::connect((upstream.0.as_str(), upstream.1)),
                    ) else {
                        continue;
                    };
                    // Small messages go out at once (Nagle would hold each one for an ACK).
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (mut back, mut to_client) =
                        (server.try_clone().unwrap(), client.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut back, &mut to_client);
                        let _ = to_client.shutdown(Shutdown::Both);
                    });
                    let sink = sink.clone();
                    std::thread::spawn(move || {
                        let _ = frontend(client, &server, &sink);
                        let _ = server.shutdown(Shutdown::Both);
                    });
                }
            });
            Relay {
                log,
                port,
                stop,
                accept: Some(accept),
            }
        }

        /// `cfg` pointed at the relay.
        pub fn config(&self, cfg: &postgres::Config) -> postgres::Config {
            let mut c = postgres::Config::new();
            c.host("127.0.0.1").port(self.port);
            if let Some(u) = cfg.get_user() {
                c.user(u);
            }
            if let Some(p) = cfg.get_password() {
                c.password(p);
            }
            if let Some(d) = cfg.get_dbname() {
                c.dbname(d);
            }
            c
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so it sees the flag.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            if let Some(t) = self.accept.take() {
                let _ = t.join();
            }
        }
    }

    /// Forwards the client's messages to `server`, recording the query of each Parse ('P':
    /// statement name, NUL, query, NUL, ...) before it is forwarded, so it is in the log
    /// before the client can see its answer.
    fn frontend(
        mut client: TcpStream,
        mut server: &TcpStream,
        log: &Mutex<Vec<String>>,
    ) -> std::io::Result<()> {
        loop {
            let (len, body) = message(&mut client)?;
            server.write_all(&[&len[..], &body].concat())?;
            let code = body
                .get(..4)
                .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            if !PRE_STARTUP.contains(&code) {
                break;
            }
        }
        loop {
            let mut kind = [0u8; 1];
            client.read_exact(&mut kind)?;
            let (len, body) = message(&mut client)?;
            if kind[0] == b'P'
                && let Some(query) = body.split(|&b| b == 0).nth(1)
            {
                log.lock().push(String::from_utf8_lossy(query).into_owned());
            }
            server.write_all(&[&kind[..], &len, &body].concat())?;
        }
    }

    /// Reads one message's length and the body after it.
    fn message(client: &mut TcpStream) -> std::io::Result<([u8; 4], Vec<u8>)> {
        let mut len = [0u8; 4];
        client.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        if !(4..=1 << 24).contains(&n) {
            return Err(std::io::Error::other(format!("message length {n}")));
        }
        let mut body = vec![0; n - 4];
        client.read_exact(&mut body)?;
        Ok((len, body))
    }
}
