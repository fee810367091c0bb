//! Rendering: aligned tables for people, JSON documents for programs.
//!
//! JSON views are built here, field by field, rather than derived from the wire types: the
//! field names are part of the CLI contract (scripts parse them) and must not change when the
//! protobuf messages grow. States are lower-case names (`upstream_failed`), times are unix
//! milliseconds, bytes are UTF-8 strings (or base64 under a `_base64` key when they are not
//! valid UTF-8).

use std::time::{Duration, UNIX_EPOCH};

use client::pb;
use proto::convert::state_name;
use serde_json::{json, Map, Value};

/// Exit status when standard output is closed under us (`schedctl ... | head -1`): what a
/// shell reports for a tool ended by SIGPIPE (128 + 13), without a word on stderr.
pub const EXIT_BROKEN_PIPE: i32 = 141;

/// Writes to standard output. A closed pipe ends the process quietly, like any Unix tool;
/// any other write error is reported and ends it with exit code 1. (`println!` would panic.)
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_BROKEN_PIPE);
        }
        let _ = writeln!(std::io::stderr(), "error: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// `print!` that survives a closed standard output (see [`write_stdout`]).
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::output::write_stdout(format_args!($($arg)*)) };
}

/// `println!` that survives a closed standard output (see [`write_stdout`]).
macro_rules! outln {
    () => { $crate::cli::output::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns and key: value lines.
    Table,
    /// One JSON document.
    Json,
}

/// Prints one JSON document on stdout.
pub fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => outln!("{s}"),
        Err(e) => eprintln!("error: cannot encode the output: {e}"),
    }
}

/// A table: a header row and data rows, printed with aligned columns.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: Vec<&'static str>) -> Self {
        Table { header, rows: Vec::new() }
    }

    /// Adds a row (missing cells are empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The rendered table, without trailing spaces.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<&str>, out: &mut String| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    l.push_str(&format!("{c:<w$}  ", w = width[i]));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(self.header.clone(), &mut out);
        for r in &self.rows {
            let cells: Vec<&str> =
                (0..cols).map(|i| r.get(i).map(String::as_str).unwrap_or("")).collect();
            line(cells, &mut out);
        }
        out
    }
}

/// `2024-06-01T12:00:00.123Z`, or `-` for 0.
pub fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A time and how far it is from now: `2026-12-02T12:00:05.000Z (in 4s)`, `... (3m 2s ago)`.
pub fn time_from_now(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let rel =
        |d: u64| humantime::format_duration(Duration::from_secs(d.div_ceil(1000))).to_string();
    let when =
        if ms >= now { format!("in {}", rel(ms - now)) } else { format!("{} ago", rel(now - ms)) };
    format!("{} ({when})", time(ms))
}

