//! Machine-readable lines on stdout: one JSON object per line, for the
//! things a supervisor script or a test needs to know without parsing logs
//! (whose format and wording may change, and which `--log-format` switches).
//! Logs go to stderr; stdout carries only these lines.
//!
//! | `event` | fields | when |
//! |---|---|---|
//! | `http_listening` | `address` | the HTTP endpoint is bound (useful with port 0) |
//! | `streaming` | `slot`, `resume_from` | a replication session starts streaming, from the slot's confirmed position |
//! | `stopped` | `bad_event_kind` (null unless a bad event stopped it), `confirmed`, `error` | the relay gives up on an error no retry can fix, just before it exits 1 |

use std::io::Write;

use crate::lsn::Lsn;

fn emit(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the relay: the line is only a courtesy.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn http_listening(address: std::net::SocketAddr) {
    emit(serde_json::json!({"event": "http_listening", "address": address.to_string()}));
}

pub fn streaming(slot: &str, resume_from: Lsn) {
    emit(
        serde_json::json!({"event": "streaming", "slot": slot, "resume_from": resume_from.to_string()}),
    );
}

pub fn stopped(bad_event_kind: Option<&str>, confirmed: Lsn, error: &str) {
    emit(serde_json::json!({
        "event": "stopped",
        "bad_event_kind": bad_event_kind,
        "confirmed": confirmed.to_string(),
        "error": error,
    }));
}