/// `1.234s`, `2m 3s`: a short duration between two unix-ms stamps.
pub fn elapsed(from_ms: u64, to_ms: u64) -> String {
    if from_ms == 0 || to_ms < from_ms {
        return "-".into();
    }
    let d = Duration::from_millis(to_ms - from_ms);
    if d < Duration::from_secs(60) {
        format!("{:.3}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Puts bytes under `key` (UTF-8) or `key_base64`; nothing when empty.
fn put_bytes(m: &mut Map<String, Value>, key: &str, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    match std::str::from_utf8(data) {
        Ok(s) => m.insert(key.to_string(), Value::String(s.to_string())),
        Err(_) => m.insert(format!("{key}_base64"), Value::String(base64(data))),
    };
}

/// Bytes for a terminal: UTF-8 (lossy), with a note when shortened.
pub fn text(data: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(data);
    let s = s.trim_end();
    if s.chars().count() <= max {
        return s.to_string();
    }
    let cut: String = s.chars().take(max).collect();
    format!("{cut}… ({} bytes)", data.len())
}

fn resources_json(r: &Option<pb::Resources>) -> Value {
    let r = r.clone().unwrap_or_default();
    let named: Map<String, Value> =
        sorted(r.named.into_iter()).into_iter().map(|(k, v)| (k, json!(v))).collect();
    json!({ "cpu_milli": r.cpu_milli, "memory_mib": r.memory_mib, "named": named })
}

fn sorted<K: Ord, V>(it: impl Iterator<Item = (K, V)>) -> Vec<(K, V)> {
    let mut v: Vec<(K, V)> = it.collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn string_map(m: &std::collections::HashMap<String, String>) -> Value {
    Value::Object(sorted(m.clone().into_iter()).into_iter().map(|(k, v)| (k, json!(v))).collect())
}

fn failure_json(f: &pb::AttemptFailure) -> Value {
    json!({
        "attempt": f.attempt,
        "fence": f.fence,
        "worker": f.worker,
        "kind": f.kind,
        "message": f.message,
        "at_ms": f.at_ms,
    })
}

/// The JSON view of a task.
pub fn task_json(t: &pb::Task) -> Value {
    let spec = t.spec.clone().unwrap_or_default();
    let mut m = Map::new();
    m.insert("id".into(), json!(t.id));
    m.insert("name".into(), json!(spec.name));
    m.insert("state".into(), json!(state_name(t.state)));
    m.insert("queue".into(), json!(spec.queue));
    m.insert("priority".into(), json!(spec.priority));
    m.insert("attempt".into(), json!(t.attempt));
    m.insert(
        "max_attempts".into(),
        json!(spec.retry.as_ref().map(|r| r.max_attempts).unwrap_or(0)),
    );
    m.insert("fence".into(), json!(t.fence));
    m.insert("worker".into(), json!(t.worker));
    m.insert("depends_on".into(), json!(spec.depends_on));
    m.insert("resources".into(), resources_json(&spec.resources));
    m.insert("labels".into(), string_map(&spec.labels));
    m.insert("metadata".into(), string_map(&spec.metadata));
    m.insert("idempotency_key".into(), json!(spec.idempotency_key));
    m.insert("timeout_ms".into(), json!(spec.timeout_ms));
    m.insert("not_before_ms".into(), json!(spec.not_before_ms));
    m.insert("submitted_at_ms".into(), json!(t.submitted_at_ms));
    m.insert("updated_at_ms".into(), json!(t.updated_at_ms));
    m.insert("assigned_at_ms".into(), json!(t.assigned_at_ms));
    m.insert("started_at_ms".into(), json!(t.started_at_ms));
    m.insert("finished_at_ms".into(), json!(t.finished_at_ms));
    m.insert("deadline_ms".into(), json!(t.deadline_ms));
    m.insert("until_ms".into(), json!(t.until_ms));
    put_bytes(&mut m, "payload", &spec.payload);
    put_bytes(&mut m, "result", &t.result);
    if !t.cancel_reason.is_empty() {
        m.insert("cancel_reason".into(), json!(t.cancel_reason));
    }
    if t.upstream != 0 {
        m.insert("upstream".into(), json!(t.upstream));
    }
    if let Some(f) = &t.last_failure {
        m.insert("last_failure".into(), failure_json(f));
    }
    Value::Object(m)
}

/// `key: value` lines describing one task.
pub fn task_text(t: &pb::Task) -> String {
    let spec = t.spec.clone().unwrap_or_default();
    let mut lines: Vec<(&str, String)> = vec![
        ("id", t.id.to_string()),
        ("name", spec.name.clone()),
        ("state", state_name(t.state).to_string()),
        ("queue", spec.queue.clone()),
        ("priority", spec.priority.to_string()),
    ];
    let max = spec.retry.as_ref().map(|r| r.max_attempts).unwrap_or(0);
    lines.push((
        "attempt",
        if max > 0 { format!("{} of {max}", t.attempt) } else { t.attempt.to_string() },
    ));
    if t.fence != 0 {
        lines.push(("fence", t.fence.to_string()));
    }
    if !t.worker.is_empty() {
        lines.push(("worker", t.worker.clone()));
    }
    if !spec.depends_on.is_empty() {
        let deps: Vec<String> = spec.depends_on.iter().map(u64::to_string).collect();
        lines.push(("after", deps.join(",")));
    }
    if let Some(r) = &spec.resources {
        let mut parts = Vec::new();
        if r.cpu_milli > 0 {
            parts.push(format!("cpu={}m", r.cpu_milli));
        }
        if r.memory_mib > 0 {
            parts.push(format!("mem={}MiB", r.memory_mib));
        }
        for (k, v) in sorted(r.named.clone().into_iter()) {
            parts.push(format!("{k}={v}"));
        }
        if !parts.is_empty() {
            lines.push(("resources", parts.join(" ")));
        }
    }
    if !spec.labels.is_empty() {
        let l: Vec<String> = sorted(spec.labels.clone().into_iter())
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        lines.push(("labels", l.join(",")));
    }
    if !spec.idempotency_key.is_empty() {
        lines.push(("key", spec.idempotency_key.clone()));
    }
    if spec.timeout_ms > 0 {
        lines.push((
            "timeout",
            humantime::format_duration(Duration::from_millis(spec.timeout_ms)).to_string(),
        ));
    }
    lines.push(("submitted", time(t.submitted_at_ms)));
    if t.started_at_ms > 0 {
        lines.push(("started", time(t.started_at_ms)));
    }
    if t.deadline_ms > 0 {
        lines.push(("deadline", time(t.deadline_ms)));
    }
    if t.until_ms > 0 {
        lines.push(("delayed until", time(t.until_ms)));
    }
    if t.finished_at_ms > 0 {
        lines.push(("finished", time(t.finished_at_ms)));
        lines.push(("took", elapsed(t.submitted_at_ms, t.finished_at_ms)));
    }
    if !t.cancel_reason.is_empty() {
        lines.push(("cancel reason", t.cancel_reason.clone()));
    }
    if t.upstream != 0 {
        lines.push(("failed upstream", t.upstream.to_string()));
    }
    if let Some(f) = &t.last_failure {
        lines.push((
            "last failure",
            format!("attempt {} on {} ({}): {}", f.attempt, f.worker, f.kind, f.message),
        ));
    }
    if !spec.payload.is_empty() {
        lines.push(("payload", text(&spec.payload, 200)));
    }
    if !t.result.is_empty() {
        lines.push(("result", text(&t.result, 2000)));
    }
    kv(&lines)
}

/// Aligned `key: value` lines.
pub fn kv(lines: &[(&str, String)]) -> String {
    let w = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in lines {
        let key = format!("{k}:");
        let mut value_lines = v.lines();
        out.push_str(&format!("{key:<w$} {}\n", value_lines.next().unwrap_or("")));
        for more in value_lines {
            out.push_str(&format!("{:<w$} {more}\n", ""));
        }
    }
    out
}

/// The task list table.
pub fn task_table(tasks: &[pb::Task]) -> String {
    let mut t =
        Table::new(vec!["ID", "STATE", "NAME", "QUEUE", "PRI", "ATTEMPT", "WORKER", "UPDATED"]);
    for task in tasks {
        let spec = task.spec.clone().unwrap_or_default();
        t.row(vec![
            task.id.to_string(),
            state_name(task.state).to_string(),
            spec.name,
            spec.queue,
            spec.priority.to_string(),
            task.attempt.to_string(),
            if task.worker.is_empty() { "-".into() } else { task.worker.clone() },
            time(task.updated_at_ms),
        ]);
    }
    t.render()
}

/// The JSON view of a submit answer, with the names of a workflow when given.
pub fn submitted_json(
    resp: &pb::SubmitTasksResponse,
    keys: &[String],
    names: Option<&[String]>,
) -> Value {
    let tasks: Vec<Value> = resp
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut m = Map::new();
            if let Some(n) = names.and_then(|n| n.get(i)) {
                m.insert("name".into(), json!(n));
            }
            m.insert("id".into(), json!(t.id));
            m.insert("created".into(), json!(t.created));
            m.insert("state".into(), json!(state_name(t.state)));
            m.insert("idempotency_key".into(), json!(keys.get(i).cloned().unwrap_or_default()));
            Value::Object(m)
        })
        .collect();
    json!({ "tasks": tasks, "log_index": resp.log_index })
}

/// The JSON view of an explanation.
pub fn explain_json(e: &pb::ExplainTaskResponse) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(e.id));
    m.insert("state".into(), json!(state_name(e.state)));
    m.insert("summary".into(), json!(e.summary));
    m.insert("waiting_on".into(), json!(e.waiting_on));
    m.insert("ahead".into(), json!(e.ahead));
    m.insert("blocker".into(), json!(e.blocker));
    m.insert("until_ms".into(), json!(e.until_ms));
    m.insert("worker".into(), json!(e.worker));
    m.insert("attempt".into(), json!(e.attempt));
    m.insert("fence".into(), json!(e.fence));
    if let Some(f) = &e.last_failure {
        m.insert("last_failure".into(), failure_json(f));
    }
    Value::Object(m)
}

/// The human view of an explanation.
pub fn explain_text(e: &pb::ExplainTaskResponse) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("task", e.id.to_string()),
        ("state", state_name(e.state).to_string()),
        ("why", e.summary.clone()),
    ];
    if !e.waiting_on.is_empty() {
        let ids: Vec<String> = e.waiting_on.iter().map(u64::to_string).collect();
        lines.push(("waiting on", ids.join(",")));
    }
    if e.state == pb::TaskState::Queued as i32 {
        lines.push(("ahead in queue", e.ahead.to_string()));
    }
    if !e.blocker.is_empty() {
        lines.push(("blocked by", e.blocker.clone()));
    }
    if e.until_ms > 0 {
        lines.push(("until", time_from_now(e.until_ms)));
    }
    if !e.worker.is_empty() {
        lines.push(("worker", e.worker.clone()));
    }
    if e.attempt > 0 {
        lines.push(("attempt", e.attempt.to_string()));
    }
    if let Some(f) = &e.last_failure {
        lines.push(("last failure", format!("attempt {} ({}): {}", f.attempt, f.kind, f.message)));
    }
    kv(&lines)
}

/// The JSON view of the cluster status.
pub fn status_json(s: &pb::ClusterStatusResponse) -> Value {
    let nodes: Vec<Value> = s
        .nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "addr": n.addr,
                "peer_addr": n.peer_addr,
                "voter": n.voter,
                "reachable": n.reachable,
                "error": n.error,
                "role": n.role,
                "term": n.term,
                "last_log_index": n.last_log_index,
                "committed_index": n.committed_index,
                "applied_index": n.applied_index,
                "snapshot_index": n.snapshot_index,
                "purged_index": n.purged_index,
                "leader_id": n.leader_id,
                "matched_index": n.matched_index,
                "digest": n.digest,
                "command_version": n.command_version,
                "data_dir": n.data_dir,
                "disk_free_bytes": n.disk_free_bytes,
                "disk_min_free_bytes": n.disk_min_free_bytes,
                "disk_low": n.disk_low,
            })
        })
        .collect();
    json!({
        "leader_id": s.leader_id,
        "term": s.term,
        "cluster_version": s.cluster_version,
        "nodes": nodes,
    })
}

/// The human view of the cluster status.
pub fn status_text(s: &pb::ClusterStatusResponse) -> String {
    let leader = if s.leader_id == 0 { "none".to_string() } else { s.leader_id.to_string() };
    let mut out =
        format!("leader: {leader}   term: {}   version: {}\n\n", s.term, s.cluster_version);
    if s.nodes.is_empty() {
        out.push_str(
            "this node has no cluster yet: initialise it with `schedctl cluster init --member \
             1=HOST:PORT --member 2=... --member 3=...`\n",
        );
        return out;
    }
    let mut t = Table::new(vec![
        "ID",
        "ADDRESS",
        "ROLE",
        "VOTER",
        "UP",
        "TERM",
        "LAST LOG",
        "COMMITTED",
        "APPLIED",
        "SNAPSHOT",
        "MATCHED",
        "VERSION",
        "DISK FREE",
    ]);
    for n in &s.nodes {
        let role = if n.reachable { n.role.clone() } else { "-".into() };
        t.row(vec![
            n.id.to_string(),
            match n.peer_addr.as_str() {
                "" => n.addr.clone(),
                p => format!("{} (peers {p})", n.addr),
            },
            role,
            yes_no(n.voter),
            if n.reachable { "yes".into() } else { format!("no: {}", n.error) },
            n.term.to_string(),
            n.last_log_index.to_string(),
            n.committed_index.to_string(),
            n.applied_index.to_string(),
            n.snapshot_index.to_string(),
            if n.matched_index == 0 { "-".into() } else { n.matched_index.to_string() },
            if n.command_version == 0 { "-".into() } else { n.command_version.to_string() },
            match (n.reachable, n.disk_free_bytes, n.disk_low) {
                (false, _, _) | (true, 0, false) => "-".into(),
                (true, free, false) => bytes(free),
                (true, free, true) => format!("{} LOW", bytes(free)),
            },
        ]);
    }
    out.push_str(&t.render());
    for n in s.nodes.iter().filter(|n| n.reachable && n.disk_low) {
        out.push_str(&format!(
            "\nnode {}: {} has {} free, below its floor of {}: it refuses new submits \
             (free space there, or restart it with a lower --min-free-disk)",
            n.id,
            if n.data_dir.is_empty() { "its data directory" } else { &n.data_dir },
            bytes(n.disk_free_bytes),
            bytes(n.disk_min_free_bytes),
        ));
    }
    if s.nodes.iter().any(|n| n.reachable && n.disk_low) {
        out.push('\n');
    }
    out
}

/// A byte count for people: `512 B`, `1.5 KiB`, `20.0 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// The JSON view of the worker list.
pub fn workers_json(w: &pb::ListWorkersResponse) -> Value {
    let workers: Vec<Value> = w
        .workers
        .iter()
        .map(|w| {
            let spec = w.spec.clone().unwrap_or_default();
            json!({
                "id": spec.id,
                "status": w.status,
                "session": w.session,
                "queues": spec.queues,
                "labels": string_map(&spec.labels),
                "slots": spec.slots,
                "capacity": resources_json(&spec.capacity),
                "used": resources_json(&w.used),
                "tasks": w.tasks,
                "registered_at_ms": w.registered_at_ms,
            })
        })
        .collect();
    json!({ "workers": workers })
}

/// The human view of the worker list.
pub fn workers_text(w: &pb::ListWorkersResponse) -> String {
    let mut t =
        Table::new(vec!["ID", "STATUS", "QUEUES", "SLOTS", "CPU", "MEM", "TASKS", "LABELS"]);
    for w in &w.workers {
        let spec = w.spec.clone().unwrap_or_default();
        let cap = spec.capacity.clone().unwrap_or_default();
        let used = w.used.clone().unwrap_or_default();
        let labels: Vec<String> = sorted(spec.labels.clone().into_iter())
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let tasks: Vec<String> = w.tasks.iter().map(u64::to_string).collect();
        t.row(vec![
            spec.id,
            w.status.clone(),
            spec.queues.join(","),
            format!("{}/{}", w.tasks.len(), spec.slots),
            format!("{}/{}m", used.cpu_milli, cap.cpu_milli),
            format!("{}/{}MiB", used.memory_mib, cap.memory_mib),
            if tasks.is_empty() { "-".into() } else { tasks.join(",") },
            if labels.is_empty() { "-".into() } else { labels.join(",") },
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(vec!["ID", "NAME", "STATE"]);
        t.row(vec!["1".into(), "a-long-name".into(), "queued".into()]);
        t.row(vec!["22".into(), "b".into()]);
        assert_eq!(t.render(), "ID  NAME         STATE\n1   a-long-name  queued\n22  b\n");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn task_json_has_the_contract_fields() {
        let t = pb::Task {
            id: 7,
            spec: Some(pb::TaskSpec {
                name: "n".into(),
                payload: b"echo hi".to_vec(),
                queue: "default".into(),
                ..Default::default()
            }),
            state: pb::TaskState::Succeeded as i32,
            attempt: 1,
            fence: 3,
            worker: "w".into(),
            result: vec![0xff, 0x00],
            finished_at_ms: 5,
            ..Default::default()
        };
        let v = task_json(&t);
        assert_eq!(v["id"], 7);
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["payload"], "echo hi");
        assert_eq!(v["result_base64"], "/wA=");
        assert!(v.get("result").is_none());
        let text = task_text(&t);
        assert!(text.contains("state:") && text.contains("succeeded"), "{text}");
    }

    #[test]
    fn text_is_shortened_with_a_note() {
        assert_eq!(text(b"abc\n", 10), "abc");
        assert_eq!(text(b"abcdef", 3), "abc… (6 bytes)");
    }

    #[test]
    fn times_render() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_000), "1970-01-01T00:00:01.000Z");
        assert_eq!(elapsed(1_000, 2_500), "1.500s");
        assert_eq!(elapsed(0, 2_500), "-");
    }

    #[test]
    fn status_and_workers_render() {
        let s = pb::ClusterStatusResponse {
            leader_id: 1,
            term: 3,
            nodes: vec![pb::NodeStatus {
                id: 1,
                addr: "127.0.0.1:7001".into(),
                voter: true,
                reachable: true,
                role: "leader".into(),
                command_version: 2,
                ..Default::default()
            }],
            cluster_version: 2,
        };
        let text = status_text(&s);
        assert!(text.starts_with("leader: 1   term: 3   version: 2"), "{text}");
        assert_eq!(status_json(&s)["cluster_version"], 2);
        assert_eq!(status_json(&s)["nodes"][0]["command_version"], 2);
        assert!(text.contains("127.0.0.1:7001  leader"), "{text}");
        assert!(!text.contains("LOW"), "{text}");
        let mut low = s.clone();
        low.nodes[0].disk_free_bytes = 3 << 20;
        low.nodes[0].disk_min_free_bytes = 1 << 30;
        low.nodes[0].disk_low = true;
        low.nodes[0].data_dir = "/var/lib/raftsched".into();
        let text = status_text(&low);
        assert!(text.contains("3.0 MiB LOW"), "{text}");
        assert!(
            text.contains(
                "node 1: /var/lib/raftsched has 3.0 MiB free, below its floor of 1.0 GiB"
            ),
            "{text}"
        );
        assert_eq!(status_json(&low)["nodes"][0]["disk_low"], true);
        assert_eq!(status_json(&s)["nodes"][0]["role"], "leader");
        let w = pb::ListWorkersResponse {
            workers: vec![pb::WorkerInfo {
                spec: Some(pb::WorkerSpec {
                    id: "w1".into(),
                    queues: vec!["default".into()],
                    slots: 2,
                    ..Default::default()
                }),
                status: "alive".into(),
                tasks: vec![4],
                ..Default::default()
            }],
        };
        assert!(workers_text(&w).contains("w1  alive   default  1/2"), "{}", workers_text(&w));
        assert_eq!(workers_json(&w)["workers"][0]["tasks"][0], 4);
    }
}
